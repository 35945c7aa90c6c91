"""The offline world's unlabelled image pool: colour renders of ALL concepts, for SuS
retrieval (`world:pool`).

Layout: `<world root>/pool/colour/<nnnnnn>.png` plus `DONE.json`. File names are positions
in a seeded shuffle of (concept, draw) pairs, so neither names nor listing order reveal a
concept; nothing here records which concept an image shows (retrieval must not use labels).
Seeds are hashed from a "pool" tag, at or above TASK_SEED_BASE like task images (so never a
pretraining render) and checked disjoint from every task image seed (never a test image).

Rendered lazily on first use, lock-protected (flock), resumable (each PNG is written
atomically; missing ones are rendered on the next call), ~10 s for the mini world.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import random
from pathlib import Path

from .build import World, _write_json, ensure_world, task_image_seeds
from .config import WorldConfig
from .render import TASK_SEED_BASE, render_to_files

#: bump when what the pool holds changes (rendering rules, naming, per-concept counts)
POOL_VERSION = "1"
POOL_DOMAIN = "colour"
#: renders per concept: ~9k images for the full world, 900 for mini
PER_CONCEPT = {"full": 8, "mini": 3}


def pool_seed(cfg: WorldConfig, concept_id: str, k: int) -> int:
    """Seed of the k-th pool image of a concept (a hash tagged "pool", ≥ TASK_SEED_BASE)."""
    h = hashlib.sha256(f"{cfg.seed}|pool|{POOL_DOMAIN}|{concept_id}|{k}".encode()).digest()
    return TASK_SEED_BASE + int.from_bytes(h[:7], "big")


def pool_dir(world: World) -> Path:
    return world.root / "pool" / POOL_DOMAIN


def _plan(world: World, per_concept: int) -> list[tuple[object, int, str]]:
    """(concept, seed, file name) for every pool image, in file-name order."""
    pairs = [(c, k) for c in world.concepts for k in range(per_concept)]
    order = list(range(len(pairs)))
    random.Random(f"{world.cfg.seed}|pool-order").shuffle(order)
    out = []
    for pos, i in enumerate(order):
        c, k = pairs[i]
        out.append((c, pool_seed(world.cfg, c.id, k), f"{pos:06d}.png"))
    return out


def ensure_pool(world: World | None = None, per_concept: int | None = None,
                progress: bool = True) -> list[str]:
    """Absolute paths of the world's pool images (rendered on first use), sorted."""
    world = world or ensure_world(progress=progress)
    per_concept = per_concept or PER_CONCEPT.get(world.cfg.name, 8)
    d = pool_dir(world)
    done = d / "DONE.json"
    want = {"version": POOL_VERSION, "per_concept": per_concept,
            "n": per_concept * len(world.concepts), "world": world.cfg.key()}

    def finished() -> list[str] | None:
        try:
            info = json.loads(done.read_text())
        except (OSError, ValueError):
            return None
        if {k: info.get(k) for k in want} != want:
            return None
        return [str(d / f"{i:06d}.png") for i in range(info["n"])]

    paths = finished()
    if paths is not None:
        return paths
    d.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f"{POOL_DOMAIN}.lock", "a+") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        try:
            paths = finished()
            if paths is not None:
                return paths
            done.unlink(missing_ok=True)
            plan = _plan(world, per_concept)
            taken = task_image_seeds(world.cfg)
            leak = [c.id for c, s, _ in plan if (c.id, s) in taken]
            if leak:  # a hash collision: would put a task image into the pool
                raise RuntimeError(f"pool seed of concept {leak[0]} equals a task image seed")
            items = [(c, s, d / name) for c, s, name in plan if not (d / name).exists()]
            render_to_files(items, POOL_DOMAIN, world.cfg.image_size, progress=progress,
                            desc="render world pool")
            for p in d.glob("*.png.tmp*"):
                p.unlink(missing_ok=True)
            _write_json(done, want)
        finally:
            fcntl.flock(lf, fcntl.LOCK_UN)
    return [str(d / name) for _, _, name in _plan(world, per_concept)]
