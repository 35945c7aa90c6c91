"""A second identical `anyclass eval` must reuse the cached features: time two identical
command runs (separate processes, as a user runs them) on a fresh folder dataset.
Target: second run >= 20x faster than the first.

    python benchmarks/cache_speedup.py [--backbone builtin] [--n 5000]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_pngs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="builtin")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--image-size", type=int, default=64)
    a = ap.parse_args()
    exe = str(Path(sys.executable).parent / "anyclass")
    with tempfile.TemporaryDirectory() as tmp:
        # a fresh folder (new files, new mtimes) = a cache key never seen before
        src = write_pngs(Path(tempfile.gettempdir()) / f"anyclass-bench-png{a.image_size}",
                         a.n, a.image_size)
        for i, p in enumerate(src):
            d = Path(tmp) / "data" / ("class a" if i % 2 else "class b")
            d.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, d / Path(p).name)
        cmd = [exe, "eval", "--dataset", f"folder:{tmp}/data", "--backbone", a.backbone,
               "--out", f"{tmp}/r.json"]
        times, results = [], []
        for _ in range(2):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ))
            times.append(time.perf_counter() - t)
            results.append(json.loads(Path(f"{tmp}/r.json").read_text())["metrics"])
    assert results[0] == results[1], "cached run gave different metrics"
    print(json.dumps({"backbone": a.backbone, "images": a.n, "first_s": round(times[0], 2),
                      "second_s": round(times[1], 2), "speedup": round(times[0] / times[1], 1),
                      "same_metrics": True, "machine": machine()}))


if __name__ == "__main__":
    main()
