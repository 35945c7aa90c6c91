"""A second identical `anyclass eval` must reuse the cached features: time two identical
command runs (separate processes, as a user runs them) on a fresh folder dataset (new
files = a cache key never seen before), then break the second run down.
Target: second run >= 20x faster than the first.

The default workload is a realistic first run: open_clip ViT-B-32 (random weights: same
cost as trained ones) at 224 px over 3,000 photo-sized JPEGs (500x375).

    python benchmarks/cache_speedup.py [--backbone openclip:ViT-B-32@random] [--n 3000]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_jpegs, write_pngs  # noqa: E402


def import_breakdown(stderr: str, top: int = 8) -> dict:
    """`python -X importtime` output -> total and the slowest top-level packages (s)."""
    cum: dict[str, float] = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) == 1:            # top-level imports only
            name = m.group(3).split(".")[0]
            cum[name] = cum.get(name, 0.0) + int(m.group(1)) / 1e6
    tops = sorted(cum.items(), key=lambda kv: -kv[1])[:top]
    return {"total_s": round(sum(cum.values()), 2), **{k: round(v, 2) for k, v in tops}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="openclip:ViT-B-32@random")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--images", default="jpeg", help="jpeg (500x375) or png<size>")
    ap.add_argument("--keep", action="store_true", help="keep the cache entry")
    a = ap.parse_args()
    exe = str(Path(sys.executable).parent / "anyclass")
    tmpdir = Path(tempfile.gettempdir())
    src = (write_jpegs(tmpdir / "anyclass-bench-jpeg500x375", a.n) if a.images == "jpeg"
           else write_pngs(tmpdir / f"anyclass-bench-{a.images}", a.n, int(a.images[3:])))
    from anyclass.features.cache import features_root
    root = features_root()
    before = set(os.listdir(root)) if root.exists() else set()
    with tempfile.TemporaryDirectory(prefix="anyclass-cache-") as tmp:
        for i, p in enumerate(src):  # a fresh folder: new files, new mtimes, new cache key
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
            results.append(json.loads(Path(f"{tmp}/r.json").read_text()))
        # where the second run's time goes: one more identical run with -X importtime
        t = time.perf_counter()
        prof = subprocess.run([sys.executable, "-X", "importtime", exe, *cmd[1:]], check=True,
                              capture_output=True, text=True, env=dict(os.environ))
        third = time.perf_counter() - t
        r3 = json.loads(Path(f"{tmp}/r.json").read_text())
    if not a.keep:  # the entries this benchmark created
        for key in set(os.listdir(root)) - before:
            shutil.rmtree(root / key, ignore_errors=True)
    m = [r["metrics"] for r in results]
    assert m[0] == m[1] == r3["metrics"], "cached run gave different metrics"
    t2 = results[1]["timings_s"]
    print(json.dumps({
        "backbone": a.backbone, "images": f"{a.n} x {a.images}",
        "first_s": round(times[0], 2), "second_s": round(times[1], 2),
        "speedup": round(times[0] / times[1], 1), "same_metrics": True,
        "first_features_s": results[0]["timings_s"]["features"],
        "second_breakdown_s": {
            "wall": round(times[1], 2),
            "in_run_eval": t2["total"], "features_cached": t2["features"],
            "outside_run_eval (interpreter, imports, CLI)": round(times[1] - t2["total"], 2)},
        "third_run_importtime_s": {"wall": round(third, 2), **import_breakdown(prof.stderr)},
        "machine": machine()}))


if __name__ == "__main__":
    main()
