"""Helpers shared by the benchmark scripts: timing, machine description, synthetic images."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {dev}")


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


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
