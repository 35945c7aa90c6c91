"""CoOp (Zhou et al., IJCV 2022): learned context words shared by all classes.

    t_k = g([v]_1 … [v]_M [CLASS_k] .)        p(y=k|x) ∝ exp(s · cos(f(x), t_k))

M = 16 randomly initialised (N(0, 0.02²)) or M = 4 from "a photo of a"; class token at the
end; only v is learned (text tower). The paper's optimisation: SGD lr 0.002 (momentum 0.9,
weight decay 5e-4), batch 32, one constant warm-up epoch at 1e-5, cosine; 200 epochs at
16 shots (the paper: 50 for 1 shot, 100 for 2/4, 200 for 8/16 — pass `epochs`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from . import METHODS
from .prompt_parts import context_template, cosine_logits, image_features, init_context, texts_for
from .prompted import PromptMethod


class Context(nn.Module):
    def __init__(self, ctx: torch.Tensor) -> None:
        super().__init__()
        self.ctx = nn.Parameter(ctx)                              # v_1..v_M  [M, text_width]


@METHODS.register("coop")
class CoOp(PromptMethod):
    recipe = dict(epochs=200, batch_size=32, lr=0.002, optimizer="sgd")

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None, **recipe) -> None:
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self._init_recipe(recipe)

    def make_module(self, backbone, classnames: Sequence[str]) -> nn.Module:
        return Context(init_context(backbone, self.n_ctx, self.ctx_init))

    def encode_classes(self, backbone, classnames: Sequence[str]) -> torch.Tensor:
        texts = texts_for(context_template(self.n_ctx, self.ctx_init), classnames)
        return backbone.encode_text_with_context(texts, self.module_.ctx).float()   # t_k

    def forward(self, backbone, images: torch.Tensor, classes: Any) -> torch.Tensor:
        return cosine_logits(backbone, image_features(backbone, images), classes)
