"""Zero-shot acc1 of a backbone on every offline-world task in every domain, chance beside,
and the source task's per-domain ratios next to CLIP ViT-B/16's on ImageNet's variants.

    python benchmarks/zeroshot_world.py [--backbone builtin] [--templates single]
        [--domains colour sketch rendition v2 adversarial] [--json runs/zeroshot_world.json]
    python benchmarks/zeroshot_world.py --markdown runs/zeroshot_world.json   # re-print

Prints markdown tables: one row per task (columns: domain × template set), the mean over the
21 downstream tasks, the target checks, then the source task's row with ratios to colour.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

#: CLIP ViT-B/16 zero-shot on ImageNet and its variants (the issue's reference ratios)
CLIP_RATIOS = {"colour": 1.0, "v2": 0.91, "sketch": 0.69, "adversarial": 0.72, "rendition": 1.11}
CLIP_NAMES = {"colour": "ImageNet", "v2": "-V2", "sketch": "-Sketch", "adversarial": "-A",
              "rendition": "-R"}


def run(a) -> dict:
    from common import machine

    from anyclass.backbones.factory import create_backbone
    from anyclass.eval.demo import evaluate_world
    from anyclass.world.build import ensure_world
    t0 = time.perf_counter()
    world = ensure_world()
    bb = create_backbone(a.backbone)
    results = []
    for t in a.templates:
        results += evaluate_world(bb, a.backbone, None, domains=a.domains, templates=t,
                                  log=lambda *_: None)
    filt = {}
    for name in world.tasks:
        p = world.root / "tasks" / name / "adversarial_filter.json"
        if p.exists():
            filt[name] = json.loads(p.read_text())
    return {"world": world.cfg.name, "key": world.cfg.key(), "backbone": a.backbone,
            "identity": bb.identity, "machine": machine(),
            "seconds": round(time.perf_counter() - t0), "templates": a.templates,
            "domains": a.domains, "adversarial_filter": filt,
            "results": [{"dataset": r["dataset"], "templates": r["templates"],
                         "acc1": r["metrics"]["acc1"], "chance": r["chance_acc1"],
                         "n": r["num_images"] if "num_images" in r else None} for r in results]}


def markdown(d: dict) -> str:
    from anyclass.world.tasks import SOURCE_TASK
    cell: dict[str, dict[tuple, float]] = defaultdict(dict)
    chance: dict[str, float] = {}
    for r in d["results"]:
        task, _, dom = r["dataset"].removeprefix("world:").partition("@")
        cell[task][(dom, r["templates"])] = 100 * r["acc1"]
        chance[task] = 100 * r["chance"]
    cols = [(dm, t) for dm in d["domains"] for t in d["templates"]]
    out = [f"World `{d['world']}` ({d['key']}), backbone `{d['backbone']}` ({d['identity']}); "
           f"{d['machine']}; {d['seconds']} s\n",
           "| task | classes | chance | " + " | ".join(f"{dm} {t}" for dm, t in cols) + " |",
           "|---|---|---|" + "---|" * len(cols)]
    means = defaultdict(list)
    tasks = [t for t in cell if t != SOURCE_TASK]
    for name in tasks:
        k = round(100 / chance[name])
        row = [name, str(k), f"{chance[name]:.1f}"] + [f"{cell[name][c]:.1f}" for c in cols]
        for c in cols:
            means[c].append(cell[name][c])
        means["chance"].append(chance[name])
        out.append("| " + " | ".join(row) + " |")
    mean = {c: sum(v) / len(v) for c, v in means.items()}
    out.append(f"| **mean ({len(tasks)} tasks)** | | {mean['chance']:.1f} | "
               + " | ".join(f"**{mean[c]:.1f}**" for c in cols) + " |")
    t0 = d["templates"][0]
    if ("colour", t0) in mean:
        n2x = sum(cell[n][("colour", t0)] >= 2 * chance[n] for n in tasks)
        out.append(f"\nTargets ({t0} template): colour mean {mean[('colour', t0)]:.1f} % "
                   f"(≥ 45), sketch mean {mean.get(('sketch', t0), float('nan')):.1f} % (≥ 15), "
                   f"{n2x} of {len(tasks)} tasks ≥ 2× chance in colour (≥ 19).")
    if SOURCE_TASK in cell:
        src = cell[SOURCE_TASK]
        doms = [dm for dm in d["domains"] if (dm, t0) in src]
        out += ["", f"Source task `world:source` ({round(100 / chance[SOURCE_TASK])} classes, "
                    f"chance {chance[SOURCE_TASK]:.2f} %), {t0} template:", "",
                "| | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms),
                "| acc1 | " + " | ".join(f"{src[(dm, t0)]:.1f}" for dm in doms) + " |",
                "| ratio to colour | " + " | ".join(
                    f"{src[(dm, t0)] / src[('colour', t0)]:.2f}" for dm in doms) + " |",
                "| CLIP ViT-B/16 on ImageNet" + " | ".join(
                    [""] + [f"{CLIP_NAMES[dm]} {CLIP_RATIOS[dm]:.2f}" for dm in doms]) + " |"]
    if d.get("adversarial_filter"):
        f = d["adversarial_filter"]
        fooled = sum(v["fooled_share"] for v in f.values()) / len(f)
        out.append(f"\nAdversarial filter (world expert `tasks-cnn-colour`): on the kept images "
                   f"it is wrong {100 * fooled:.1f} % of the time (mean over {len(f)} tasks).")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="builtin")
    ap.add_argument("--templates", nargs="+", default=["single"])
    ap.add_argument("--domains", nargs="+",
                    default=["colour", "sketch", "rendition", "v2", "adversarial"])
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--markdown", help="re-print the tables of a saved --json file")
    a = ap.parse_args()
    if a.markdown:
        print(markdown(json.loads(Path(a.markdown).read_text())))
        return
    d = run(a)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(d, indent=1))
    print(markdown(d))


if __name__ == "__main__":
    main()
