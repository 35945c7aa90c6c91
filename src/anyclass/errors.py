"""Errors a user sees: one line naming the problem."""
from __future__ import annotations


class AnyclassError(Exception):
    """Base class for user-facing errors; the CLI prints `error: <message>` and exits 2."""


class SpecError(AnyclassError, ValueError):
    """A backbone/dataset/method spec string that cannot be resolved."""


class UnsafeCheckpointError(AnyclassError):
    """A weights file that would need arbitrary unpickling."""


class ImageTooLargeError(AnyclassError):
    """An image above the pixel limit (decompression-bomb guard)."""


class ClassNamesError(AnyclassError, ValueError):
    """Empty, single, duplicate or undecodable class names."""
