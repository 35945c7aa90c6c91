"""Where anyclass keeps caches: $ANYCLASS_HOME (default ~/.cache/anyclass)."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    p = Path(os.environ.get("ANYCLASS_HOME", Path.home() / ".cache" / "anyclass")).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p
