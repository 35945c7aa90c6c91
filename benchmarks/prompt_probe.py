"""The probes behind docs/benchmarks.md's explanations of the base-to-new table, on
`world:tools` (36 classes, base = first 18), seed 1, built-in model:

1. VPT with CoOp's crop range (0.08-1) vs 0.5-1, and APEX at 0.5-1: per-epoch loss and val
   accuracy (the loss starts at chance with 8 % crops of 64-px images).
2. MaPLe at initialisation on all 36 classes' test images: zero-shot accuracy, MaPLe's
   text side alone, both sides, the shallow context alone; cosine of its class embeddings to
   the zero-shot ones.
3. MaPLe trained longer (15 epochs), with 4x the learning rate, and with depth 1.

    python benchmarks/prompt_probe.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from anyclass.backbones.factory import create_backbone
from anyclass.data.fewshot import base_new_split
from anyclass.data.sources import load_dataset
from anyclass.eval.fitting import fit_on
from anyclass.methods import create_method
from anyclass.methods.prompt_parts import context_template, texts_for, zeroshot_text
from anyclass.methods.training import load_images

DS = "world:tools"
CROP = [0.5, 1.0]


def fit_report(bb, method: str, hp: dict, base, new) -> None:
    f = fit_on(method, bb, DS, shots=16, seed=1, hparams=hp, classes=base, protocol="base2new",
               progress=False)
    h = [(r["epoch"], round(r["loss"], 3), round(r["val_acc1"], 3)) for r in f.estimator.history_]
    b = f.evaluate(DS, classes=base, progress=False)["metrics"]["acc1"]
    n = f.evaluate(DS, classes=new, progress=False)["metrics"]["acc1"]
    print(f"{method} {hp}: (epoch, loss, val) {h}; chosen {f.estimator.chosen_['epoch']}; "
          f"base {100 * b:.1f} new {100 * n:.1f}", flush=True)


@torch.no_grad()
def maple_init(bb) -> None:
    test = load_dataset(DS, "test")
    names = list(test.classnames)
    x, y = load_images(bb, test)
    acc = lambda logits: 100 * float((logits.argmax(1) == y).float().mean())
    f0, zs = bb.encode_images(x), zeroshot_text(bb, names)
    m = create_method("maple")
    torch.manual_seed(1)
    m.prepare(bb, names)
    t, vp = m.encode_classes(bb, names)
    shallow = bb.encode_text_with_context(texts_for(context_template(2, "a photo of a"), names),
                                          m.module_.ctx)
    print(f"zero-shot {acc(f0 @ zs.t()):.1f}; MaPLe init: text side {acc(f0 @ t.t()):.1f}, "
          f"both sides {acc(bb.encode_images_with_prompts(x, vp) @ t.t()):.1f}, shallow context "
          f"only {acc(f0 @ shallow.t()):.1f}; cos to zero-shot: deep "
          f"{float(F.cosine_similarity(t, zs).mean()):.3f}, shallow "
          f"{float(F.cosine_similarity(shallow, zs).mean()):.3f}", flush=True)


def main() -> None:
    bb = create_backbone("builtin")
    base, new = base_new_split(len(load_dataset(DS, "test").classnames))
    fit_report(bb, "vpt", {}, base, new)
    fit_report(bb, "vpt", {"crop_scale": CROP}, base, new)
    fit_report(bb, "apex", {}, base, new)
    fit_report(bb, "apex", {"crop_scale": CROP}, base, new)
    maple_init(bb)
    for hp in ({}, {"epochs": 15}, {"lr": 0.014}, {"depth": 1}):
        fit_report(bb, "maple", {**hp, "crop_scale": CROP}, base, new)


if __name__ == "__main__":
    main()
