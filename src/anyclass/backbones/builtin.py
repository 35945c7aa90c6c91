"""The offline built-in model as a backbone: ``builtin``, ``builtin:<world>`` or
``builtin:/path/to/model_dir``.

``builtin`` opens (building on first use) the offline world selected by $ANYCLASS_WORLD and
loads its model; ``builtin:mini`` / ``builtin:full`` name the world configuration; a path
loads a model directory written by `anyclass.world.train` (model.safetensors + config.json,
never a pickle). The model is a small ViT trained LiT-style against the frozen MiniLM
sentence encoder (`anyclass.world.model`), so the CoOp and deep visual prompt hooks are native:
the model's own forward takes context vectors and deep prompts. Deep text context (MaPLe) uses
the generic pre-hooks of :mod:`.hooks` on the MiniLM's layers, so `anyclass.world` stays as is.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import SpecError
from ..world.model import CONFIG_FILE, IMAGE_MEAN, IMAGE_STD, WEIGHTS_FILE, BuiltinModel
from .schemes import BACKBONES
from .hooks import word_embeddings, PromptError, check_context, check_deep_context, check_prompts, context_starts, deep_context
from .weights import file_sha256

TEXT_BATCH = 256


class BuiltinPreprocess:
    """PIL image -> normalised CHW float tensor: RGB (alpha composited onto white), shorter
    side resized to `size` (bicubic), centre crop, scale to [0,1], (x - mean) / std.
    Identical to what training fed the model for the world's size×size renders. A class, not a
    closure, so DataLoader workers can pickle it."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = int(size)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)

    def describe(self) -> str:
        f = lambda v: "(" + ",".join(repr(float(x)) for x in v.flatten()) + ")"
        return (f"builtin|rgb:alpha-over-white|resize=shortest:{self.size}:bicubic|"
                f"crop=center:{self.size}x{self.size}|to_tensor|mean={f(self.mean)}|std={f(self.std)}")

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """The PIL half (uint8 CHW): what DataLoader workers compute; the rest is batched."""
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        if (w, h) != (self.size, self.size):
            s = self.size / min(w, h)
            nw, nh = max(self.size, round(w * s)), max(self.size, round(h * s))
            img = img.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return (self.to_uint8(img).float().div_(255) - self.mean) / self.std

    def __repr__(self) -> str:
        return f"BuiltinPreprocess({self.describe()})"


class BuiltinCLIP:
    """The `VisionLanguageModel` protocol over `anyclass.world.model.BuiltinModel`.

    All weights are frozen (requires_grad False) and the module stays in eval mode; the
    encoders run without no_grad so gradients reach context vectors and prompts."""

    def __init__(self, model: BuiltinModel, identity: str, weights_hash: str,
                 model_dir: Path | None = None, device: torch.device | str = "cpu") -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.identity = identity
        self.weights_hash = weights_hash
        vcfg = model.cfg.vision
        conf = self._config()
        self._preprocess = BuiltinPreprocess(vcfg.image_size, conf.get("image_mean") or IMAGE_MEAN,
                                             conf.get("image_std") or IMAGE_STD)
        self.preprocess: Callable[[Image.Image], torch.Tensor] = self._preprocess
        self.tokenizer: Callable[[Sequence[str]], torch.Tensor] = model.text.tokenize
        self.logit_scale = float(model.logit_scale.detach())
        self.logit_bias = 0.0                     # CLIP-style softmax model: no bias
        self.embed_dim = int(vcfg.embed_dim)
        self.text_width = int(model.text.width)
        self.text_layers = len(model.text.bert.encoder.layer)
        self.vision_width = int(vcfg.width)
        self.vision_layers = int(vcfg.depth)
        self.image_size = int(vcfg.image_size)
        self.device = torch.device("cpu")
        self.to(device)

    # ------------------------------------------------------------------------- building
    @classmethod
    def from_dir(cls, model_dir: Path | str, device: torch.device | str = "cpu",
                 identity: str | None = None) -> "BuiltinCLIP":
        """Load a model directory (model.safetensors + config.json)."""
        d = Path(model_dir).expanduser()
        if not (d / WEIGHTS_FILE).is_file() or not (d / CONFIG_FILE).is_file():
            raise SpecError(f"{d} is not a built-in model directory (needs {WEIGHTS_FILE} and "
                            f"{CONFIG_FILE})")
        model = BuiltinModel.load(d)
        if identity is None:
            world = json.loads((d / CONFIG_FILE).read_text()).get("meta", {}).get("world")
            identity = f"builtin:{world or 'custom'}"
        return cls(model, identity, file_sha256(d / WEIGHTS_FILE), d, device)

    def _config(self) -> dict:
        if self.model_dir is None or not (self.model_dir / CONFIG_FILE).exists():
            return {}
        return json.loads((self.model_dir / CONFIG_FILE).read_text())

    # ------------------------------------------------------------------------- protocol
    def to(self, device: torch.device | str) -> "BuiltinCLIP":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def preprocess_id(self) -> str:
        return self._preprocess.describe()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(images.to(self.device, non_blocking=True))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        return torch.cat([self.model.encode_texts(texts[s:s + TEXT_BATCH])
                          for s in range(0, len(texts), TEXT_BATCH)])

    def embed_words(self, text: str) -> torch.Tensor:
        return word_embeddings(self.tokenizer, self.model.text.bert.embeddings.word_embeddings, text)

    def encode_text_with_context(self, texts: Sequence[str], ctx: torch.Tensor, placeholder: str = "X",
                                 deep_ctx: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ctx = check_context(ctx, len(texts), self.text_width)
        deep = check_deep_context(deep_ctx, len(texts), ctx.shape[1], self.text_width, self.text_layers)
        try:
            starts = None  # the model finds ctx's positions itself; deep_ctx needs them here too
            if any(d is not None for d in deep):
                starts = context_starts(self.model.text.tokenize(texts), self.model.placeholder_id(placeholder),
                                        ctx.shape[1], texts, placeholder)
            with deep_context(self.model.text.bert.encoder.layer, starts, deep):
                return self.model.encode_text_with_context(texts, ctx, placeholder)
        except ValueError as e:
            raise PromptError(str(e)) from None

    def encode_images_with_prompts(self, images: torch.Tensor,
                                   prompts: Sequence[torch.Tensor | None] | None) -> torch.Tensor:
        ps = check_prompts(prompts, images.shape[0], self.vision_width, self.vision_layers)
        return self.model.encode_images(images.to(self.device, non_blocking=True), ps)

    # ------------------------------------------------------------------------- extras
    def encode_images_with_layer_inputs(
            self, images: torch.Tensor, prompts: Sequence[torch.Tensor | None] | None = None,
            layers: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised embeddings and the token sequence [B, T, vision_width] entering each of
        the first `layers` blocks (all by default), for PromptAlign-style alignment."""
        ps = check_prompts(prompts, images.shape[0], self.vision_width, self.vision_layers)
        out, inputs = self.model.visual(images.to(self.device), ps, return_layer_inputs=True)
        return torch.nn.functional.normalize(out, dim=-1), inputs[:layers]

    def source_layer_stats(self) -> dict[str, torch.Tensor] | None:
        """Mean/variance ([vision_layers, vision_width]) of each block's input tokens over the
        pretraining images, saved at training time; None if the directory has none."""
        p = self.model_dir / "layer_stats.safetensors" if self.model_dir else None
        if p is None or not p.exists():
            return None
        from safetensors.torch import load_file
        return {k: v.to(self.device) for k, v in load_file(str(p)).items()}

    def __repr__(self) -> str:
        return (f"BuiltinCLIP({self.identity}, vit {self.vision_layers}x{self.vision_width}, "
                f"{self.image_size}px, device={self.device})")


@BACKBONES.register("builtin")
def build_builtin(rest: str, device: torch.device | str = "cpu") -> BuiltinCLIP:
    """`builtin` (world from $ANYCLASS_WORLD), `builtin:<world name>`, `builtin:<model dir>`."""
    rest = rest.strip()
    if rest and ("/" in rest or "\\" in rest or rest.startswith(("~", ".")) or Path(rest).is_dir()):
        return BuiltinCLIP.from_dir(rest, device)
    from ..world.build import ensure_world
    from ..world.config import get_config
    world = ensure_world(get_config(rest or None))
    from ..world.train import model_key
    return BuiltinCLIP.from_dir(world.model_dir, device, identity=f"builtin:{model_key(world.cfg)}")
