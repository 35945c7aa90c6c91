"""PromptSync (Khandelwal, CVPR 2024 Workshops): PromptAlign made class-aware. Its paper
gives the ideas, not the formulas; this is our construction (METHODS.md §4, docs/methods.md):

    p̄        = stopgrad( mean softmax over the image and its confident views S )       [K]
    L_align  = Σ_c p̄_c · 1/L Σ_l [ ½ mean|μ_l − μ̂_{l,c}| + ½ mean|σ²_l − σ̂²_{l,c}| ]
    L_disc   = −log softmax_c( cos(z, z̄_c) / τ )[ŷ],   ŷ = argmax p̄,  z = normalise(mean_S f)
    L        = H(p̄_S) + β L_align + λ L_disc

μ_l, σ²_l pool the tokens entering vision block l over S *and* token positions, as the class
prototypes μ̂_{l,c}, σ̂²_{l,c} do (methods/tta_stats.py); z̄_c is class c's mean source image
feature. Both prompt branches are tuned (MaPLe's P_j and F_j). β = 10, λ = 0.1, τ = 0.1 and
AdamW lr 5e-3 (TPT's; PromptAlign's DG step 4e-2 flips about half of a hard domain's predictions
whatever the loss, benchmarks/align_probe.py) were chosen on a val split
(benchmarks/tta_choose.py; docs/benchmarks.md). Ablations: `class_aware=False`
aligns to PromptAlign's class-agnostic statistics instead; `disc=0` drops L_disc; `steps`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import METHODS
from .promptalign import PromptAlign
from .tta import Step


@METHODS.register("promptsync")
class PromptSync(PromptAlign):
    defaults = dict(lr=5e-3)

    def __init__(self, init: str | None = None, stats: str | None = None, beta: float = 10.0,
                 layers: int = 3, disc: float = 0.1, tau: float = 0.1, class_aware: bool = True,
                 **common) -> None:
        self.disc = disc
        self.tau = tau
        self.class_aware = class_aware
        super().__init__(init, stats, beta, layers, **common)

    def prepare(self, backbone, classnames: Sequence[str]) -> "PromptSync":
        super().prepare(backbone, classnames)
        if self.class_aware or self.disc:
            self.protos_ = self.stats_.prototypes(classnames, str(self.stats))
        return self

    def extra_loss(self, step: Step) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        with torch.no_grad():                                            # p̄ (stop-gradient)
            both = torch.cat([step.logits0[:, None], step.logits], 1)
            p_bar = both.softmax(-1).mean(1)                             # [B, K]
        if self.beta and self.class_aware:
            cm, cv, _ = self.protos_
            h = torch.stack([l.flatten(1, 2) for l in step.layers], 1)  # [B, L, |S|·T, W]
            mu, var = h.mean(2), h.var(2, unbiased=False)                # [B, L, W]
            d = 0.5 * (mu[:, None] - cm[None]).abs().mean(-1) \
                + 0.5 * (var[:, None] - cv[None]).abs().mean(-1)         # [B, K, L]
            terms["align"] = self.beta * (p_bar * d.mean(-1)).sum(1)
        elif self.beta:
            terms["align"] = self.beta * self.global_alignment(step)
        if self.disc:
            z = F.normalize(step.feats.mean(1), dim=-1)                  # [B, D]
            sims = z @ self.protos_[2].t() / self.tau                    # [B, K]
            terms["disc"] = self.disc * F.cross_entropy(sims, p_bar.argmax(1), reduction="none")
        return terms
