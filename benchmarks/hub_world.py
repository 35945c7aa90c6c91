"""MLL hub on the offline world (must-show of issue 4): hub vs the built-in VLM zero-shot vs the
best single expert vs an oracle that knows each class's best head, accuracy as the hub grows,
and cost (models run, inference time).

- hub: CHCO selection (B = 8 models) + reuse calibrated on the task's node images (default);
  hub_uncal: the same heads, uncalibrated (argmax of log-probabilities).
- best_single_expert: the hub restricted to one model, the model picked by TEST accuracy
  (an oracle at the model level), calibrated like the hub.
- oracle: for each class the head of any hub model with the best one-vs-rest AUC on the TEST
  images, no model budget, calibrated like the hub.

    ANYCLASS_HOME=... ANYCLASS_WORLD=full OMP_NUM_THREADS=1 python benchmarks/hub_world.py
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from anyclass.hub.experts import create_expert, expert_logits
from anyclass.backbones.factory import create_backbone
from anyclass.data.sources import load_dataset
from anyclass.features.extract import extract_features
from anyclass.hub.reuse import fallback_probabilities, hub_scores
from anyclass.hub.select import Choice, Selection, select_heads
from anyclass.hub.service import class_nodes, init_world_hub
from anyclass.world.build import ensure_world


def acc(scores, valid, labels) -> float:
    return float((scores[valid].argmax(1) == np.asarray(labels)[valid]).mean())


def auc_columns(scores: np.ndarray, labels: np.ndarray, K: int) -> np.ndarray:
    """One-vs-rest AUC [H, K] of every head score column (scores [N, H]) for every class,
    from ranks (Mann-Whitney), all heads at once."""
    from scipy.stats import rankdata
    ranks = rankdata(scores, axis=0)                        # [N, H], ties averaged
    onehot = (labels[:, None] == np.arange(K)[None, :]).astype(np.float64)   # [N, K]
    n_pos = onehot.sum(0)
    n_neg = len(labels) - n_pos
    rank_sum = ranks.T @ onehot                             # [H, K]
    return (rank_sum - n_pos * (n_pos + 1) / 2) / np.maximum(n_pos * n_neg, 1)


def oracle_selection(names, models, specs, ds) -> Selection:
    """Each class gets the head (any model, no budget) with the best test AUC."""
    y = np.asarray(ds.labels)
    blocks, owners = [], []
    for m in models:
        lg = expert_logits(create_expert(specs[m]), ds, progress=False)
        z = lg - lg.max(1, keepdims=True)
        blocks.append(z - np.log(np.exp(z).sum(1, keepdims=True)))
        owners += [(m, j) for j in range(lg.shape[1])]
    auc = auc_columns(np.concatenate(blocks, 1), y, len(names))
    best = auc.argmax(0)
    choices = [Choice(c, int(best[c]), owners[best[c]][0], owners[best[c]][1],
                      float(auc[best[c], c]), float(auc[best[c], c])) for c in range(len(names))]
    return Selection(names, choices, sorted({ch.model_id for ch in choices}), 0.0, "oracle",
                     0.0)


COLUMNS = ("zeroshot", "hub_uncal", "hub", "best_single_expert", "oracle")


def markdown(out: dict) -> str:
    """The tables of docs/benchmarks.md from the JSON this script writes."""
    rows, sizes = out["rows"], out["sizes"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["| task | domain | K | zero-shot | hub uncal. | **hub** | best single | oracle | "
             "models run | fallback cls |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['domain']} | {r['classes']} | "
                     + " | ".join(pct(r[k]) for k in COLUMNS)
                     + f" | {r['hub_models_run']} | {r['hub_fallback_classes']} |")
    for d in ("colour", "sketch"):
        rs = [r for r in rows if r["domain"] == d]
        lines.append(f"| **mean** | {d} | | " + " | ".join(
            pct(np.mean([r[k] for r in rs])) for k in COLUMNS) + " | | |")
    lines += ["", "| domain | " + " | ".join(f"{n} experts" for n in sizes) + " | whole hub |",
              "|---|" + "---|" * (len(sizes) + 1)]
    for d in ("colour", "sketch"):
        rs = [r for r in rows if r["domain"] == d]
        lines.append(f"| {d} | " + " | ".join(
            pct(np.mean([r["hub_by_size"][str(n)] if str(n) in r["hub_by_size"]
                         else r["hub_by_size"][n] for r in rs])) for n in sizes)
            + f" | {pct(np.mean([r['hub'] for r in rs]))} |")
    lines += ["", "| task (colour test split) | models run / in hub | selected experts | "
              "+ VLM | every expert | ratio |", "|---|---|---|---|---|---|"]
    for c in out["cost"]:
        sel = c["selected_s"] + c.get("vlm_s", 0.0)
        lines.append(f"| {c['task']} | {c['models_run']} / {c['models_in_hub']} | "
                     f"{c['selected_s']:.2f} s | {sel:.2f} s | {c['all_s']:.2f} s | "
                     f"{c['all_s'] / sel:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/hub_world.json")
    ap.add_argument("--sizes", default="2,4,8,16")
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--max-models", type=int, default=8)
    ap.add_argument("--tasks", default=None, help="comma-separated (default: every world task)")
    ap.add_argument("--markdown", metavar="JSON", help="only print the tables of a saved run")
    a = ap.parse_args()
    if a.markdown:
        print(markdown(json.loads(Path(a.markdown).read_text())))
        return
    world = ensure_world(progress=False)
    store = init_world_hub(progress=False)
    graph = store.load_graph()
    models = [m.id for m in store.models()]
    specs = {m.id: m.spec for m in store.models()}
    full = store.labels()
    vlm = create_backbone("builtin")
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in a.sizes.split(",") if int(s) <= len(models)]
    orders = [list(rng.permutation(models)) for _ in range(a.orders)]
    rows = []
    from anyclass.world.tasks import downstream_tasks
    tasks = a.tasks.split(",") if a.tasks else downstream_tasks(world.tasks)
    for task in tasks:
        for domain in ("colour", "sketch"):
            ds = load_dataset(f"world:{task}@{domain}", "test")
            names = list(ds.classnames)
            nodes, _ = class_nodes(names, ds.meta)
            fb, fb_ok = fallback_probabilities(vlm, ds, names)
            r = {"task": task, "domain": domain, "classes": len(names),
                 "zeroshot": acc(np.log(fb + 1e-12), fb_ok, ds.labels)}
            t = time.perf_counter()

            def score(sel, calibrated=True):
                sc, ok, _ = hub_scores(sel, specs, ds, graph, nodes, vlm, calibrated=calibrated)
                return acc(sc, ok & fb_ok, ds.labels)

            sel = select_heads(full, nodes, max_models=a.max_models, classnames=names)
            r["hub"] = score(sel)
            r["hub_uncal"] = score(sel, calibrated=False)
            r["hub_models_run"] = len(sel.models)
            r["hub_fallback_classes"] = len(sel.fallback)
            r["hub_select_s"] = round(sel.seconds, 4)
            single = []
            for m in models:
                s1 = select_heads(store.labels(model_ids=[m]), nodes, max_models=1,
                                  classnames=names)
                if s1.models:
                    single.append(score(s1))
            r["best_single_expert"] = max(single) if single else r["zeroshot"]
            r["oracle"] = score(oracle_selection(names, models, specs, ds))
            curve = {}
            for n in sizes:
                vals = []
                for order in orders:
                    lab_n = store.labels(model_ids=[int(x) for x in order[:n]])
                    vals.append(score(select_heads(lab_n, nodes, max_models=a.max_models,
                                                   classnames=names)))
                curve[n] = float(np.mean(vals))
            r["hub_by_size"] = curve
            r["seconds"] = round(time.perf_counter() - t, 2)
            rows.append(r)
            print(json.dumps(r), flush=True)
    # cost: uncached inference of the hub's chosen models vs every model, on a few tasks
    cost = []
    for task in tasks[:3]:
        ds = load_dataset(f"world:{task}@colour", "test")
        nodes, _ = class_nodes(list(ds.classnames), ds.meta)
        sel = select_heads(full, nodes, max_models=a.max_models)
        t = time.perf_counter()
        for m in sel.models:
            expert_logits(create_expert(specs[m]), ds, cache=False, progress=False)
        t_sel = time.perf_counter() - t
        t = time.perf_counter()          # the vision-language model (calibration's g term)
        extract_features(vlm, ds, cache=False, progress=False)
        t_vlm = time.perf_counter() - t
        t = time.perf_counter()
        for m in models:
            expert_logits(create_expert(specs[m]), ds, cache=False, progress=False)
        cost.append({"task": task, "models_run": len(sel.models), "models_in_hub": len(models),
                     "selected_s": round(t_sel, 2), "vlm_s": round(t_vlm, 2), "all_s": round(time.perf_counter() - t, 2)})
    out = {"rows": rows, "cost": cost, "sizes": sizes, "orders": a.orders}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(markdown(out))

if __name__ == "__main__":
    main()
