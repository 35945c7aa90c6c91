"""PromptAlign (Samadh et al., NeurIPS 2023): TPT on MaPLe's multimodal prompts plus the
alignment of the test views' token statistics to the source's.

    L = H(p̄) + β · 1/L Σ_{l<L} [ ½ mean|μ_l − μ̂_l| + ½ mean|σ²_l − σ̂²_l| ]

μ_l, σ²_l: mean and (biased) variance over the confident views S of the tokens entering vision
block l (per token position and channel, prompt tokens included); μ̂_l, σ̂²_l: the same over
the proxy source (methods/tta_stats.py, `anyclass tta stats`). β = 100, L = 3 blocks (the
reference's loop reads blocks 0–1 while dividing by 3, an off-by-one; here blocks 0–2 as its
text intends), AdamW lr 4e-2 (domain generalisation; 5e-4 for cross-dataset), 1 step, 64
crop+flip views, all prompt parameters tuned (text P_j, couplings F_j), reset per image.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import METHODS
from .tta import Step, TestTimeMethod, TTAError


@METHODS.register("promptalign")
class PromptAlign(TestTimeMethod):
    tunes_vision = True
    defaults = dict(lr=4e-2)

    def __init__(self, init: str | None = None, stats: str | None = None, beta: float = 100.0,
                 layers: int = 3, **common) -> None:
        self.init = init
        self.stats = stats
        self.beta = beta
        self.layers = layers
        self._init_common(common)

    @property
    def align_layers(self) -> int:
        return self.layers

    def prepare(self, backbone, classnames: Sequence[str]) -> "PromptAlign":
        from .tta_stats import SourceStats
        super().prepare(backbone, classnames)
        if self.stats is None:
            raise TTAError(f"{type(self).__name__} aligns to source statistics: pass stats=FILE "
                           f"(`anyclass tta stats` makes one)")
        self.stats_ = SourceStats.load(self.stats)
        self.stats_.check(backbone, self.init_, self.layers, str(self.stats))
        self.stats_.to(backbone.device)
        return self

    def global_alignment(self, step: Step) -> torch.Tensor:
        """1/L Σ_l ½ mean|μ_l − μ̂_l| + ½ mean|σ²_l − σ̂²_l| per image: [B]."""
        st = self.stats_
        d = [0.5 * (h.mean(1) - st.mean[l]).abs().mean((-2, -1))
             + 0.5 * (h.var(1, unbiased=False) - st.var[l]).abs().mean((-2, -1))
             for l, h in enumerate(step.layers)]                     # h: [B, |S|, T, W]
        return torch.stack(d).mean(0)

    def extra_loss(self, step: Step) -> dict[str, torch.Tensor]:
        return {"align": self.beta * self.global_alignment(step)} if self.beta else {}
