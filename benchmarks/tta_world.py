"""Test-time tuning on the offline world (issue 11): the tables of docs/benchmarks.md.

    python benchmarks/tta_world.py dg       --seeds 1,2,3 [--per-class 1] [--classes 40]
    python benchmarks/tta_world.py ablation --seeds 1
    python benchmarks/tta_world.py xd       --seeds 1 [--per-class 1]
    python benchmarks/tta_world.py b2n      --seeds 1 [--per-class 2]
    python benchmarks/tta_world.py report

dg: prompts trained on `world:source` (colour, 16 shots: CoOp and MaPLe as PromptAlign starts
from it, eval/tta.py WORLD_MAPLE), tested on its shifted domains (sketch, rendition, v2,
adversarial): zero-shot, TPT, CoOp, CoOp+TPT, MaPLe, MaPLe+TPT, PromptAlign, PromptSync.
xd: the same source prompts on every other world task. b2n: MaPLe trained on the base classes
of each task (the issue-10 sweep's states), tuned on base and new test images. ablation:
PromptSync without class-aware weighting, without L_disc, with 3 steps, PromptAlign with
β = 0 (entropy only, all prompts tuned), and each at the other's learning rate, on the DG domains.

Every non-tuned row runs through the same engine with steps = 0 (the method's prediction
with θ_0), so rows differ only in what they tune. Test sets are a seeded subsample of
`--per-class` images per class (the world's 318 source classes make every tuned image cost
318 text forward+backward passes; on 2 CPU cores the full 6,360-image domains are GPU work).
One JSON per (table, method, dataset, seed) under --out; a rerun skips finished ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from anyclass.methods.training import bf16_pays

SOURCE = "world:source"
SHOTS = 16
#: CoOp on world:source: the cross-dataset schedule of benchmarks/prompt_world.py
#: (amp: bf16 only where it pays, see methods/training.bf16_pays)
COOP = dict(epochs=5, amp=bf16_pays(), crop_scale=[0.5, 1.0])
#: row -> (method, starting prompts, hyperparameters); "coop"/"maple" = the source-trained files
DG_ROWS = {
    "zeroshot": ("tpt", None, dict(steps=0)),
    "tpt": ("tpt", None, {}),
    "coop": ("tpt", "coop", dict(steps=0)),
    "coop+tpt": ("tpt", "coop", {}),
    "maple": ("tpt", "maple", dict(steps=0)),
    "maple+tpt": ("tpt", "maple", {}),
    "promptalign": ("promptalign", "maple", {}),
    "promptsync": ("promptsync", "maple", {}),
}
ABLATION_ROWS = {
    "promptsync": ("promptsync", "maple", {}),
    "promptsync -class-aware": ("promptsync", "maple", dict(class_aware=False)),
    "promptsync -disc": ("promptsync", "maple", dict(disc=0.0)),
    "promptsync 3 steps": ("promptsync", "maple", dict(steps=3)),
    "promptsync entropy only": ("promptsync", "maple", dict(beta=0.0, disc=0.0)),
    "promptalign": ("promptalign", "maple", {}),
    "promptalign beta=0": ("promptalign", "maple", dict(beta=0.0)),
    # the step size, both ways: PromptSync at PromptAlign's DG lr, PromptAlign at PromptSync's
    "promptsync lr=4e-2": ("promptsync", "maple", dict(lr=4e-2)),
    "promptalign lr=5e-3": ("promptalign", "maple", dict(lr=5e-3)),
}
#: PromptAlign's cross-dataset learning rate (5e-4 instead of DG's 4e-2). Views: crops and flips
#: for every row, as PromptAlign's code makes them for MaPLe+TPT and PromptAlign alike (TPT's
#: own code would add AugMix on these fine-grained sets: `tpt`'s default off the source)
XD_ROWS = {"zeroshot": DG_ROWS["zeroshot"], "maple": DG_ROWS["maple"],
           "maple+tpt": ("tpt", "maple", dict(augmix=False)),
           "promptalign": ("promptalign", "maple", dict(lr=5e-4)),
           "promptsync": ("promptsync", "maple", dict(lr=5e-4))}
B2N_ROWS = {"maple": DG_ROWS["maple"], "promptalign": ("promptalign", "maple", dict(lr=5e-4)),
            "promptsync": ("promptsync", "maple", dict(lr=5e-4))}


def subsample(ds, per_class: int, seed: int):
    """The first `per_class` images of each class after a seeded shuffle."""
    import numpy as np
    rs = np.random.RandomState(seed)
    order = rs.permutation(len(ds))
    seen: dict[int, int] = {}
    keep = []
    for i in order:
        c = int(ds.labels[i])
        if seen.get(c, 0) < per_class:
            seen[c] = seen.get(c, 0) + 1
            keep.append(int(i))
    return ds.subset(sorted(keep))


class World:
    """The backbone, the source-trained prompt files and statistics, shared by the rows."""

    def __init__(self, out: Path, extra: dict | None = None) -> None:
        from anyclass.backbones.factory import create_backbone
        self.bb = create_backbone("builtin")
        self.out = out
        self.extra = extra or {}          # hyperparameters every row gets (e.g. amp=True)
        self._files: dict = {}

    def prompts(self, kind: str | None, seed: int) -> str | None:
        from anyclass.eval.fitting import fit_on
        from anyclass.eval.tta import world_source_prompts
        if kind is None:
            return None
        if (kind, seed) not in self._files:
            if kind == "maple":
                path = world_source_prompts(self.bb, seed)
            else:
                path = self.out / "states" / f"coop-source-s{seed}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    fit_on("coop", self.bb, SOURCE, shots=SHOTS, seed=seed, hparams=COOP,
                           state_path=path)
            self._files[(kind, seed)] = str(path)
        return self._files[(kind, seed)]

    def run(self, table: str, row: str, spec: tuple, dataset: str, seed: int, per_class: int,
            init_file: str | None = None, classes: list[int] | None = None,
            split_name: str = "") -> dict:
        """One cell: tune/score a seeded subsample of `dataset`'s test split (resumable)."""
        from anyclass.data.fewshot import subset_classes
        from anyclass.data.sources import load_dataset
        from anyclass.eval.runner import write_json
        from anyclass.eval.tta import evaluate_tta, world_defaults
        from anyclass.methods import create_method
        name, kind, hp = spec
        slug = f"{row.replace(' ', '_')}/{dataset.replace(':', '-').replace('@', '_')}{split_name}-s{seed}.json"
        path = self.out / table / slug
        if path.exists():
            done = json.loads(path.read_text())
            if done.get("per_class") != per_class:
                raise SystemExit(f"{path} was measured with --per-class {done.get('per_class')}, "
                                 f"not {per_class}: use another --out or remove it")
            return done
        test = load_dataset(dataset, "test")
        if classes is not None:
            test = subset_classes(test, classes)
        test = subsample(test, per_class, seed)
        init = init_file if kind == "maple" and init_file else self.prompts(kind, seed)
        m = create_method(name, init=init, seed=seed, **{**self.extra, **hp})
        world_defaults(m, dataset, self.bb, list(test.classnames), seed)
        m.prepare(self.bb, list(test.classnames))
        t0 = time.perf_counter()
        r = evaluate_tta(m, self.bb, test, progress=False)
        res = {"table": table, "row": row, "method": name, "dataset": dataset + split_name,
               "seed": seed, "per_class": per_class, "hparams": m.get_params(), **r,
               "seconds": round(time.perf_counter() - t0, 2)}
        write_json(res, path)
        print(f"{table} {row:<26} {dataset + split_name:<32} s{seed}: acc1 "
              f"{100 * r['metrics']['acc1']:6.2f}  ({r['tta']['seconds_per_image']:.3f} s/img, "
              f"{r['tta']['failed_images']} failed)", flush=True)
        return res


def class_subset(k: int, n: int | None, seed: int) -> list[int] | None:
    """A seeded random `n` of `k` class indices, sorted (ImageNet-A/R style: a class subset of
    the source task), or None for all."""
    import numpy as np
    return sorted(int(c) for c in np.random.RandomState(seed).permutation(k)[:n]) if n else None


def dg(w: World, rows: dict, seeds: list[int], per_class: int, table: str = "dg",
       classes: int | None = None) -> None:
    from anyclass.data.sources import load_dataset
    from anyclass.eval.protocols import shifted_domain_targets
    table = f"{table}-c{classes}" if classes else table
    k = len(load_dataset(SOURCE, "test").classnames)
    for seed in seeds:
        subset = class_subset(k, classes, seed)
        for row, spec in rows.items():
            for d in shifted_domain_targets(SOURCE):
                w.run(table, row, spec, d, seed, per_class, classes=subset)


def xd(w: World, seeds: list[int], per_class: int) -> None:
    from anyclass.eval.protocols import world_downstream_targets
    for seed in seeds:
        for row, spec in XD_ROWS.items():
            for d in world_downstream_targets():
                w.run("xd", row, spec, d, seed, per_class)


def b2n(w: World, seeds: list[int], per_class: int, states: Path) -> None:
    """MaPLe trained on each task's base classes by the issue-10 sweep (its state files)."""
    from anyclass.data.fewshot import base_new_split
    from anyclass.data.sources import load_dataset
    from anyclass.eval.protocols import world_downstream_targets
    for seed in seeds:
        for d in world_downstream_targets():
            slug = d.replace(":", "-")
            found = sorted((states / "maple" / slug).glob(f"shots16-seed{seed}-*.safetensors"))
            if not found:
                print(f"b2n: no MaPLe state for {d} seed {seed} under {states}; skipped", flush=True)
                continue
            base, new = base_new_split(len(load_dataset(d, "test").classnames))
            for row, spec in B2N_ROWS.items():
                for part, classes in (("base", base), ("new", new)):
                    w.run("b2n", row, spec, d, seed, per_class, str(found[-1]), classes, f"/{part}")


def report(out: Path) -> None:
    """One table per (table, seed), then the mean over the seeds in which every row has every
    domain (an unfinished seed never mixes into a mean)."""
    from collections import defaultdict
    rows: dict = defaultdict(dict)
    paired: dict = defaultdict(lambda: [0, 0.0, 0])      # (table, row) → images, Δ·n, changed
    for p in sorted(out.glob("*/*/*.json")):
        r = json.loads(p.read_text())
        rows[r["table"]][(r["row"], r["dataset"], r["seed"])] = (
            100 * r["metrics"]["acc1"], r["tta"]["seconds_per_image"])
        if r["table"] != "b2n":
            c = paired[(r["table"], r["row"])]
            c[0] += r["num_images"]
            c[1] += 100 * (r["metrics"]["acc1"] - r["tta"]["untuned_metrics"]["acc1"]) * r["num_images"]
            c[2] += r["tta"]["changed_predictions"]
    for table, cells in rows.items():
        datasets = sorted({d for _, d, _ in cells})
        names = list(dict.fromkeys(r for r, _, _ in cells))
        seeds = sorted({s for _, _, s in cells})
        complete = [s for s in seeds if all((n, d, s) in cells for n in names for d in datasets)]
        groups = [(f"seed {s}", [s]) for s in seeds] if len(seeds) > 1 else []
        groups.append((f"mean of seeds {','.join(map(str, complete or seeds))}", complete or seeds))
        for title, use in groups:
            print(f"## {table} ({title})\n\n| row | " + " | ".join(d.split(":")[1] for d in datasets)
                  + " | mean | s/img |\n|---|" + "---|" * (len(datasets) + 2))
            for n in names:
                per = [[cells[(n, d, s)] for s in use if (n, d, s) in cells] for d in datasets]
                accs = [sum(a for a, _ in v) / len(v) if v else None for v in per]
                got = [a for a in accs if a is not None]
                secs = [t for v in per for _, t in v]
                print(f"| {n} | " + " | ".join("–" if a is None else f"{a:.2f}" for a in accs)
                      + (f" | {sum(got) / len(got):.2f}" if len(got) == len(accs) else " | –")
                      + f" | {sum(secs) / max(1, len(secs)):.3f} |")
            print()
    print("## tuned vs its own starting prompts (paired, every measured image pooled)\n\n"
          "| table | row | images | Δ acc1 | changed | SE ≤ √changed / n |\n|---|---|---|---|---|---|")
    for (table, row), (n, d, ch) in paired.items():
        if ch:
            print(f"| {table} | {row} | {n} | {d / n:+.2f} | {ch} | {100 * ch ** 0.5 / n:.2f} |")
    print()
    b2n_report(out)


def b2n_report(out: Path) -> None:
    """Base / new / HM per task (rows) and method (columns); the mean row takes the HM of the
    mean base and mean new accuracies, as the papers do."""
    cells: dict = {}
    for p in sorted(out.glob("b2n/*/*/*.json")):
        r = json.loads(p.read_text())
        task, part = r["dataset"].split(":")[1].split("/")
        cells.setdefault(r["row"], {}).setdefault(task, {}).setdefault(part, []).append(100 * r["metrics"]["acc1"])
    if not cells:
        return
    rows = list(B2N_ROWS)
    tasks = sorted({t for m in cells.values() for t in m})
    from anyclass.eval.sweep import harmonic_mean as hm
    print("## b2n\n\n| task | " + " | ".join(f"{m} B / N / HM" for m in rows) + " |\n|---|" + "---|" * len(rows))
    means: dict = {m: ([], []) for m in rows}
    for t in tasks:
        line = []
        for m in rows:
            c = cells.get(m, {}).get(t, {})
            if "base" in c and "new" in c:
                b, n = (sum(c[k]) / len(c[k]) for k in ("base", "new"))
                means[m][0].append(b)
                means[m][1].append(n)
                line.append(f"{b:.2f} / {n:.2f} / {hm(b, n):.2f}")
            else:
                line.append("–")
        print(f"| {t} | " + " | ".join(line) + " |")
    line = []
    for m in rows:
        bs, ns = means[m]
        b, n = (sum(v) / max(1, len(v)) for v in (bs, ns))
        line.append(f"**{b:.2f} / {n:.2f} / {hm(b, n):.2f}** ({len(bs)} tasks)")
    print("| mean | " + " | ".join(line) + " |\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["dg", "ablation", "xd", "b2n", "report"])
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--per-class", type=int, default=1)
    ap.add_argument("--rows", help="comma-separated rows (default: the table's)")
    ap.add_argument("--classes", type=int, help="dg/ablation: test on a seeded random subset of "
                    "this many source classes (as ImageNet-A/R test 200 of ImageNet's 1,000); "
                    "results go to the table <dg|ablation>-c<N>")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast on the CPU too "
                    "(halves the text tower's cost on a CPU with bf16 units, 6-9x slower "
                    "without; recorded in each result's hparams)")
    ap.add_argument("--out", type=Path, default=Path("runs/tta-world"))
    ap.add_argument("--states", type=Path, default=Path("runs/bench-prompt/states"),
                    help="b2n: the issue-10 sweep's learned states")
    a = ap.parse_args(argv)
    if a.what == "report":
        report(a.out)
        return 0
    seeds = [int(s) for s in a.seeds.split(",")]
    w = World(a.out, {"amp": True} if a.amp else None)
    pick = (lambda rows: {k: v for k, v in rows.items() if not a.rows or k in a.rows.split(",")})
    if a.what == "dg":
        dg(w, pick(DG_ROWS), seeds, a.per_class, classes=a.classes)
    elif a.what == "ablation":
        dg(w, pick(ABLATION_ROWS), seeds, a.per_class, table="ablation", classes=a.classes)
    elif a.what == "xd":
        xd(w, seeds, a.per_class)
    else:
        b2n(w, seeds, a.per_class, a.states)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
