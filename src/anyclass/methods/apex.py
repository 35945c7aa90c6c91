"""APEX (Yang, Ko, Yun, EMNLP 2024): prompts and an adapter, made robust to how far the
test classes lie from the training ones (METHODS.md §3).

Learned: deep visual prompts (2 tokens per layer, N(0, 0.02²)), a shallow text prompt (the
2 words "a photo" of "a photo of a {class}.") and a linear adapter after the text tower,
t = Aᵀt̃ + b (A = I, b = 0 at init). Adaptive ensemble at test time, with t′ the frozen
zero-shot text features and C the training classes:

    d_avg = 1 − mean_j cos(t′_c, t′_j),  d_nn = 1 − max_j cos(t′_c, t′_j)      (j ∈ C)
    α_c = exp(−β · d_avg · 1[d_nn > ε]),  β = 4, ε = 0.05
    t_c = α_c (Aᵀt̃_c + b) + (1 − α_c) t̃_c;   z = ᾱ z_prompted + (1 − ᾱ) z_zero-shot

Training classes get α = 1. Settings: "base2new" prompts all layers, Adadelta lr 0.15,
15 epochs, batch 16; "transfer" (cross-dataset / DG) prompts 3 layers, lr 0.02, 6 epochs,
batch 32. Explicit recipe arguments override the setting.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import METHODS
from .prompt_parts import (context_template, cosine_logits, image_features, init_context,
                           prompt_params, texts_for, zeroshot_text)
from .prompted import PromptMethod

SETTINGS = {
    "base2new": dict(vision_depth=None, lr=0.15, epochs=15, batch_size=16),
    "transfer": dict(vision_depth=3, lr=0.02, epochs=6, batch_size=32),
}


class APEXModule(nn.Module):
    def __init__(self, ctx: torch.Tensor, depth: int, tokens: int, vision_width: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.ctx = nn.Parameter(ctx)                                   # shallow text prompt
        self.prompts = prompt_params(depth, tokens, vision_width)      # deep visual prompts
        self.adapter = nn.Linear(embed_dim, embed_dim)                 # t = Aᵀt̃ + b
        with torch.no_grad():
            self.adapter.weight.copy_(torch.eye(embed_dim))
            self.adapter.bias.zero_()


def ensemble_weights(t_eval: torch.Tensor, t_train: torch.Tensor, beta: float,
                     eps: float) -> torch.Tensor:
    """α_c per evaluated class from frozen zero-shot text features (rows normalised)."""
    cos = t_eval @ t_train.t()                                         # [K_eval, C]
    d_avg, d_nn = 1 - cos.mean(1), 1 - cos.max(1).values
    return torch.exp(-beta * d_avg * (d_nn > eps).to(cos.dtype))


@METHODS.register("apex")
class APEX(PromptMethod):
    recipe = dict(optimizer="adadelta")

    def __init__(self, setting: str = "base2new", n_ctx: int = 2, ctx_init: str = "a photo of a",
                 n_tokens: int = 2, vision_depth: int | None = -1, ensemble: bool = True,
                 beta: float = 4.0, eps: float = 0.05, **recipe) -> None:
        if setting not in SETTINGS:
            raise ValueError(f"APEX setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
        preset = SETTINGS[setting]
        self.setting = setting
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.n_tokens = n_tokens
        # -1: the setting's depth (None = every layer)
        self.vision_depth = preset["vision_depth"] if vision_depth == -1 else vision_depth
        self.ensemble = ensemble
        self.beta = beta
        self.eps = eps
        self._init_recipe({**{k: v for k, v in preset.items() if k != "vision_depth"}, **recipe})

    def make_module(self, backbone, classnames: Sequence[str]) -> nn.Module:
        depth = min(self.vision_depth or backbone.vision_layers, backbone.vision_layers)
        return APEXModule(init_context(backbone, self.n_ctx, self.ctx_init), depth,
                          self.n_tokens, backbone.vision_width, backbone.embed_dim)

    def vision_prompted(self) -> bool:
        return True

    def alphas(self, backbone, classnames: Sequence[str]) -> torch.Tensor:
        """α_c of each class (1 for every class when the ensemble is off)."""
        if not self.ensemble:
            return torch.ones(len(classnames), device=backbone.device)
        return ensemble_weights(zeroshot_text(backbone, classnames),
                                zeroshot_text(backbone, self.classnames_), self.beta, self.eps)

    def encode_classes(self, backbone, classnames: Sequence[str]) -> tuple[torch.Tensor, float]:
        m = self.module_
        texts = texts_for(context_template(self.n_ctx, self.ctx_init), classnames)
        t_tilde = backbone.encode_text_with_context(texts, m.ctx).float()      # t̃
        a = self.alphas(backbone, classnames)[:, None]
        t = a * m.adapter(t_tilde) + (1 - a) * t_tilde                        # t_c
        return F.normalize(t, dim=-1), float(a.mean())

    def forward(self, backbone, images: torch.Tensor, classes: Any) -> torch.Tensor:
        t, a_bar = classes
        z = image_features(backbone, images, list(self.module_.prompts))
        if a_bar < 1:                                                          # new classes
            z = F.normalize(a_bar * z + (1 - a_bar) * image_features(backbone, images), dim=-1)
        return cosine_logits(backbone, z, t)
