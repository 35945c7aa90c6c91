"""Peak memory while extracting 10,000 images vs 1,000 (features streamed to disk).
Each size runs in a fresh subprocess so peaks don't mix. Target: small constant difference.

    python benchmarks/extract_memory.py [--backbone builtin] [--sizes 1000 10000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_pngs  # noqa: E402


def child(backbone: str, n: int, home: str) -> None:
    os.environ["ANYCLASS_HOME"] = home
    from anyclass.backbones.factory import create_backbone
    from anyclass.data.base import LabeledImages
    from anyclass.features.extract import extract_features
    bb = create_backbone(backbone)
    paths = write_pngs(Path(tempfile.gettempdir()) / "anyclass-bench-png64", n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    feats = extract_features(bb, LabeledImages("mem", paths, [0] * n, ["a", "b"]),
                             batch_size=128, cache=True, progress=False)
    assert int(feats.valid.sum()) == n
    print(json.dumps({"n": n, "rss_before_kib": base,
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "peak_worker_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="builtin")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--child", type=int)
    ap.add_argument("--home")
    a = ap.parse_args()
    if a.child:
        return child(a.backbone, a.child, a.home)
    rows = []
    for n in a.sizes:
        with tempfile.TemporaryDirectory() as home:       # fresh feature cache: real extraction
            env = dict(os.environ)
            # the world/model stay where they are; only features go to the temp home
            out = subprocess.run([sys.executable, __file__, "--backbone", a.backbone,
                                  "--child", str(n), "--home", home], env=env,
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    small, big = rows[0], rows[-1]
    print(json.dumps({"backbone": a.backbone, "rows": rows,
                      "peak_growth_mib": round((big["peak_rss_kib"] - small["peak_rss_kib"]) / 1024, 1),
                      "peak_ratio": round(big["peak_rss_kib"] / small["peak_rss_kib"], 3),
                      "machine": machine()}))


if __name__ == "__main__":
    main()
