"""One factory for every backbone spec (`scheme:rest`), open_clip-style.

Each backbone module registers its scheme with `@BACKBONES.register("scheme")` on a builder
`(rest: str, device: str | torch.device) -> VisionLanguageModel`; modules are imported lazily
so that, e.g., transformers is only imported for `hf:` specs.
"""
from __future__ import annotations

import importlib

import torch

from ..errors import SpecError
from ..registry import Registry
from .base import VisionLanguageModel

BACKBONES: Registry[VisionLanguageModel] = Registry("backbone scheme")

# scheme -> module that registers it
_MODULES = {"openclip": "openclip", "hf": "hf", "builtin": "builtin"}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def create_backbone(spec: str = "builtin", device: str | torch.device | None = None) -> VisionLanguageModel:
    """`builtin`, `openclip:NAME[@TAG|@/path/ckpt]`, `hf:MODEL_ID_OR_DIR`."""
    spec = spec.strip()
    scheme, _, rest = spec.partition(":")
    if scheme not in _MODULES:
        raise SpecError(f"unknown backbone spec {spec!r}: expected builtin, openclip:NAME[@TAG|@PATH] or hf:ID")
    importlib.import_module(f"{__package__}.{_MODULES[scheme]}")
    return BACKBONES.get(scheme)(rest, torch.device(device) if device else default_device())
