"""CoCoOp in the cross-dataset and DG tables (issue 10), at a cost 2 CPU cores can pay.

CoCoOp conditions the context on each image, so every image (training or test) encodes all K
class texts: K = 318 on `world:source`. The sweep's xd/dg tables leave it out (one 4-shot
epoch ≈ 47 min, the 4 × 6,360 DG test images ≈ 9 h here). This script runs it reduced, and
scores the sweep's other rows on exactly the same images, so the comparison is paired:

- training: 4 shots of world:source, 1 epoch (the sweep's CoOp gets 5; CoCoOp's paper 10 at
  16 shots), crop 0.5–1 (prompt_world.WORLD_SCHEDULE's departures); bfloat16 autocast only
  with --amp (worth it only on CPUs with bf16 units: on AVX2 it is ~8x slower than float32);
- cross-dataset: the full test split of each of the 21 other world tasks (K ≈ 8–40 there), or
  a seeded `--xd-per-class` images per class of it;
- DG: a seeded `--per-class` images per class of the source test split and of each shifted
  domain (2 per class: 636 of 6,360), on all 318 classes or on a seeded `--classes` subset
  (tta_world's DG protocol, ImageNet-A/R style: K = 40 makes a test image ~8x cheaper).
Other rows: zero-shot, and the xd sweep's CoOp / MaPLe / APEX states (not retrained).

    OMP_NUM_THREADS=1 python benchmarks/xd_cocoop.py [--per-class 2] [--xd-per-class 8] [--classes 40]
        [--out runs/bench-prompt/xd_cocoop.json] [--rows zeroshot,cocoop]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SOURCE = "world:source"
DOMAINS = ["world:source", "world:source@sketch", "world:source@rendition", "world:source@v2",
           "world:source@adversarial"]
#: select="last": with one epoch val has nothing to choose, and scoring it (1,272 images x 318
#: class texts each) costs ~20 min on 2 CPU cores; warmup_epochs=0: with the default warm-up
#: epoch the one epoch would run at warmup_lr 1e-5 (the fit now refuses that)
COCOOP = dict(epochs=1, warmup_epochs=0, crop_scale=[0.5, 1.0], select="last")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=2, help="DG: test images per class")
    ap.add_argument("--xd-per-class", type=int, default=None,
                    help="cross-dataset: test images per class (default: the full test split)")
    ap.add_argument("--classes", type=int, default=None,
                    help="DG: test on a seeded subset of this many source classes (default: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--states", type=Path, default=Path("runs/bench-prompt/states"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench-prompt/xd_cocoop.json"))
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast for CoCoOp")
    ap.add_argument("--domains", default=",".join(DOMAINS),
                    help="comma-separated DG test domains (none: skip DG)")
    ap.add_argument("--no-xd", action="store_true", help="skip the cross-dataset targets")
    ap.add_argument("--rows", default="zeroshot,coop,maple,apex,cocoop",
                    help="comma-separated subset (coop/maple/apex need the xd sweep's states)")
    a = ap.parse_args(argv)
    from anyclass.backbones.factory import create_backbone
    from anyclass.data.sources import load_dataset
    from anyclass.eval.fitting import Fitted, fit_on
    from anyclass.eval.protocols import world_downstream_targets
    from anyclass.methods.prompted import load_prompts
    from anyclass.data.fewshot import subset_classes
    from tta_world import class_subset, subsample
    bb = create_backbone("builtin")
    names = list(load_dataset(SOURCE, "test").classnames)
    res = json.loads(a.out.read_text()) if a.out.exists() else {}

    def sweep_state(method: str) -> Fitted:
        found = sorted((a.states / method / "world-source").glob(f"shots4-seed{a.seed}-*.safetensors"))
        if not found:
            raise SystemExit(f"no {method} xd state under {a.states}: run prompt_world.py xd first")
        return Fitted(method, bb, names, load_prompts(found[-1], bb, names))

    cocoop_state = a.states / "cocoop" / "world-source" / f"shots4-seed{a.seed}-e1.safetensors"
    cocoop_state.parent.mkdir(parents=True, exist_ok=True)
    rows = {
        "zeroshot": lambda: fit_on("zeroshot", bb, SOURCE, shots=0, seed=a.seed, progress=False),
        "coop": lambda: sweep_state("coop"),
        "maple": lambda: sweep_state("maple"),
        "apex": lambda: sweep_state("apex"),
        "cocoop": lambda: fit_on("cocoop", bb, SOURCE, shots=4, seed=a.seed,
                                 hparams={**COCOOP, "amp": a.amp},
                                 state_path=cocoop_state, progress=True),
    }
    unknown = set(a.rows.split(",")) - set(rows)
    if unknown:
        raise SystemExit(f"unknown row(s) {sorted(unknown)}; choose from {list(rows)}")
    rows = {k: v for k, v in rows.items() if k in a.rows.split(",")}
    domains = [d for d in a.domains.split(",") if d]
    if set(domains) - set(DOMAINS):
        raise SystemExit(f"unknown DG domain(s) {sorted(set(domains) - set(DOMAINS))}; "
                         f"choose from {DOMAINS}")
    subset = class_subset(len(names), a.classes, a.seed)
    tests = ([] if a.no_xd else [(d, a.xd_per_class, None) for d in world_downstream_targets()]) \
        + [(d, a.per_class, subset) for d in domains]
    for name, make in rows.items():
        fitted = None
        for d, per, classes in tests:
            what = [f"{per}/class"] if per is not None else []
            what += [f"{len(classes)} classes"] if classes is not None else []
            key = f"{d} ({', '.join(what)})" if what else d
            if key in res.get(name, {}):
                continue
            fitted = fitted or make()
            test = load_dataset(d, "test")
            if classes is not None:
                test = subset_classes(test, classes)
            if per is not None:
                test = subsample(test, per, a.seed)
            r = fitted.evaluate_on(test, progress=False)
            res.setdefault(name, {})[key] = {"acc1": round(100 * r["metrics"]["acc1"], 2),
                                             "images": r["num_images"], "seconds": r["seconds"]}
            print(f"{name:<9} {key:<40} {res[name][key]['acc1']:6.2f}  ({r['seconds']:.0f} s)", flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(res, indent=1))
    report(res)
    return 0


def report(res: dict) -> None:
    """One cross-dataset and one DG table per test protocol (the part in parentheses); the
    DG mean is over the shifted domains (the source column is not averaged)."""
    keys = list(dict.fromkeys(k for r in res.values() for k in r))
    groups: dict[str, list[str]] = {}
    for k in keys:
        suffix = k[k.find("("):] if "(" in k else "(full test splits)"
        groups.setdefault(("DG " if k.startswith(SOURCE) else "cross-dataset ") + suffix, []).append(k)
    for title, cols in groups.items():
        if not cols:
            continue
        shifted = [c for c in cols if not c.startswith(SOURCE + " ")]
        print(f"\n{title}\n\n| method | " + " | ".join(c.split(":")[1].split(" (")[0] for c in cols)
              + " | mean |\n|---|" + "---|" * (len(cols) + 1))
        for m, r in res.items():
            got = [r[c]["acc1"] for c in shifted if c in r]
            print(f"| {m} | " + " | ".join(f"{r[c]['acc1']:.2f}" if c in r else "–" for c in cols)
                  + (f" | {sum(got) / len(got):.2f} |" if len(got) == len(shifted) else " | – |"))


if __name__ == "__main__":
    sys.exit(main())
