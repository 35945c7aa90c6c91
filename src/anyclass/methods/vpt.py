"""VPT-deep (Jia et al., ECCV 2022) on a vision-language model: learned prompt tokens
entering every transformer layer of the image tower; the classifier is the frozen zero-shot
text classifier ("a photo of a {}."), as in the CoOp-family comparisons.

    z = f(x; P_1 … P_L),   p(y=k|x) ∝ exp(s · cos(z, t′_k))

Our choices (the comparisons use several): 8 tokens per layer at all layers, N(0, 0.02²)
init; MaPLe's optimisation for its vision-prompting variant: SGD lr 0.0035, batch 4,
5 epochs, warm-up epoch, cosine.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from . import METHODS
from .prompt_parts import cosine_logits, image_features, prompt_params, zeroshot_text
from .prompted import PromptMethod


class DeepPrompts(nn.Module):
    def __init__(self, layers: int, tokens: int, width: int) -> None:
        super().__init__()
        self.prompts = prompt_params(layers, tokens, width)           # P_1..P_L


@METHODS.register("vpt")
class VPT(PromptMethod):
    recipe = dict(epochs=5, batch_size=4, lr=0.0035, optimizer="sgd")

    def __init__(self, n_tokens: int = 8, depth: int | None = None, **recipe) -> None:
        self.n_tokens = n_tokens
        self.depth = depth
        self._init_recipe(recipe)

    def make_module(self, backbone, classnames: Sequence[str]) -> nn.Module:
        layers = min(self.depth or backbone.vision_layers, backbone.vision_layers)
        return DeepPrompts(layers, self.n_tokens, backbone.vision_width)

    def vision_prompted(self) -> bool:
        return True

    def encode_classes(self, backbone, classnames: Sequence[str]) -> torch.Tensor:
        return zeroshot_text(backbone, classnames)                   # t′ (frozen)

    def forward(self, backbone, images: torch.Tensor, classes: Any) -> torch.Tensor:
        z = image_features(backbone, images, list(self.module_.prompts))
        return cosine_logits(backbone, z, classes)
