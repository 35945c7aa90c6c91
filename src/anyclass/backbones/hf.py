"""Hugging Face backbones: ``hf:MODEL_ID_OR_LOCAL_DIR`` for transformers CLIPModel and SiglipModel.

A local directory (``save_pretrained`` layout) loads offline; a hub id is a download the user
asked for. Weights are loaded by transformers (safetensors preferred; its ``.bin`` path uses
weights-only loading). The model is kept in float32; callers may use autocast.

* Preprocessing is rebuilt from the model's image-processor config (size, crop, resample,
  rescale, mean/std) as a picklable torchvision transform (PIL -> CHW tensor).
* Tokenisation pads to the model's maximum length (SigLIP was trained that way and pools the
  last position; CLIP pools the EOS token under a causal mask, so padding does not matter).
* transformers 5 returns output objects from ``get_*_features``: the embedding is
  ``pooler_output`` (tensors, as older versions return, are accepted too).
* Prompt hooks (see :mod:`.hooks`): CLIP — context replaces token embeddings (deep context the
  text layers' inputs at the same positions), EOS pooling as the model does; deep prompts after
  the class token, class-token pooling. SigLIP — same text hook (last-token pooling as the model
  does); deep prompts at the front of the patch tokens (there is
  no class token) and removed before the attention-pooling head, which so pools only the
  patch tokens.
"""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import nn

from ..errors import AnyclassError, SpecError
from .schemes import BACKBONES
from .hooks import (word_embeddings, logit_scale_and_bias, capture_inputs, check_context, check_deep_context, check_prompts, chunks, context_starts,
                    deep_context, deep_prompts, freeze, normalized, placeholder_token_id, replace_token_embeddings)
from .weights import state_dict_hash

SUPPORTED = ("clip", "siglip")
_DTYPE_KW = "dtype" if int(version("transformers").split(".")[0]) >= 5 else "torch_dtype"
TEXT_BATCH = 256
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resample codes -> names understood by torchvision's InterpolationMode
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _pooled(out: Any) -> torch.Tensor:
    """Embedding from get_*_features: a tensor (transformers 4) or an output object (5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise AnyclassError(f"unexpected output {type(out).__name__} from the model (no pooler_output)")
    return pooled


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


class _Rescale:
    """Multiply by a constant (image processors with rescale_factor != 1/255)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def __repr__(self) -> str:
        return f"Rescale({self.factor!r})"


def preprocess_from_config(cfg: dict[str, Any]) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """(transform, exact description) from an image-processor config dict."""
    from torchvision import transforms as T
    steps: list[Callable] = []
    desc: list[str] = ["hf"]
    if cfg.get("do_convert_rgb", True):
        steps.append(_to_rgb)
        desc.append("rgb")
    resample = cfg.get("resample", 3)
    interp = _RESAMPLE.get(int(resample), "bicubic") if not isinstance(resample, str) else resample.lower()
    mode = T.InterpolationMode(interp)
    size = cfg.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if cfg.get("do_resize", True) and size:
        if "shortest_edge" in size:
            steps.append(T.Resize(int(size["shortest_edge"]), interpolation=mode))
            desc.append(f"resize=shortest:{int(size['shortest_edge'])}:{interp}")
        elif "height" in size and "width" in size:
            hw = (int(size["height"]), int(size["width"]))
            steps.append(T.Resize(hw, interpolation=mode))
            desc.append(f"resize={hw[0]}x{hw[1]}:{interp}")
        else:
            raise AnyclassError(f"unsupported image-processor size {size}")
    crop = cfg.get("crop_size")
    if cfg.get("do_center_crop", False) and crop:
        hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
        steps.append(T.CenterCrop(hw))
        desc.append(f"crop=center:{hw[0]}x{hw[1]}")
    steps.append(T.ToTensor())  # /255
    factor = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
    if abs(factor * 255 - 1) > 1e-9:
        steps.append(_Rescale(factor * 255))
    desc.append(f"rescale={factor!r}")
    if cfg.get("do_normalize", True):
        mean = tuple(float(v) for v in cfg.get("image_mean", _CLIP_MEAN))
        std = tuple(float(v) for v in cfg.get("image_std", _CLIP_STD))
        steps.append(T.Normalize(mean, std))
        desc.append(f"mean={mean}|std={std}".replace(" ", ""))
    return T.Compose(steps), "|".join(desc)


def _default_processor_cfg(model_type: str, image_size: int) -> dict[str, Any]:
    if model_type == "siglip":
        return {"size": {"height": image_size, "width": image_size}, "resample": 2,
                "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)}
    return {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
            "do_center_crop": True, "resample": 3, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD}


class HFTokenize:
    """Strings -> input_ids [N, max_length] (padded to the maximum length, truncated)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"]


class HFClipBackbone:
    """The :class:`~anyclass.backbones.base.VisionLanguageModel` protocol over transformers
    CLIPModel / SiglipModel."""

    def __init__(self, model: nn.Module, tokenizer: Any, processor_cfg: dict[str, Any], identity: str,
                 device: torch.device | str = "cpu", weights_hash: str | None = None) -> None:
        self.model = freeze(model)
        cfg = model.config
        self.model_type: str = cfg.model_type
        if self.model_type not in SUPPORTED:
            raise SpecError(f"{identity}: model type {self.model_type!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED)})")
        tcfg, vcfg = cfg.text_config, cfg.vision_config
        self.identity = identity
        self.weights_hash = weights_hash or state_dict_hash(model.state_dict())
        self.tokenizer = HFTokenize(tokenizer, int(tcfg.max_position_embeddings))
        self.preprocess, self._preprocess_id = preprocess_from_config(processor_cfg)
        if self.model_type == "clip":
            self.embed_dim = int(cfg.projection_dim)
        else:
            self.embed_dim = int(getattr(tcfg, "projection_size", None) or vcfg.hidden_size)
        self.text_width = int(tcfg.hidden_size)
        self.text_layers = len(model.text_model.encoder.layers)
        self.vision_width = int(vcfg.hidden_size)
        self.vision_layers = len(model.vision_model.encoder.layers)
        self.logit_scale, self.logit_bias = logit_scale_and_bias(model)
        self._placeholder_ids: dict[str, int] = {}
        self.device = torch.device("cpu")
        self.to(device)

    # -------------------------------------------------------------------------- building
    @classmethod
    def from_spec(cls, rest: str, device: torch.device | str = "cpu") -> "HFClipBackbone":
        """Build from ``MODEL_ID_OR_LOCAL_DIR`` (the part of ``hf:...`` after the colon)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel, SiglipModel
        src = rest.strip()
        if not src:
            raise SpecError("hf spec needs a model id or a local directory: hf:openai/clip-vit-base-patch16 "
                            "or hf:/path/to/saved_model")
        local = Path(src).expanduser()
        is_dir = local.is_dir()
        if not is_dir and (src.startswith(("/", ".", "~")) or local.exists() or src.count("/") > 1):
            raise SpecError(f"hf model directory not found: {local} (in spec hf:{rest})")
        where = str(local) if is_dir else src
        kw: dict[str, Any] = {"local_files_only": True} if is_dir else {}
        try:
            config = AutoConfig.from_pretrained(where, **kw)
        except Exception as e:
            hint = "" if is_dir else " (a hub id needs network, or a copy in the HF cache)"
            raise AnyclassError(f"cannot load hf:{src}: {_short(e)}{hint}") from None
        model_cls = {"clip": CLIPModel, "siglip": SiglipModel}.get(config.model_type)
        if model_cls is None:
            raise SpecError(f"hf:{src}: model type {config.model_type!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED)})")
        try:
            model = model_cls.from_pretrained(where, **{_DTYPE_KW: torch.float32}, **kw)
            tokenizer = AutoTokenizer.from_pretrained(where, **kw)
        except Exception as e:
            raise AnyclassError(f"cannot load hf:{src}: {_short(e)}") from None
        processor_cfg = _processor_cfg(where, kw, config, AutoImageProcessor)
        name = f"local/{local.resolve().name}" if is_dir else src
        return cls(model, tokenizer, processor_cfg, f"hf:{config.model_type}:{name}", device)

    # -------------------------------------------------------------------------- protocol
    def to(self, device: torch.device | str) -> "HFClipBackbone":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def preprocess_id(self) -> str:
        return self._preprocess_id

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=images.to(self.device, non_blocking=True))
        return normalized(_pooled(out))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        out = [self._encode_ids(self.tokenizer(texts[s]).to(self.device)) for s in chunks(len(texts), TEXT_BATCH)]
        if not out:
            return torch.empty(0, self.embed_dim, device=self.device)
        return normalized(torch.cat(out))

    def embed_words(self, text: str) -> torch.Tensor:
        return word_embeddings(self.tokenizer, self.model.text_model.embeddings.token_embedding, text)

    def encode_text_with_context(self, texts: Sequence[str], ctx: torch.Tensor, placeholder: str = "X",
                                 deep_ctx: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        texts = list(texts)
        ctx = check_context(ctx, len(texts), self.text_width)
        deep = check_deep_context(deep_ctx, len(texts), ctx.shape[1], self.text_width, self.text_layers)
        ids = self.tokenizer(texts).to(self.device)
        starts = context_starts(ids, self._placeholder_id(placeholder), ctx.shape[1], texts, placeholder)
        tm = self.model.text_model
        with replace_token_embeddings(tm.embeddings.token_embedding, starts, ctx), \
                deep_context(tm.encoder.layers, starts, deep):
            x = self._encode_ids(ids)
        return normalized(x)

    def encode_images_with_prompts(self, images: torch.Tensor,
                                   prompts: Sequence[torch.Tensor | None]) -> torch.Tensor:
        ps = check_prompts(prompts, images.shape[0], self.vision_width, self.vision_layers)
        n_prefix = 1 if self.model_type == "clip" else 0  # CLIP's class token; SigLIP has none
        with deep_prompts(self.model.vision_model.encoder.layers, ps, n_prefix=n_prefix):
            return self.encode_images(images)

    def encode_images_with_layer_inputs(
            self, images: torch.Tensor, prompts: Sequence[torch.Tensor | None] | None = None,
            layers: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised embeddings and the tokens [B, T, width] entering the first `layers`
        encoder layers (all by default), prompts included."""
        blocks = self.model.vision_model.encoder.layers
        ps = check_prompts(prompts, images.shape[0], self.vision_width, self.vision_layers)
        n_prefix = 1 if self.model_type == "clip" else 0
        with deep_prompts(blocks, ps, n_prefix=n_prefix), \
                capture_inputs(blocks, len(blocks) if layers is None else layers) as got:
            x = self.encode_images(images)
        return x, got

    # -------------------------------------------------------------------------- internals
    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        # no attention mask: CLIP pools EOS under a causal mask; SigLIP was trained without one
        return _pooled(self.model.get_text_features(input_ids=ids))

    def _placeholder_id(self, placeholder: str) -> int:
        if placeholder not in self._placeholder_ids:
            self._placeholder_ids[placeholder] = placeholder_token_id(self.tokenizer, placeholder)
        return self._placeholder_ids[placeholder]

    def __repr__(self) -> str:
        return f"HFClipBackbone({self.identity}, device={self.device})"


def _processor_cfg(where: str, kw: dict[str, Any], config: Any, auto_cls: Any) -> dict[str, Any]:
    """The image processor's settings as a dict; model-type defaults (with a warning) if absent."""
    import warnings
    try:
        proc = auto_cls.from_pretrained(where, **kw)
        d = proc.to_dict()
        d = {k: (v.value if hasattr(v, "value") else v) for k, v in d.items()}  # PIL enum -> int
        return d
    except Exception as e:
        warnings.warn(f"hf:{where}: no usable image-processor config ({_short(e)}); using "
                      f"{config.model_type} defaults", UserWarning, stacklevel=5)
        return _default_processor_cfg(config.model_type, int(config.vision_config.image_size))


def _short(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return f"{type(e).__name__}: {s[:240]}"


@BACKBONES.register("hf")
def build_hf(rest: str, device: torch.device | str = "cpu") -> HFClipBackbone:
    return HFClipBackbone.from_spec(rest, device)
