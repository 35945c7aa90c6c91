"""Methods, registered by name: `@METHODS.register("name")` on a class or factory.

Adding a method is one decorated class in one module listed in `_MODULES`.
"""
from __future__ import annotations

import importlib

from ..registry import Registry
from .base import FeatureMethod, FeatureSet

METHODS: Registry[FeatureMethod] = Registry("method")

_MODULES = ["zeroshot", "tip_adapter", "tipx", "hub", "linear_probe", "coop", "cocoop", "vpt",
            "maple", "apex", "tpt", "promptalign", "promptsync"]
for _m in _MODULES:
    importlib.import_module(f"{__name__}.{_m}")


def create_method(name: str, **hparams) -> FeatureMethod:
    return METHODS.get(name)(**hparams)


__all__ = ["METHODS", "FeatureMethod", "FeatureSet", "create_method"]
