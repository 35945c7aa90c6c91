"""Zero-shot CLIP: logits = s · f W (METHODS.md §0). The baseline every method builds on."""
from __future__ import annotations

import torch

from . import METHODS
from .base import FeatureMethod, FeatureSet


@METHODS.register("zeroshot")
class ZeroShot(FeatureMethod):
    needs_train = False
    transfers = True

    def __init__(self, logit_scale: float = 100.0) -> None:
        self.logit_scale = logit_scale

    def fit(self, text_weights: torch.Tensor, train: FeatureSet | None = None,
            val: FeatureSet | None = None) -> "ZeroShot":
        self.W_ = text_weights.float()
        return self

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * features.float() @ self.W_        # s · f W
