"""Does APEX's adaptive ensemble earn its place? New-class accuracy against each new class's
distance to the base classes, with and without the ensemble (and zero-shot beside).

Reuses the APEX states the base-to-new sweep saved (benchmarks/prompt_world.py b2n): for
every task and seed it loads the learned prompts, scores the new classes' test images with
the ensemble on (α_c from METHODS.md §3) and off (α = 1: fully adapted), and zero-shot;
then per new class: accuracy in each, d_avg and d_nn to the base classes (frozen zero-shot
text features), α_c. Classes are pooled over tasks and binned by d_avg quartile.

    python benchmarks/prompt_world.py ensemble --seeds 1 [--out runs/bench-prompt]
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


BETAS = (0.5, 1.0, 2.0, 4.0, 8.0)


def _state(task: str, seed: int, out: Path) -> Path:
    from anyclass.eval.protocols import expand, make_grid
    from prompt_world import WORLD_SCHEDULE          # the b2n sweep's APEX hyperparameters
    cells = expand(make_grid(None, protocol="base2new", methods=["apex"], datasets=[task],
                             seeds=[seed], shots=[16],
                             hparams={"apex": WORLD_SCHEDULE["b2n"]["apex"]}))
    return out / cells[0].state_relpath()


@torch.no_grad()
def per_class(task: str, seed: int, out: Path, backbone) -> list[dict]:
    from anyclass.data.fewshot import base_new_split, subset_classes
    from anyclass.data.sources import load_dataset
    from anyclass.methods.apex import ensemble_weights
    from anyclass.methods.prompt_parts import cosine_logits, zeroshot_text
    from anyclass.methods.prompted import load_prompts
    from anyclass.methods.training import iter_batches
    test = load_dataset(task, "test")
    base, new = base_new_split(test.classnames)
    names = list(test.classnames)
    state = _state(task, seed, out)
    if not state.exists():
        raise SystemExit(f"no APEX state {state}: run `prompt_world.py b2n` first")
    est = load_prompts(state, backbone, [names[i] for i in base])
    ds = subset_classes(test, new)
    new_names = list(ds.classnames)
    est.ensemble = True
    enc_on = est.encode_classes(backbone, new_names)
    beta0 = est.beta
    enc_beta = {}
    for b in BETAS:                       # β's effect (the paper fixes β = 4 for CLIP)
        est.beta = b
        enc_beta[b] = est.encode_classes(backbone, new_names)
    est.beta = beta0
    est.ensemble = False
    enc_off = est.encode_classes(backbone, new_names)
    zs = zeroshot_text(backbone, new_names)
    preds = {"ensemble": [], "adapted": [], "zeroshot": [], **{f"beta={b}": [] for b in BETAS}}
    rows = []
    for x, idx in iter_batches(backbone, ds):
        preds["ensemble"].append(est.forward(backbone, x, enc_on).argmax(1).cpu())
        preds["adapted"].append(est.forward(backbone, x, enc_off).argmax(1).cpu())
        for b in BETAS:
            preds[f"beta={b}"].append(est.forward(backbone, x, enc_beta[b]).argmax(1).cpu())
        preds["zeroshot"].append(cosine_logits(backbone, backbone.encode_images(x).float(), zs)
                                 .argmax(1).cpu())
        rows.append(idx)
    y = torch.as_tensor(np.asarray(ds.labels))[torch.cat(rows)]
    t_new, t_base = zs, zeroshot_text(backbone, est.classnames_)
    cos = t_new @ t_base.t()
    alpha = ensemble_weights(t_new, t_base, est.beta, est.eps)
    out_rows = []
    for c, name in enumerate(new_names):
        m = y == c
        rec = {"task": task, "seed": seed, "class": name, "n": int(m.sum()),
               "d_avg": float(1 - cos[c].mean()), "d_nn": float(1 - cos[c].max()),
               "alpha": float(alpha[c])}
        for k, p in preds.items():
            rec[k] = float((torch.cat(p)[m] == c).float().mean()) if m.any() else float("nan")
        out_rows.append(rec)
    return out_rows


def summarise(rows: list[dict]) -> str:
    d = np.array([r["d_avg"] for r in rows])
    qs = np.quantile(d, [0, 0.25, 0.5, 0.75, 1.0])
    lines = ["| new classes by d_avg to base | classes | mean α | zero-shot | APEX without ensemble | APEX with ensemble |",
             "|---|---|---|---|---|---|"]
    for i in range(4):
        sel = [r for r in rows if (qs[i] <= r["d_avg"] <= qs[i + 1]) and
               (i == 3 or r["d_avg"] < qs[i + 1])]
        if not sel:
            continue
        f = lambda k: 100 * np.mean([r[k] for r in sel])
        lines.append(f"| Q{i + 1} [{qs[i]:.3f}, {qs[i + 1]:.3f}] | {len(sel)} | "
                     f"{np.mean([r['alpha'] for r in sel]):.3f} | {f('zeroshot'):.1f} | "
                     f"{f('adapted'):.1f} | {f('ensemble'):.1f} |")
    f = lambda k: 100 * np.mean([r[k] for r in rows])
    lines.append(f"| all | {len(rows)} | {np.mean([r['alpha'] for r in rows]):.3f} | "
                 f"{f('zeroshot'):.1f} | {f('adapted'):.1f} | {f('ensemble'):.1f} |")
    lines += ["", "| β | " + " | ".join(str(b) for b in BETAS) + " |",
              "|---|" + "---|" * len(BETAS),
              "| new-class accuracy (mean over classes) | "
              + " | ".join(f"{f(f'beta={b}'):.1f}" for b in BETAS) + " |"]
    d_nn = np.array([r["d_nn"] for r in rows])
    lines += ["", f"d_avg of new classes to the base classes: median {np.median(d):.3f} "
              f"(α at the median with β = 4: {np.exp(-4 * np.median(d)):.3f}); d_nn median "
              f"{np.median(d_nn):.3f}, {int((d_nn <= 0.05).sum())} of {len(rows)} within ε"]
    return "\n".join(lines)


def run(tasks: list[str], seeds: list[int], out: Path) -> int:
    from anyclass.backbones.factory import create_backbone
    backbone = create_backbone("builtin")
    rows = [r for t in tasks for s in seeds for r in per_class(t, s, out, backbone)]
    path = out / "apex_ensemble.json"
    path.write_text(json.dumps(rows, indent=1))
    print(summarise(rows))
    print(f"\n(per-class accuracies, mean over classes; rows in {path})")
    return 0
