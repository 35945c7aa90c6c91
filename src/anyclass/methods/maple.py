"""MaPLe (Khattak et al., CVPR 2023): multimodal prompts with a text→vision coupling.

Text: P_0 = the 2 context words of "X X of a {class}." (init "a photo"), and new learned
tokens P_j replacing them at the input of text layers j = 1 … J−1. Vision: the prompts of
layer j are coupled to the text ones, P̃_j = F_j(P_j) (a linear map text_width → vision_width
per layer). J = 9 of 12 layers in the paper (min(J, depth) on shallower towers).
Optimisation: SGD lr 0.0035, batch 4, 5 epochs (base-to-new; 2 for ImageNet), warm-up,
cosine.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from . import METHODS
from .prompt_parts import (context_template, cosine_logits, image_features, init_context,
                           prompt_params, texts_for)
from .prompted import PromptMethod


class MultimodalPrompts(nn.Module):
    def __init__(self, ctx: torch.Tensor, depth: int, text_width: int, vision_width: int) -> None:
        super().__init__()
        self.ctx = nn.Parameter(ctx)                                            # P_0
        self.deep = prompt_params(depth - 1, ctx.shape[0], text_width)          # P_1..P_{J-1}
        self.couple = nn.ModuleList(nn.Linear(text_width, vision_width)         # F_0..F_{J-1}
                                    for _ in range(depth))

    def vision_prompts(self) -> list[torch.Tensor]:
        return [f(p) for f, p in zip(self.couple, [self.ctx, *self.deep])]      # P̃_j = F_j(P_j)


@METHODS.register("maple")
class MaPLe(PromptMethod):
    recipe = dict(epochs=5, batch_size=4, lr=0.0035, optimizer="sgd")

    def __init__(self, n_ctx: int = 2, ctx_init: str | None = "a photo of a", depth: int = 9,
                 **recipe) -> None:
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.depth = depth
        self._init_recipe(recipe)

    def make_module(self, backbone, classnames: Sequence[str]) -> nn.Module:
        depth = max(1, min(self.depth, backbone.vision_layers, backbone.text_layers))
        return MultimodalPrompts(init_context(backbone, self.n_ctx, self.ctx_init), depth,
                                 backbone.text_width, backbone.vision_width)

    def vision_prompted(self) -> bool:
        return True

    def encode_classes(self, backbone, classnames: Sequence[str]) -> tuple[torch.Tensor, list]:
        m = self.module_
        texts = texts_for(context_template(self.n_ctx, self.ctx_init), classnames)
        t = backbone.encode_text_with_context(texts, m.ctx, deep_ctx=list(m.deep)).float()
        return t, m.vision_prompts()

    def forward(self, backbone, images: torch.Tensor, classes: Any) -> torch.Tensor:
        t, vprompts = classes
        return cosine_logits(backbone, image_features(backbone, images, vprompts), t)
