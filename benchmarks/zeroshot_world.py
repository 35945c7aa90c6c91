"""Zero-shot acc1 of a backbone on every offline-world task, both domains, with chance beside.

    python benchmarks/zeroshot_world.py [--backbone builtin] [--templates single ensemble7]

Prints a markdown table (one row per task; columns per domain × template set) and the means.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from anyclass.backbones.factory import create_backbone  # noqa: E402
from anyclass.eval.demo import evaluate_world  # noqa: E402
from anyclass.world.build import ensure_world  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="builtin")
    ap.add_argument("--templates", nargs="+", default=["single", "ensemble7"])
    ap.add_argument("--json", help="also write all results to this file")
    a = ap.parse_args()
    t0 = time.perf_counter()
    world = ensure_world()
    bb = create_backbone(a.backbone)
    results = []
    for t in a.templates:
        results += evaluate_world(bb, a.backbone, None, templates=t, log=lambda *_: None)
    cell: dict[str, dict[tuple, float]] = defaultdict(dict)
    for r in results:
        task, _, dom = r["dataset"].removeprefix("world:").partition("@")
        cell[task][(dom, r["templates"])] = 100 * r["metrics"]["acc1"]
    cols = [(d, t) for d in ("colour", "sketch") for t in a.templates]
    print(f"World `{world.cfg.name}` ({world.cfg.key()}), backbone `{a.backbone}` "
          f"({bb.identity}); {machine()}; {time.perf_counter() - t0:.0f} s\n")
    print("| task | difficulty | classes | chance | " + " | ".join(f"{d} {t}" for d, t in cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    means = defaultdict(list)
    for name, info in world.tasks.items():
        row = [name, info.difficulty_name, str(info.num_classes), f"{100 / info.num_classes:.1f}"]
        for c in cols:
            row.append(f"{cell[name][c]:.1f}")
            means[c].append(cell[name][c])
        means["chance"].append(100 / info.num_classes)
        print("| " + " | ".join(row) + " |")
    print("| **mean** | | | " + f"{sum(means['chance']) / len(means['chance']):.1f} | "
          + " | ".join(f"**{sum(means[c]) / len(means[c]):.1f}**" for c in cols) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
