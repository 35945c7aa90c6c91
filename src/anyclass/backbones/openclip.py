"""open_clip backbones: ``openclip:NAME[@TAG|@/path/ckpt|@random]``.

* NAME — an open_clip model config (``open_clip.list_models()``), e.g. ``ViT-B-16-quickgelu``.
* ``@TAG`` — an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...): open_clip
  downloads the file (the one network access, asked for by the user), and the file is read with
  :mod:`.weights` (safetensors / weights-only), never with open_clip's own loader. The tag's
  preprocessing (mean/std/interpolation/resize mode) is used.
* ``@PATH`` — a local checkpoint (.safetensors, .pt/.pth/.bin/.ckpt), read with :mod:`.weights`.
* nothing or ``@random`` — random weights, initialised with a fixed seed (a warning says so).

OpenAI weights were trained with QuickGELU: using them with a plain config (``ViT-B-16``
instead of ``ViT-B-16-quickgelu``) warns (METHODS.md §0).

Prompt hooks (see :mod:`.hooks`): the text hook works for every open_clip text tower with a
token-embedding layer (deep text context: open_clip transformers and BERT-like HF towers); the
deep-visual-prompt hook needs open_clip's ``VisionTransformer`` image tower (ResNet and timm
towers raise :class:`HookUnsupportedError`).
"""
from __future__ import annotations

import difflib
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import nn

from ..errors import AnyclassError, SpecError
from .schemes import BACKBONES
from .hooks import (word_embeddings, logit_scale_and_bias, HookUnsupportedError, capture_inputs, check_context, check_deep_context, check_prompts,
                    chunks, context_starts, deep_context, deep_prompts, freeze, normalized, placeholder_token_id,
                    replace_token_embeddings)
from .weights import (SAFETENSORS_EXT, TORCH_EXT, file_sha256, load_state_dict, state_dict_hash,
                      state_dict_mismatch)

RANDOM_SEED = 0
TEXT_BATCH = 256


def parse_spec(rest: str) -> tuple[str, str, str | None]:
    """``NAME[@W]`` -> (name, kind, value): kind is "random", "tag" or "path"."""
    name, _, w = rest.strip().partition("@")
    name, w = name.strip(), w.strip()
    if not name:
        raise SpecError("openclip spec needs a model name: openclip:NAME[@TAG|@/path/to/ckpt] "
                        "(e.g. openclip:ViT-B-16-quickgelu@openai)")
    if w in ("", "random"):
        return name, "random", None
    looks_like_path = (any(c in w for c in "/\\") or w.startswith(("~", "."))
                       or w.lower().endswith(SAFETENSORS_EXT + TORCH_EXT) or Path(w).exists())
    return name, ("path" if looks_like_path else "tag"), w


def _check_name(name: str) -> None:
    import open_clip
    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SpecError(f"unknown open_clip model {name!r}{hint} "
                        f"(open_clip.list_models() lists all {len(models)})")


def _pretrained_cfg(name: str, tag: str) -> dict[str, Any]:
    import open_clip
    cfg = open_clip.pretrained.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"known tags: {', '.join(tags)}" if tags else "open_clip has no pretrained tags for it"
        raise SpecError(f"unknown pretrained tag {tag!r} for open_clip model {name!r} ({known}); "
                        f"or give a checkpoint path, or @random")
    return dict(cfg)


def _download(name: str, tag: str, cfg: dict[str, Any]) -> Path:
    """Fetch the tag's weights file with open_clip's downloader (prefers safetensors on the HF hub)."""
    import open_clip
    try:
        path = open_clip.pretrained.download_pretrained(cfg)
    except Exception as e:
        raise AnyclassError(f"could not download open_clip weights {name}@{tag} ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); without network, download the file "
                            f"elsewhere and use openclip:{name}@/path/to/file") from None
    if not path:
        raise AnyclassError(f"open_clip gives no download location for {name}@{tag}")
    return Path(path)


def _warn_quickgelu(name: str, model_cfg: dict[str, Any], weights_quickgelu: bool, what: str) -> None:
    if bool(model_cfg.get("quick_gelu", False)) == weights_quickgelu:
        return
    if weights_quickgelu:
        base = name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name
        warnings.warn(f"{what} were trained with QuickGELU but config {name!r} uses GELU: features will be "
                      f"slightly off; use openclip:{base}-quickgelu@... instead", UserWarning, stacklevel=5)
    else:
        warnings.warn(f"{what} were trained with GELU but config {name!r} uses QuickGELU", UserWarning,
                      stacklevel=5)


def _create_model(name: str, preprocess_overrides: dict[str, Any] | None) -> nn.Module:
    """Instantiate the architecture on CPU with seeded random init (no download of any kind)."""
    import open_clip
    kwargs: dict[str, Any] = {"pretrained": None, "device": "cpu"}
    params = inspect.signature(open_clip.create_model).parameters
    if "pretrained_text" in params:
        kwargs["pretrained_text"] = False  # HF text towers: don't fetch base weights
    if preprocess_overrides and "force_preprocess_cfg" in params:
        kwargs["force_preprocess_cfg"] = preprocess_overrides
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip logs "initialized randomly"; we load weights next
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        try:
            return open_clip.create_model(name, **kwargs)
        except Exception as e:
            raise AnyclassError(f"cannot build open_clip model {name!r}: {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]}") from None
        finally:
            logging.disable(previous)


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Load a flat state dict with open_clip's key conversions; mismatches are a clear error."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        mine = getattr(model, key, None)
        if key in sd and isinstance(mine, torch.Tensor) and mine.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(mine.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None:
        sd["logit_bias"] = torch.zeros_like(model.logit_bias)
    sd.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    err = state_dict_mismatch(model, sd)
    if err:
        raise AnyclassError(f"checkpoint {source} does not fit open_clip model {name!r}: {err}")


def describe_preprocess(cfg: dict[str, Any]) -> str:
    """Exact, stable description of open_clip's eval transform for a PreprocessCfg dict."""
    size = cfg.get("size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    mode = cfg.get("resize_mode", "shortest")
    crop = {"shortest": "center", "longest": "center-pad", "squash": "none"}.get(mode, mode)
    interp = cfg.get("interpolation", "bicubic")
    interp = "bicubic" if interp == "random" else interp
    fmt = lambda v: "(" + ",".join(repr(float(x)) for x in (v if isinstance(v, (list, tuple)) else (v,) * 3)) + ")"
    return (f"openclip-eval|rgb|resize={mode}:{size[0]}x{size[1]}:{interp}:antialias|crop={crop}"
            f"|fill={cfg.get('fill_color', 0)}|to_tensor|mean={fmt(cfg.get('mean'))}|std={fmt(cfg.get('std'))}")


class OpenClipBackbone:
    """The :class:`~anyclass.backbones.base.VisionLanguageModel` protocol over an open_clip model."""

    def __init__(self, model: nn.Module, name: str, identity: str, weights_hash: str,
                 device: torch.device | str = "cpu") -> None:
        import open_clip
        from open_clip.model import get_model_preprocess_cfg
        from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

        self.model = freeze(model)
        #: run causal text towers only up to the last EOT (exact; False: the whole context)
        self.trim_text = True
        self.name = name
        self.identity = identity
        self.weights_hash = weights_hash
        self._pp_cfg = merge_preprocess_dict(PreprocessCfg(), get_model_preprocess_cfg(model))
        self.preprocess: Callable[[Image.Image], torch.Tensor] = image_transform_v2(
            PreprocessCfg(**self._pp_cfg), is_train=False)
        self.tokenizer: Callable[[Sequence[str]], torch.Tensor] = open_clip.get_tokenizer(name)
        cfg = open_clip.get_model_config(name) or {}
        self.embed_dim = int(cfg.get("embed_dim") or getattr(model.visual, "output_dim", 0))
        emb = self._token_embedding(required=False)
        self.text_width = int(emb.embedding_dim) if emb is not None else 0
        blocks = self._text_blocks()
        self.text_layers = len(blocks[0]) if blocks is not None else 0
        vit = self._vit(required=False)
        self.vision_width = int(vit.transformer.width) if vit is not None else 0
        self.vision_layers = len(vit.transformer.resblocks) if vit is not None else 0
        self.logit_scale, self.logit_bias = logit_scale_and_bias(model)
        self._placeholder_ids: dict[str, int] = {}
        self.device = torch.device("cpu")
        self.to(device)

    # -------------------------------------------------------------------------- building
    @classmethod
    def from_spec(cls, rest: str, device: torch.device | str = "cpu") -> "OpenClipBackbone":
        """Build from the part of ``openclip:NAME[@TAG|@PATH|@random]`` after the colon."""
        import open_clip
        name, kind, value = parse_spec(rest)
        if name.startswith(("hf-hub:", "local-dir:")):
            raise SpecError(f"openclip:{name} is not supported: use openclip:NAME@/path/to/checkpoint")
        _check_name(name)
        model_cfg = open_clip.get_model_config(name) or {}
        if kind == "random":
            model = _create_model(name, None)
            warnings.warn(f"openclip:{name} has random weights (seed {RANDOM_SEED}); its predictions are "
                          f"meaningless — give @TAG or @/path/to/checkpoint for trained weights",
                          UserWarning, stacklevel=4)
            return cls(model, name, f"openclip:{name}@random", state_dict_hash(model.state_dict()), device)
        if kind == "path":
            path = Path(str(value)).expanduser()
            if not path.is_file():
                raise SpecError(f"checkpoint file not found: {path} (in spec openclip:{rest})")
            if "openai" in path.name.lower():
                _warn_quickgelu(name, model_cfg, True, f"OpenAI weights ({path.name})")
            sd = load_state_dict(path)  # before building: refuse unsafe files early
            model = _create_model(name, None)
            _load_into(model, sd, str(path), name)
            return cls(model, name, f"openclip:{name}@file", file_sha256(path), device)
        tag = str(value)
        cfg = _pretrained_cfg(name, tag)
        _warn_quickgelu(name, model_cfg, bool(cfg.get("quick_gelu", False)), f"the {tag!r} weights")
        path = _download(name, tag, cfg)
        sd = load_state_dict(path)
        model = _create_model(name, cfg)
        _load_into(model, sd, str(path), name)
        return cls(model, name, f"openclip:{name}@{tag}", file_sha256(path), device)

    # -------------------------------------------------------------------------- protocol
    def to(self, device: torch.device | str) -> "OpenClipBackbone":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def preprocess_id(self) -> str:
        return describe_preprocess(self._pp_cfg)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.encode_image(images.to(self.device, non_blocking=True))
        return normalized(x)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        out = [self._encode_ids(self.tokenizer(texts[s]).to(self.device))
               for s in chunks(len(texts), TEXT_BATCH)]
        if not out:
            return torch.empty(0, self.embed_dim, device=self.device)
        return normalized(torch.cat(out))

    def embed_words(self, text: str) -> torch.Tensor:
        return word_embeddings(self.tokenizer, self._token_embedding(required=True), text)

    def encode_text_with_context(self, texts: Sequence[str], ctx: torch.Tensor, placeholder: str = "X",
                                 deep_ctx: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        texts = list(texts)
        emb = self._token_embedding(required=True)
        ctx = check_context(ctx, len(texts), self.text_width)
        blocks, batch_first = self._text_blocks() or ([], True)
        if not blocks and isinstance(deep_ctx, (list, tuple)) and deep_ctx:
            raise HookUnsupportedError(f"openclip:{self.name}: deep text context needs text transformer blocks "
                                       f"(open_clip's own or a BERT-like HF tower's), which this text tower lacks")
        deep = check_deep_context(deep_ctx, len(texts), ctx.shape[1], self.text_width, self.text_layers)
        ids = self.tokenizer(texts).to(self.device)
        starts = context_starts(ids, self._placeholder_id(placeholder), ctx.shape[1], texts, placeholder)
        with replace_token_embeddings(emb, starts, ctx), deep_context(blocks, starts, deep, batch_first):
            x = self._encode_ids(ids)
        return normalized(x)

    def encode_images_with_prompts(self, images: torch.Tensor,
                                   prompts: Sequence[torch.Tensor | None]) -> torch.Tensor:
        vit = self._vit(required=True)
        ps = check_prompts(prompts, images.shape[0], self.vision_width, self.vision_layers)
        with deep_prompts(vit.transformer.resblocks, ps, n_prefix=1,
                          batch_first=getattr(vit.transformer, "batch_first", True)):
            x = self.model.encode_image(images.to(self.device, non_blocking=True))
        return normalized(x)

    def encode_images_with_layer_inputs(
            self, images: torch.Tensor, prompts: Sequence[torch.Tensor | None] | None = None,
            layers: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised embeddings and the tokens [B, T, width] entering the first `layers`
        blocks (all by default), prompts included."""
        vit = self._vit(required=True)
        blocks = vit.transformer.resblocks
        bf = getattr(vit.transformer, "batch_first", True)
        ps = check_prompts(prompts, images.shape[0], self.vision_width, self.vision_layers)
        with deep_prompts(blocks, ps, n_prefix=1, batch_first=bf), \
                capture_inputs(blocks, len(blocks) if layers is None else layers, bf) as got:
            x = self.model.encode_image(images.to(self.device, non_blocking=True))
        return normalized(x), got

    # -------------------------------------------------------------------------- internals
    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """model.encode_text, run on the tokens up to the batch's last end-of-text token where
        that is exact: a causal CLIP text tower pooling the EOT token never lets a later
        (padding) position reach it, so CLIP's 77-token context is cut to the ~10–20 tokens a
        prompt uses — the text tower's cost, which dominates prompt learning and test-time
        tuning, falls by the same factor."""
        m = self.model
        pe, mask = getattr(m, "positional_embedding", None), getattr(m, "attn_mask", None)
        causal = (self.trim_text and isinstance(pe, nn.Parameter) and isinstance(mask, torch.Tensor)
                  and mask.dim() == 2 and getattr(m, "text_pool_type", "argmax") == "argmax"
                  and bool(torch.isinf(mask[0, 1:]).all()) and ids.shape[1] == pe.shape[0])
        if not causal:
            return m.encode_text(ids)
        n = int(ids.argmax(dim=-1).max()) + 1            # CLIP's EOT has the largest id
        if n >= ids.shape[1]:
            return m.encode_text(ids)
        params, buffers = m._parameters, m._buffers
        params["positional_embedding"] = nn.Parameter(pe[:n], requires_grad=False)
        buffers["attn_mask"] = mask[:n, :n]
        try:
            return m.encode_text(ids[:, :n])
        finally:
            params["positional_embedding"], buffers["attn_mask"] = pe, mask

    def _token_embedding(self, required: bool) -> nn.Module | None:
        m = self.model
        for owner in (m, getattr(m, "text", None)):
            if isinstance(getattr(owner, "token_embedding", None), nn.Embedding):
                return owner.token_embedding
        hf = getattr(getattr(m, "text", None), "transformer", None)  # open_clip's HFTextEncoder
        if hf is not None and hasattr(hf, "get_input_embeddings"):
            return hf.get_input_embeddings()
        if required:
            raise HookUnsupportedError(f"openclip:{self.name}: its text tower has no token-embedding layer, "
                                       f"so context vectors cannot be inserted")
        return None

    def _text_blocks(self) -> tuple[nn.ModuleList, bool] | None:
        """(text transformer blocks, batch_first): open_clip's own transformer (CLIP or a custom
        text tower; older ones run sequence-first) or a BERT-like HF text tower's layers."""
        text = getattr(self.model, "text", None)
        for owner in (self.model, text):
            t = getattr(owner, "transformer", None)
            if isinstance(getattr(t, "resblocks", None), nn.ModuleList):
                return t.resblocks, bool(getattr(t, "batch_first", True))
        layers = getattr(getattr(getattr(text, "transformer", None), "encoder", None), "layer", None)
        return (layers, True) if isinstance(layers, nn.ModuleList) else None

    def _vit(self, required: bool) -> nn.Module | None:
        from open_clip.transformer import VisionTransformer
        visual = self.model.visual
        if isinstance(visual, VisionTransformer):
            return visual
        if required:
            raise HookUnsupportedError(
                f"openclip:{self.name}: deep visual prompts need a ViT image tower, but its image tower is "
                f"{type(visual).__name__} (ResNet/timm towers have no token sequence to prompt); "
                f"the text hook still works")
        return None

    def _placeholder_id(self, placeholder: str) -> int:
        if placeholder not in self._placeholder_ids:
            self._placeholder_ids[placeholder] = placeholder_token_id(self.tokenizer, placeholder)
        return self._placeholder_ids[placeholder]

    def __repr__(self) -> str:
        return f"OpenClipBackbone({self.identity}, device={self.device})"


@BACKBONES.register("openclip")
def build_openclip(rest: str, device: torch.device | str = "cpu") -> OpenClipBackbone:
    return OpenClipBackbone.from_spec(rest, device)
