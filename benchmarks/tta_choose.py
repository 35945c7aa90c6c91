"""Choosing PromptSync's free coefficients (λ, τ, β) on a val split, never on a test split
(METHODS.md §4): the source-trained MaPLe prompts of eval/tta.py tuned on a seeded subsample
of `world:source@sketch`'s val split; acc1 of each setting beside MaPLe, MaPLe+TPT and
PromptAlign on the same images.

    python benchmarks/tta_choose.py [--images 64] [--amp] [--out runs/tta-world/choose.json]
    python benchmarks/tta_choose.py --classes 40 --images 160 --amp --out runs/tta-world/choose-c40.json
    python benchmarks/tta_choose.py --classes 40 --images 160 --seed 2 --settings terms \
        --datasets world:source@sketch,world:source@rendition,world:source@v2,world:source@adversarial \
        --out runs/tta-world/choose-terms-s2.json
    python benchmarks/tta_choose.py --report runs/tta-world/choose-terms-s2.json [more files]

--classes N keeps a seeded random N of the dataset's classes (the whole val split of those
classes, then --images of it): each tuned image costs K text forward+backward passes, so on 2
CPU cores the 318-class choice is limited to a few dozen images; 40 classes allow ~4× more
images for the same time (the coefficients do not depend on K except through τ's softmax).
--seed picks the class subset, the val images and the source MaPLe (eval/tta.py's, cached per
seed), as tta_world.py's seeds do for test. `--settings terms` is the ablation of PromptSync's
terms on val. Each cell keeps its per-image predictions; `--report` pools the files' cells
per setting and gives each setting's paired difference to `--against` with its standard error
sqrt(discordant)/n (align_probe.py's), wins and losses.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SETTINGS = {
    "maple": ("tpt", dict(steps=0)),
    "maple+tpt": ("tpt", {}),
    "promptalign": ("promptalign", {}),
    "promptsync λ=0": ("promptsync", dict(disc=0.0)),
    "promptsync λ=0.1 τ=0.1": ("promptsync", dict(disc=0.1, tau=0.1)),
    "promptsync λ=1 τ=0.1": ("promptsync", dict(disc=1.0, tau=0.1)),
    "promptsync λ=1 τ=0.05": ("promptsync", dict(disc=1.0, tau=0.05)),
    "promptsync β=10 λ=1": ("promptsync", dict(beta=10.0, disc=1.0)),
    "promptsync β=10 λ=0": ("promptsync", dict(beta=10.0, disc=0.0)),
    "promptsync β=10 λ=0.1": ("promptsync", dict(beta=10.0, disc=0.1)),
    "promptsync β=1 λ=1": ("promptsync", dict(beta=1.0, disc=1.0)),
    # the step size (benchmarks/align_probe.py: at lr 4e-2 one step flips ~half of the hard
    # domain's predictions whatever the loss terms); TPT's 5e-3 and a middle value
    "promptalign lr=5e-3": ("promptalign", dict(lr=5e-3)),
    "promptsync lr=5e-3": ("promptsync", dict(lr=5e-3)),
    "promptsync lr=1.5e-2": ("promptsync", dict(lr=1.5e-2)),
    "promptalign β=0 lr=5e-3": ("promptalign", dict(beta=0.0, lr=5e-3)),
    # the chosen defaults (β 10, λ 0.1, τ 0.1, lr 5e-3) and each term removed
    "promptsync": ("promptsync", {}),
    "promptsync -class-aware": ("promptsync", dict(class_aware=False)),
    "promptsync -disc": ("promptsync", dict(disc=0.0)),
    "promptsync entropy only": ("promptsync", dict(beta=0.0, disc=0.0)),
}
GROUPS = {"terms": ["maple", "maple+tpt", "promptsync", "promptsync -class-aware",
                    "promptsync -disc", "promptsync entropy only"]}


def report(files: list[Path], against: str) -> None:
    """Pooled acc1 per setting over every (file, dataset) cell all settings share, and the
    paired difference to `against` image by image."""
    from align_probe import paired
    runs = [json.loads(f.read_text()) for f in files]
    cells = [(i, d) for i, r in enumerate(runs) for d in r.get("datasets", {})]
    names = [n for n in SETTINGS if all(n in runs[i]["datasets"][d] for i, d in cells)]
    pool = {n: {"pred": [], "label": []} for n in names}
    for i, d in cells:
        for n in names:
            for k in ("pred", "label"):
                pool[n][k] += runs[i]["datasets"][d][n][k]
    print(f"{len(cells)} cells ({', '.join(sorted({d for _, d in cells}))}), "
          f"{len(pool[names[0]]['label'])} images")
    for n in names:
        acc = 100 * sum(p == y for p, y in zip(pool[n]["pred"], pool[n]["label"])) / len(pool[n]["label"])
        line = f"| {n} | {acc:.2f} |"
        if against in pool and n != against:
            d, se, w, l = paired(pool[n], pool[against])
            line += f" {d:+.2f} ± {se:.2f} ({w} / {l}) |"
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="world:source@sketch", help="comma-separated")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--classes", type=int, help="a seeded random subset of this many classes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--settings", help="comma-separated names of SETTINGS or a group of GROUPS "
                    "(default: all)")
    ap.add_argument("--out", type=Path, default=Path("runs/tta-world/choose.json"))
    ap.add_argument("--report", type=Path, nargs="+", help="summarise these result files")
    ap.add_argument("--against", default="promptsync", help="--report's paired reference")
    a = ap.parse_args(argv)
    if a.report:
        report(a.report, a.against)
        return 0
    import numpy as np

    from anyclass.backbones.factory import create_backbone
    from anyclass.data.sources import load_dataset
    from anyclass.eval.tta import tta_predict, world_defaults, world_source_prompts
    from anyclass.methods import create_method
    bb = create_backbone("builtin")
    init = str(world_source_prompts(bb, a.seed))
    out = json.loads(a.out.read_text()) if a.out.exists() else {}
    out.setdefault("datasets", {})
    todo = GROUPS.get(a.settings) or (a.settings.split(",") if a.settings else list(SETTINGS))
    for dataset in a.datasets.split(","):
        val = load_dataset(dataset, "val")
        if a.classes:
            from anyclass.data.fewshot import subset_classes
            from tta_world import class_subset
            val = subset_classes(val, class_subset(len(val.classnames), a.classes, a.seed))
        pick = np.random.RandomState(a.seed).permutation(len(val))[:a.images]
        val = val.subset(sorted(int(i) for i in pick))
        cells = out["datasets"].setdefault(dataset, {})
        for name in todo:
            if name in cells:
                continue
            method, hp = SETTINGS[name]
            m = create_method(method, init=init, seed=a.seed, **({"amp": True} if a.amp else {}), **hp)
            world_defaults(m, dataset, bb, list(val.classnames), a.seed, progress=False)
            m.prepare(bb, list(val.classnames))
            t0 = time.perf_counter()
            logits, _, failed, idx = tta_predict(m, bb, val, progress=False)
            pred = logits.argmax(1).tolist()
            label = [int(val.labels[i]) for i in idx.tolist()]
            acc = 100 * sum(p == y for p, y in zip(pred, label)) / len(label)
            cells[name] = {"acc1": acc, "s_per_image": (time.perf_counter() - t0) / len(label),
                           "images": len(label), "failed": int(failed.sum()),
                           "hparams": m.get_params(), "pred": pred, "label": label}
            print(f"{dataset:<28} {name:<26} acc1 {acc:6.2f}  "
                  f"{cells[name]['s_per_image']:.2f} s/img", flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
