"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context conditioned on each image.

    π = h_θ(f(x)),  v_m(x) = v_m + π,  t_k(x) = g([v_1(x)] … [v_M(x)] [CLASS_k] .)

h_θ is the paper's Meta-Net, Linear(D, D/16)–ReLU–Linear(D/16, text_width); M = 4 from "a
photo of a". The reference encodes the K class texts of one image at a time (batch 1);
here a batch of B images is one text-encoder call over B·K texts (chunked to bound memory).
Optimisation: SGD lr 0.002, batch 1, 10 epochs, warm-up epoch, cosine.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from . import METHODS
from .prompt_parts import context_template, image_features, init_context, texts_for
from .prompted import PromptMethod

#: at most this many texts per text-encoder call when predicting
MAX_TEXTS = 4096


class ConditionalContext(nn.Module):
    def __init__(self, ctx: torch.Tensor, embed_dim: int) -> None:
        super().__init__()
        self.ctx = nn.Parameter(ctx)                                  # v  [M, W]
        w = ctx.shape[1]
        self.meta_net = nn.Sequential(nn.Linear(embed_dim, embed_dim // 16), nn.ReLU(),
                                      nn.Linear(embed_dim // 16, w))  # h_θ


@METHODS.register("cocoop")
class CoCoOp(PromptMethod):
    recipe = dict(epochs=10, batch_size=1, lr=0.002, optimizer="sgd")

    def __init__(self, n_ctx: int = 4, ctx_init: str | None = "a photo of a", **recipe) -> None:
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self._init_recipe(recipe)

    def make_module(self, backbone, classnames: Sequence[str]) -> nn.Module:
        return ConditionalContext(init_context(backbone, self.n_ctx, self.ctx_init),
                                  backbone.embed_dim)

    def encode_classes(self, backbone, classnames: Sequence[str]) -> list[str]:
        return texts_for(context_template(self.n_ctx, self.ctx_init), classnames)

    def forward(self, backbone, images: torch.Tensor, classes: Any) -> torch.Tensor:
        f = image_features(backbone, images)                          # [B, D]
        k = len(classes)
        m = self.module_
        step = max(1, MAX_TEXTS // k)
        out = []
        for s in range(0, len(f), step):
            fb = f[s:s + step]
            ctx = m.ctx + m.meta_net(fb)[:, None, :]                  # v_m(x)  [b, M, W]
            ctx = ctx.repeat_interleave(k, dim=0)                     # one per (image, class)
            t = backbone.encode_text_with_context(list(classes) * len(fb), ctx).float()
            t = t.view(len(fb), k, -1)                                # t_k(x)  [b, K, D]
            out.append(backbone.logit_scale * torch.einsum("bd,bkd->bk", fb, t)
                       + backbone.logit_bias)
        return torch.cat(out)
