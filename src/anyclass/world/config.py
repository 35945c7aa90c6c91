"""World configurations. `ANYCLASS_WORLD=mini` selects the small one used by the tests."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

# Bump when world code changes what is built (renders, tasks, model): it is part of the key.
WORLD_VERSION = "3"


@dataclass(frozen=True)
class WorldConfig:
    name: str
    image_size: int               # stored image side, pixels
    max_concepts: int | None      # None = every emoji present in both fonts
    pretrain_per_concept: int     # colour renders per concept for the built-in model
    train_per_class: int          # task split sizes (per class, per domain)
    val_per_class: int
    test_per_class: int
    seed: int = 0
    max_classes_per_task: int | None = None   # mini: evenly spaced subset of each task

    def key(self) -> str:
        """The world's data (concepts, renders, splits); the model has its own key, so a new
        training recipe replaces the model without re-rendering the images."""
        import hashlib
        import json
        blob = json.dumps({"v": WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


CONFIGS = {
    "full": WorldConfig("full", image_size=64, max_concepts=None, pretrain_per_concept=16,
                        train_per_class=16, val_per_class=4, test_per_class=20),
    "mini": WorldConfig("mini", image_size=64, max_concepts=300, pretrain_per_concept=3,
                        train_per_class=16, val_per_class=2, test_per_class=6,
                        max_classes_per_task=10),
}


def get_config(name: str | None = None) -> WorldConfig:
    name = name or os.environ.get("ANYCLASS_WORLD", "full")
    if name not in CONFIGS:
        from ..errors import SpecError
        raise SpecError(f"unknown world configuration {name!r} (known: {', '.join(CONFIGS)})")
    return CONFIGS[name]
