"""CHCO selection time on a synthetic hub: 10,000 models × 1,000 heads (10M heads), a 100-class
task, greedy solver (target < 1 s); and milp vs greedy objectives on a smaller hub.

Synthetic labels are sparse (scipy CSC): each head is strong (0.3–0.9) on its own node and
weaker (0.05–0.3) on 3 random nodes (confusions), so some heads fire on other task classes.

    OMP_NUM_THREADS=1 python benchmarks/hub_select.py [--models 10000 --heads 1000]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from anyclass.hub.select import select_heads
from anyclass.hub.store import HubLabels


def synthetic_hub(models: int, heads: int, nodes: int, seed: int = 0) -> HubLabels:
    rng = np.random.default_rng(seed)
    n = models * heads
    own = rng.integers(0, nodes, n)
    conf = rng.integers(0, nodes, (n, 3))
    rows = np.repeat(np.arange(n), 4)
    cols = np.concatenate([own[:, None], conf], 1).ravel()
    vals = np.concatenate([rng.uniform(.3, .9, (n, 1)), rng.uniform(.05, .3, (n, 3))],
                          1).ravel().astype(np.float32)
    S = sp.csc_matrix((vals, (rows, cols)), shape=(n, nodes))
    S.sum_duplicates()
    heads_arr = np.stack([np.repeat(np.arange(models), heads), np.tile(np.arange(heads), models)], 1)
    return HubLabels([f"n{i}" for i in range(nodes)], heads_arr, S,
                     {m: 1.0 for m in range(models)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--heads", type=int, default=1_000)
    ap.add_argument("--nodes", type=int, default=20_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--out", default="runs/hub_select.json")
    a = ap.parse_args()
    out = {}
    t = time.perf_counter()
    lab = synthetic_hub(a.models, a.heads, a.nodes)
    out["generate_s"] = round(time.perf_counter() - t, 2)
    task = [f"n{i}" for i in np.random.default_rng(1).choice(a.nodes, a.classes, replace=False)]
    times, sel = [], None
    for _ in range(5):
        t = time.perf_counter()
        sel = select_heads(lab, task, max_models=20, solver="greedy")
        times.append(time.perf_counter() - t)
    out["big"] = {"heads": a.models * a.heads, "classes": a.classes,
                  "greedy_median_s": round(statistics.median(times), 3),
                  "greedy_all_s": [round(x, 3) for x in times],
                  "objective": round(sel.objective, 4), "models": len(sel.models),
                  "covered": sum(c is not None for c in sel.choices)}
    small = synthetic_hub(200, 50, 2_000, seed=2)
    task = [f"n{i}" for i in np.random.default_rng(3).choice(2_000, a.classes, replace=False)]
    rows = []
    for B in (5, 10, 20):
        r = {"max_models": B}
        for solver in ("milp", "greedy"):
            t = time.perf_counter()
            s = select_heads(small, task, max_models=B, solver=solver)
            r[solver] = {"objective": round(s.objective, 4), "s": round(time.perf_counter() - t, 3)}
        r["greedy_gap_pct"] = round(100 * (r["milp"]["objective"] - r["greedy"]["objective"])
                                    / max(r["milp"]["objective"], 1e-9), 2)
        rows.append(r)
    out["small_10k_heads"] = rows
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
