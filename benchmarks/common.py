"""Helpers shared by the benchmark scripts: timing, machine description, image sets."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    load = ", load avg %.2f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"{platform.processor() or platform.machine()}, {cores} cores{load}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {dev}")


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def summary(xs: list[float]) -> dict:
    return {"best": round(min(xs), 3), "median": round(statistics.median(xs), 3),
            "all": [round(x, 3) for x in xs]}


def write_pngs(folder: Path, n: int, size: int = 64, seed: int = 0) -> list[str]:
    """n distinct small PNGs (smooth random colour fields) — decoding cost like real small images."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:06d}.png"
        if not p.exists():
            base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(base).resize((size, size), Image.BILINEAR).save(p)
        paths.append(str(p))
    return paths


def write_jpegs(folder: Path, n: int, width: int = 500, height: int = 375,
                seed: int = 0) -> list[str]:
    """n distinct photo-sized JPEGs (quality 90; smooth colour fields plus texture noise, so
    the entropy decoder has real work) — ImageNet's typical 500x375 by default."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        if not p.exists():
            base = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
            im = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC),
                            dtype=np.int16)
            im = np.clip(im + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(p, quality=90)
        paths.append(str(p))
    return paths


def world_images(n: int, domain: str = "colour") -> list[str]:
    """Up to n images of the offline world ($ANYCLASS_WORLD, built if needed), sorted."""
    from anyclass.world.build import ensure_world
    from anyclass.world.config import get_config
    root = Path(ensure_world(get_config(None)).root) / "images" / domain
    paths = sorted(str(p) for p in root.rglob("*.png"))
    if len(paths) < n:
        raise SystemExit(f"the world has {len(paths)} {domain} images, asked for {n}")
    return paths[:n]
