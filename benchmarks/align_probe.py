"""Why do PromptAlign's and PromptSync's alignment terms not earn their place in the world?
(issue 11; docs/benchmarks.md "Why the alignment terms do not help here").

    OMP_NUM_THREADS=1 python benchmarks/align_probe.py [--per-class 3] [--classes 40]
        [--rows ...] [--out runs/tta-world/align_probe.json]

The images are those of the DG table (`tta_world.py dg --classes 40 --per-class 3`): a seeded
40 of world:source's 318 classes, 3 test images per class, per domain; θ_0 = the source-trained
MaPLe prompts, statistics and prototypes from world:source's train split (what the methods use).

Part A (no tuning): what the alignment losses see at θ_0. Per image, over its confident views
S (TPT's filter, 6 of 64) and token positions, exactly as PromptSync's L_align pools them:
  - d_c = 1/L Σ_l ½ mean|μ_l − μ̂_{l,c}| + ½ mean|σ²_l − σ̂²_{l,c}|, for every class c;
  - `stat 1-NN`: argmin_c d_c == label (is there class information in the statistics?);
  - `contrast`: (mean_{c≠y} d_c − d_y) / d_y (how much the own class stands out);
  - `d_y`: distance to the own class's source statistics (the domain gap the term must close);
  - `feat 1-NN`: argmax_c cos(z, z̄_c) == label (the discrimination loss's prototype classifier).
Part B (tuning, one domain): per-image predictions of the tuned rows, so that two rows are
compared image by image: flips against θ_0 (wins / losses) and the paired difference with its
standard error sqrt(discordant)/n, for β = 0 vs the paper's β and for two learning rates.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SOURCE = "world:source"
DOMAINS = ["world:source", "world:source@sketch", "world:source@rendition", "world:source@v2",
           "world:source@adversarial"]
#: Part B rows: name -> (method, hyperparameters)
ROWS = {
    "maple+tpt": ("tpt", {}),
    "promptalign": ("promptalign", {}),
    "promptalign beta=0": ("promptalign", dict(beta=0.0)),
    "promptsync lr=4e-2": ("promptsync", dict(lr=4e-2)),
    "promptsync beta=0 disc=0 lr=4e-2": ("promptsync", dict(beta=0.0, disc=0.0, lr=4e-2)),
    "promptalign lr=5e-3": ("promptalign", dict(lr=5e-3)),
    "promptalign beta=0 lr=5e-3": ("promptalign", dict(beta=0.0, lr=5e-3)),
    "promptsync lr=5e-3": ("promptsync", dict(lr=5e-3)),
    "promptsync beta=0 disc=0 lr=5e-3": ("promptsync", dict(beta=0.0, disc=0.0, lr=5e-3)),
}


def load(domain: str, classes, per_class: int, seed: int):
    from anyclass.data.fewshot import subset_classes
    from anyclass.data.sources import load_dataset
    from tta_world import subsample
    return subsample(subset_classes(load_dataset(domain, "test"), classes), per_class, seed)


def part_a(bb, init, stats, ds, seed: int) -> dict:
    """The alignment losses' view of `ds` at θ_0 (module docstring)."""
    import torch
    import torch.nn.functional as F

    from anyclass.methods.tta import (batched_params, confident, image_features, image_seeds,
                                      make_views, take, text_features, vision_prompts)
    from anyclass.methods.training import iter_batches
    names = list(ds.classnames)
    cm, cv, cf = stats.prototypes(names)
    labels = torch.as_tensor(list(ds.labels))
    p1 = batched_params(init, 1, bb.device, text=False, vision=False)
    t = text_features(bb, init, p1, names)[0]                                  # [K, D]
    vp1 = vision_prompts(init, p1)
    rows = {k: [] for k in ("zs", "stat_nn", "feat_nn", "d_y", "contrast", "d_pbar")}
    with torch.no_grad():
        for x, idx in iter_batches(bb, ds, batch_size=16, progress=False):
            b, v = x.shape[0], 64
            views = make_views(x, image_seeds(x, seed), v)                      # [B, V, 3, H, W]
            vp = [q.expand(b * v, -1, -1) for q in vp1]
            f = image_features(bb, views.flatten(0, 1), vp).float().view(b, v, -1)
            logits = bb.logit_scale * f @ t.t()                                # [B, V, K]
            sel = confident(logits, 0.1)
            sv = take(views, sel).flatten(0, 1)
            n = sel.shape[1]
            fs, lay = bb.encode_images_with_layer_inputs(
                sv, [q.expand(b * n, -1, -1) for q in vp1], stats.layers)
            h = torch.stack([l.float().view(b, n, *l.shape[1:]).flatten(1, 2) for l in lay], 1)
            mu, var = h.mean(2), h.var(2, unbiased=False)                      # [B, L, W]
            d = (0.5 * (mu[:, None] - cm[None]).abs().mean(-1)
                 + 0.5 * (var[:, None] - cv[None]).abs().mean(-1)).mean(-1)    # [B, K]
            y = labels[idx]
            dy = d.gather(1, y[:, None])[:, 0]
            others = (d.sum(1) - dy) / (d.shape[1] - 1)
            both = torch.cat([logits[:, :1], take(logits, sel)], 1)
            p_bar = both.softmax(-1).mean(1)
            z = F.normalize(fs.float().view(b, n, -1).mean(1), dim=-1)
            rows["zs"].append(logits[:, 0].argmax(1) == y)
            rows["stat_nn"].append(d.argmin(1) == y)
            rows["feat_nn"].append((z @ cf.t()).argmax(1) == y)
            rows["d_y"].append(dy)
            rows["contrast"].append((others - dy) / dy)
            rows["d_pbar"].append((p_bar * d).sum(1))
    out = {k: torch.cat(v).float().mean().item() for k, v in rows.items()}
    for k in ("zs", "stat_nn", "feat_nn"):
        out[k] *= 100
    out["chance"] = 100 / len(names)
    out["images"] = len(ds)
    return out


def part_b(bb, init_file: str, ds, domain: str, rows: list[str], seed: int, amp: bool) -> dict:
    """Per-image predictions of each tuned row on `ds` (module docstring)."""
    from anyclass.eval.tta import tta_predict, world_defaults
    from anyclass.methods import create_method
    out = {}
    for name in rows:
        method, hp = ROWS[name]
        m = create_method(method, init=init_file, seed=seed, **({"amp": True} if amp else {}), **hp)
        world_defaults(m, domain, bb, list(ds.classnames), seed, progress=False)
        m.prepare(bb, list(ds.classnames))
        t0 = time.perf_counter()
        logits, untuned, failed, idx = tta_predict(m, bb, ds, progress=False)
        out[name] = {"pred": logits.argmax(1).tolist(), "untuned": untuned.argmax(1).tolist(),
                     "label": [int(ds.labels[i]) for i in idx.tolist()],
                     "s_per_image": round((time.perf_counter() - t0) / len(idx), 3),
                     "hparams": m.get_params()}
        print(f"B {name:<28} acc1 {acc(out[name]['pred'], out[name]['label']):6.2f}", flush=True)
    return out


def acc(pred, label) -> float:
    return 100 * sum(p == y for p, y in zip(pred, label)) / len(label)


def paired(a: dict, b: dict) -> tuple[float, float, int, int]:
    """acc(a) − acc(b) (points), its standard error sqrt(discordant)/n, a-only and b-only
    correct images."""
    ca = [p == y for p, y in zip(a["pred"], a["label"])]
    cb = [p == y for p, y in zip(b["pred"], b["label"])]
    n = len(ca)
    wa = sum(x and not y for x, y in zip(ca, cb))
    wb = sum(y and not x for x, y in zip(ca, cb))
    return 100 * (wa - wb) / n, 100 * (wa + wb) ** 0.5 / n, wa, wb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tune-domain", default="world:source@sketch")
    ap.add_argument("--rows", help="Part B rows (comma-separated names of ROWS; default all)")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("runs/tta-world/align_probe.json"))
    a = ap.parse_args(argv)
    from anyclass.backbones.factory import create_backbone
    from anyclass.data.sources import load_dataset
    from anyclass.eval.tta import ensure_stats, world_source_prompts
    from anyclass.methods.tta import prompt_init
    from anyclass.methods.tta_stats import SourceStats
    from tta_world import class_subset
    bb = create_backbone("builtin")
    init_file = str(world_source_prompts(bb, a.seed))
    init = prompt_init(bb, init_file)
    k = len(load_dataset(SOURCE, "test").classnames)
    classes = class_subset(k, a.classes, a.seed)
    names = list(load(SOURCE, classes, 1, a.seed).classnames)
    stats = SourceStats.load(ensure_stats(bb, init, names, 3, source=SOURCE, progress=False))
    out = json.loads(a.out.read_text()) if a.out.exists() else {}
    out.setdefault("A", {})
    for d in DOMAINS:
        if d not in out["A"]:
            out["A"][d] = part_a(bb, init, stats, load(d, classes, a.per_class, a.seed), a.seed)
            print("A", d, json.dumps({k: round(v, 4) for k, v in out["A"][d].items()}), flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(out, indent=1))
    out.setdefault("B", {})
    todo = [r for r in (a.rows.split(",") if a.rows else ROWS) if r not in out["B"]]
    ds = load(a.tune_domain, classes, a.per_class, a.seed)
    for r in todo:
        out["B"].update(part_b(bb, init_file, ds, a.tune_domain, [r], a.seed, a.amp))
        a.out.write_text(json.dumps(out, indent=1))
    report(out)
    return 0


def report(out: dict) -> None:
    print("\n| domain | MaPLe θ_0 acc1 | stat 1-NN | feat 1-NN | chance | d_y | contrast | d_p̄ |\n|---|---|---|---|---|---|---|---|")
    for d, r in out.get("A", {}).items():
        print(f"| {d.split(':')[1]} | {r['zs']:.1f} | {r['stat_nn']:.1f} | {r['feat_nn']:.1f} | "
              f"{r['chance']:.1f} | {r['d_y']:.4f} | {100 * r['contrast']:+.2f} % | {r['d_pbar']:.4f} |")
    b = out.get("B", {})
    if not b:
        return
    first = next(iter(b.values()))
    base = {"pred": first["untuned"], "label": first["label"]}
    print("\n| row | acc1 | vs θ_0: diff ± SE (wins / losses) | changed | s/img |\n|---|---|---|---|---|")
    print(f"| MaPLe θ_0 | {acc(base['pred'], base['label']):.2f} | | | |")
    for name, r in b.items():
        d, se, w, l = paired(r, base)
        ch = sum(p != q for p, q in zip(r["pred"], r["untuned"]))
        print(f"| {name} | {acc(r['pred'], r['label']):.2f} | {d:+.2f} ± {se:.2f} ({w} / {l}) | {ch} | {r['s_per_image']} |")
    pairs = [("promptalign", "promptalign beta=0"),
             ("promptsync lr=4e-2", "promptsync beta=0 disc=0 lr=4e-2"),
             ("promptalign lr=5e-3", "promptalign beta=0 lr=5e-3"),
             ("promptsync lr=5e-3", "promptsync beta=0 disc=0 lr=5e-3"), ("promptalign", "maple+tpt"),
             ("promptsync lr=4e-2", "maple+tpt"), ("promptsync lr=5e-3", "maple+tpt"),
             ("promptalign beta=0", "promptalign beta=0 lr=5e-3")]
    print("\n| A vs B | diff ± SE | A-only / B-only correct | same prediction |\n|---|---|---|---|")
    for x, y in pairs:
        if x in b and y in b:
            d, se, w, l = paired(b[x], b[y])
            same = sum(p == q for p, q in zip(b[x]["pred"], b[y]["pred"]))
            print(f"| {x} vs {y} | {d:+.2f} ± {se:.2f} | {w} / {l} | {same} of {len(b[x]['pred'])} |")


if __name__ == "__main__":
    sys.exit(main())
