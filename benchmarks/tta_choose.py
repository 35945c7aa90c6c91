"""Choosing PromptSync's free coefficients (λ, τ, β) on a val split, never on a test split
(METHODS.md §4): the source-trained MaPLe prompts of eval/tta.py tuned on a seeded subsample
of `world:source@sketch`'s val split; acc1 of each setting beside MaPLe, MaPLe+TPT and
PromptAlign on the same images.

    python benchmarks/tta_choose.py [--images 64] [--amp] [--out runs/tta-world/choose.json]
    python benchmarks/tta_choose.py --classes 40 --images 160 --amp --out runs/tta-world/choose-c40.json

--classes N keeps a seeded random N of the dataset's classes (the whole val split of those
classes, then --images of it): each tuned image costs K text forward+backward passes, so on 2
CPU cores the 318-class choice is limited to a few dozen images; 40 classes allow ~4× more
images for the same time (the coefficients do not depend on K except through τ's softmax).
"""
from __future__ import annotations

import argparse
import json
import sys
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
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="world:source@sketch")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--classes", type=int, help="a seeded random subset of this many classes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--settings", help="comma-separated names of SETTINGS (default: all)")
    ap.add_argument("--out", type=Path, default=Path("runs/tta-world/choose.json"))
    a = ap.parse_args(argv)
    import numpy as np

    from anyclass.backbones.factory import create_backbone
    from anyclass.data.sources import load_dataset
    from anyclass.eval.tta import evaluate_tta, world_defaults, world_source_prompts
    from anyclass.methods import create_method
    bb = create_backbone("builtin")
    val = load_dataset(a.dataset, "val")
    if a.classes:
        from anyclass.data.fewshot import subset_classes
        from tta_world import class_subset
        val = subset_classes(val, class_subset(len(val.classnames), a.classes, a.seed))
    pick = np.random.RandomState(a.seed).permutation(len(val))[:a.images]
    val = val.subset(sorted(int(i) for i in pick))
    init = str(world_source_prompts(bb, a.seed))
    out = json.loads(a.out.read_text()) if a.out.exists() else {}
    todo = a.settings.split(",") if a.settings else list(SETTINGS)
    for name, (method, hp) in SETTINGS.items():
        if name in out or name not in todo:
            continue
        m = create_method(method, init=init, seed=a.seed, **({"amp": True} if a.amp else {}), **hp)
        world_defaults(m, a.dataset, bb, list(val.classnames), a.seed, progress=False)
        m.prepare(bb, list(val.classnames))
        r = evaluate_tta(m, bb, val, progress=False)
        out[name] = {"acc1": 100 * r["metrics"]["acc1"], "s_per_image": r["tta"]["seconds_per_image"],
                     "images": r["num_images"], "hparams": m.get_params()}
        print(f"{name:<26} acc1 {out[name]['acc1']:6.2f}  {out[name]['s_per_image']:.2f} s/img", flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
