"""The backbone scheme registry: `scheme` -> builder `(rest, device) -> VisionLanguageModel`.

A module of its own, below the factory: the factory also consults the start-up cards
(card.py), which read the open_clip spec parser, and open_clip's module registers its scheme
here — so nothing imports the factory back (no import circle).
"""
from __future__ import annotations

import importlib

import torch

from ..registry import Registry
from .base import VisionLanguageModel

BACKBONES: Registry[VisionLanguageModel] = Registry("backbone scheme")

#: scheme -> module that registers it (imported lazily: transformers only for `hf:` specs)
MODULES = {"openclip": "openclip", "hf": "hf", "builtin": "builtin"}


def build(spec: str, device: torch.device) -> VisionLanguageModel:
    """Build `scheme:rest` with the scheme's registered builder (no cards, no laziness)."""
    scheme, _, rest = spec.partition(":")
    importlib.import_module(f"{__package__}.{MODULES[scheme]}")
    return BACKBONES.get(scheme)(rest, device)
