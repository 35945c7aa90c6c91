"""One factory for every backbone spec (`scheme:rest`), open_clip-style.

Each backbone module registers its scheme with `@BACKBONES.register("scheme")` (schemes.py) on
a builder `(rest: str, device: str | torch.device) -> VisionLanguageModel`; modules are
imported lazily so that, e.g., transformers is only imported for `hf:` specs. With
lazy=True a spec built before comes back as a LazyBackbone (card.py).
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from .base import VisionLanguageModel
from .card import carded_backbone
from .schemes import BACKBONES, MODULES, build

__all__ = ["BACKBONES", "create_backbone", "default_device"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def create_backbone(spec: str = "builtin", device: str | torch.device | None = None,
                    lazy: bool = False) -> VisionLanguageModel:
    """`builtin`, `openclip:NAME[@TAG|@/path/ckpt]`, `hf:MODEL_ID_OR_DIR`.

    lazy=True: when this exact source was built before (its card, backbones/card.py), a
    LazyBackbone that builds the model only if something needs it — a run whose image
    features and text classifier are cached never does. Either way the result carries a
    `text_id`, so its text classifiers are cached on disk."""
    spec = spec.strip()
    scheme = spec.partition(":")[0]
    if scheme not in MODULES:
        raise SpecError(f"unknown backbone spec {spec!r}: expected builtin, openclip:NAME[@TAG|@PATH] or hf:ID")
    return carded_backbone(build, spec, torch.device(device) if device else default_device(), lazy)

