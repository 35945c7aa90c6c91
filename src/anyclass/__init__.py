"""anyclass: classify images into any set of class names by reusing pretrained models."""
from __future__ import annotations

__version__ = "0.1.0"
