"""Shared fixtures. Tests run offline on the mini world, cached under .cache-test/ so a
developer's reruns don't rebuild it (CI starts from a clean clone and builds it once)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("ANYCLASS_HOME", str(REPO / ".cache-test"))
os.environ.setdefault("ANYCLASS_WORLD", "mini")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def mini_world():
    """The mini offline world (rendered images, tasks, built-in model), built once."""
    from anyclass.world.build import ensure_world
    return ensure_world()
