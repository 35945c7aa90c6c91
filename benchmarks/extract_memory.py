"""Peak memory while extracting 10,000 images vs 1,000 (features streamed to disk).

Each size runs in a fresh subprocess so peaks don't mix, on a fresh copy of the images (new
files = a cache key never seen before, so the extraction really runs), with the usual
$ANYCLASS_HOME (so `builtin` reuses its world); the cache entry and the copies are deleted
afterwards. Target: the peak for 10,000 within a small constant of the peak for 1,000.

    ANYCLASS_WORLD=mini python benchmarks/extract_memory.py [--backbone builtin] [--sizes 1000 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def fresh_images(src: list[str], n: int, folder: Path) -> list[str]:
    """n new files (cycling through `src`), each a copy with its own path and mtime."""
    folder.mkdir(parents=True)
    out = []
    for i in range(n):
        p = folder / f"{i // 1000:03d}" / f"{i:06d}{Path(src[i % len(src)]).suffix}"
        p.parent.mkdir(exist_ok=True)
        shutil.copyfile(src[i % len(src)], p)
        out.append(str(p))
    return out


def source_images(kind: str) -> list[str]:
    if kind == "jpeg":
        from common import write_jpegs
        return write_jpegs(Path(tempfile.gettempdir()) / "anyclass-bench-jpeg500x375", 512)
    if kind != "world":
        raise SystemExit(f"unknown --images {kind!r}: world or jpeg")
    from anyclass.world.build import ensure_world
    from anyclass.world.config import get_config
    root = Path(ensure_world(get_config(None)).root) / "images"  # both domains
    return sorted(str(p) for p in root.rglob("*.png"))


def kib(r) -> int:
    return int(r.ru_maxrss)


def child(backbone: str, n: int, kind: str, batch: int) -> None:
    from anyclass.backbones.factory import create_backbone
    from anyclass.data.base import LabeledImages
    from anyclass.features.cache import CacheEntry
    from anyclass.features.extract import extract_features, loader_plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = create_backbone(backbone)
    with tempfile.TemporaryDirectory(prefix="anyclass-mem-") as tmp:
        paths = fresh_images(source_images(kind), n, Path(tmp) / "img")
        ds = LabeledImages("mem", paths, [0] * n, ["a", "b"])
        base = kib(resource.getrusage(resource.RUSAGE_SELF))
        feats = extract_features(bb, ds, batch_size=batch, cache=True, progress=False)
        ok = int(feats.valid.sum())
        peak = kib(resource.getrusage(resource.RUSAGE_SELF))
        workers = kib(resource.getrusage(resource.RUSAGE_CHILDREN))
        key = feats.key
        del feats
        shutil.rmtree(CacheEntry(key).dir, ignore_errors=True)
    assert ok == n, f"{n - ok} images failed"
    print(json.dumps({"n": n, "rss_before_extract_kib": base, "peak_rss_kib": peak,
                      "peak_worker_rss_kib": workers,
                      "loader": loader_plan(bb.device, n, batch)._asdict()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="builtin")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--images", default="world", help="world (64px PNGs) or jpeg (500x375)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--child", type=int)
    a = ap.parse_args()
    if a.child:
        return child(a.backbone, a.child, a.images, a.batch)
    rows = []
    for n in a.sizes:
        out = subprocess.run([sys.executable, __file__, "--backbone", a.backbone,
                              "--images", a.images, "--batch", str(a.batch),
                              "--child", str(n)],
                             env=dict(os.environ), capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    small, big = rows[0], rows[-1]
    mib = lambda k: round(k / 1024, 1)  # noqa: E731
    print(json.dumps({
        "backbone": a.backbone, "images": a.images, "rows": rows,
        "peak_growth_mib": mib(big["peak_rss_kib"] - small["peak_rss_kib"]),
        "extract_growth_mib": {str(r["n"]): mib(r["peak_rss_kib"] - r["rss_before_extract_kib"])
                               for r in rows},
        "worker_peak_growth_mib": mib(big["peak_worker_rss_kib"] - small["peak_worker_rss_kib"]),
        "peak_ratio": round(big["peak_rss_kib"] / small["peak_rss_kib"], 3),
        "machine": machine()}))


if __name__ == "__main__":
    main()
