"""MLL hub on the offline world (must-show of issue 4): hub vs the built-in VLM zero-shot vs the
best single expert, accuracy as the hub grows, and cost (models run, inference time).

    ANYCLASS_HOME=... ANYCLASS_WORLD=full OMP_NUM_THREADS=1 python benchmarks/hub_world.py
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from anyclass.backbones.experts import create_expert, expert_logits
from anyclass.backbones.factory import create_backbone
from anyclass.data.sources import load_dataset
from anyclass.hub.reuse import combine, fallback_probabilities, run_selected
from anyclass.hub.select import select_heads
from anyclass.hub.service import class_nodes, init_world_hub
from anyclass.world.build import ensure_world


def acc(scores, valid, labels) -> float:
    return float((scores[valid].argmax(1) == np.asarray(labels)[valid]).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/hub_world.json")
    ap.add_argument("--sizes", default="2,4,8,16")
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--max-models", type=int, default=8)
    a = ap.parse_args()
    world = ensure_world(progress=False)
    store = init_world_hub(progress=False)
    models = [m.id for m in store.models()]
    specs = {m.id: m.spec for m in store.models()}
    full = store.labels()
    vlm = create_backbone("builtin")
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in a.sizes.split(",") if int(s) <= len(models)]
    orders = [list(rng.permutation(models)) for _ in range(a.orders)]
    rows = []
    for task in world.tasks:
        for domain in ("colour", "sketch"):
            ds = load_dataset(f"world:{task}@{domain}", "test")
            names = list(ds.classnames)
            nodes, _ = class_nodes(names, ds.meta)
            fb, fb_ok = fallback_probabilities(vlm, ds, names)
            r = {"task": task, "domain": domain, "classes": len(names),
                 "zeroshot": acc(np.log(fb + 1e-12), fb_ok, ds.labels)}
            t = time.perf_counter()
            sel = select_heads(full, nodes, max_models=a.max_models, classnames=names)
            logits, ok = run_selected(sel, specs, ds)
            r["hub"] = acc(combine(sel, logits, fb), ok & fb_ok, ds.labels)
            r["hub_models_run"] = len(sel.models)
            r["hub_fallback_classes"] = len(sel.fallback)
            r["hub_select_s"] = round(sel.seconds, 4)
            single = []
            for m in models:
                lab_m = store.labels(model_ids=[m])
                s1 = select_heads(lab_m, nodes, max_models=1, classnames=names)
                if not s1.models:
                    continue
                lg, ok1 = run_selected(s1, specs, ds)
                single.append(acc(combine(s1, lg, fb), ok1 & fb_ok, ds.labels))
            r["best_single_expert"] = max(single) if single else r["zeroshot"]
            curve = {}
            for n in sizes:
                vals = []
                for order in orders:
                    lab_n = store.labels(model_ids=[int(x) for x in order[:n]])
                    sn = select_heads(lab_n, nodes, max_models=a.max_models, classnames=names)
                    lg, okn = run_selected(sn, specs, ds)
                    vals.append(acc(combine(sn, lg, fb), okn & fb_ok, ds.labels))
                curve[n] = float(np.mean(vals))
            r["hub_by_size"] = curve
            r["seconds"] = round(time.perf_counter() - t, 2)
            rows.append(r)
            print(json.dumps(r), flush=True)
    # cost: uncached inference of the hub's chosen models vs every model, on a few tasks
    cost = []
    for task in list(world.tasks)[:3]:
        ds = load_dataset(f"world:{task}@colour", "test")
        nodes, _ = class_nodes(list(ds.classnames), ds.meta)
        sel = select_heads(full, nodes, max_models=a.max_models)
        t = time.perf_counter()
        for m in sel.models:
            expert_logits(create_expert(specs[m]), ds, cache=False, progress=False)
        t_sel = time.perf_counter() - t
        t = time.perf_counter()
        for m in models:
            expert_logits(create_expert(specs[m]), ds, cache=False, progress=False)
        cost.append({"task": task, "models_run": len(sel.models), "models_in_hub": len(models),
                     "selected_s": round(t_sel, 2), "all_s": round(time.perf_counter() - t, 2)})
    out = {"rows": rows, "cost": cost, "sizes": sizes, "orders": a.orders}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    for d in ("colour", "sketch"):
        rs = [r for r in rows if r["domain"] == d]
        print(d, {k: round(100 * np.mean([r[k] for r in rs]), 1)
                  for k in ("zeroshot", "hub", "best_single_expert")},
              {n: round(100 * np.mean([r["hub_by_size"][n] for r in rs]), 1) for n in sizes})
    print(json.dumps(cost))


if __name__ == "__main__":
    main()
