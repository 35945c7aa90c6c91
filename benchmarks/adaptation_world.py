"""Training-free adaptation on every offline-world task (issue 3's must-show table).

    ANYCLASS_WORLD=full python benchmarks/adaptation_world.py run [--methods ...] [--seeds 1 2 3]
    ANYCLASS_WORLD=full python benchmarks/adaptation_world.py report

`run` evaluates, on every world task × {colour, sketch}: zero-shot (deterministic: once),
tip-adapter and tip-adapter-f at 1/2/4/8/16 shots, tip-x at 16 shots, sus-x name-only, for
each seed; one backbone and the feature cache are shared by all runs. Results are appended
to runs/adaptation/results.jsonl (one JSON per run; a rerun skips finished runs, so the
script can be stopped and resumed). `report` writes runs/adaptation/summary.{json,md}:
means over tasks per method × shots × domain, and a per-task table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "runs" / "adaptation"
SHOTS = (1, 2, 4, 8, 16)
DOMAINS = ("colour", "sketch")


def plan(methods: list[str], seeds: list[int]) -> list[tuple[str, int, int]]:
    """(method, shots, seed) per task × domain, in the order they run."""
    jobs = []
    for m in methods:
        if m == "zeroshot":
            jobs.append((m, 0, 0))
        elif m in ("tip-adapter", "tip-adapter-f"):
            jobs += [(m, k, s) for k in SHOTS for s in seeds]
        elif m == "tip-x":
            jobs += [(m, 16, s) for s in seeds]
        elif m == "sus-x":
            jobs += [(m, 0, s) for s in seeds]
        else:
            raise SystemExit(f"unknown method {m}")
    return jobs


def key(r: dict) -> tuple:
    return (r["dataset"], r["method"], r["shots"], r["seed"])


def run(a) -> None:
    from anyclass.backbones.factory import create_backbone
    from anyclass.eval.runner import EvalConfig, run_eval
    from anyclass.world.build import ensure_world
    world = ensure_world()
    bb = create_backbone("builtin")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.jsonl"
    done = set()
    if path.exists():
        done = {key(json.loads(x)) for x in path.read_text().splitlines() if x.strip()}
    jobs = plan(a.methods, a.seeds)
    t0 = time.perf_counter()
    n = 0
    for m, k, s in jobs:              # method-major: a partial run still gives whole columns
        for dom in DOMAINS:
            for task in world.tasks:
                ds = f"world:{task}@{dom}"
                if (ds, m, k, s) in done:
                    continue
                cfg = EvalConfig(ds, method=m, shots=k, seed=max(s, 1), templates=a.templates)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        r = run_eval(cfg, backbone=bb, progress=False)
                except Exception as e:  # noqa: BLE001 — one failure must not stop the table
                    print(f"FAILED {ds} {m} {k} {s}: {type(e).__name__}: {e}", flush=True)
                    continue
                r["seed"] = s
                if r.get("chosen"):
                    r["chosen"].pop("val_acc_per_epoch", None)
                with path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                n += 1
                print(f"{time.perf_counter() - t0:7.1f}s {ds} {m} shots={k} seed={s} "
                      f"acc1={100 * r['metrics']['acc1']:.1f}", flush=True)
    print(f"{n} runs in {time.perf_counter() - t0:.0f} s; {machine()}")


def _label(m: str, k: int) -> str:
    return m if m in ("zeroshot", "sus-x") else f"{m} {k}-shot"


def report(a) -> None:
    from anyclass.world.build import ensure_world
    world = ensure_world()
    rows = [json.loads(x) for x in (OUT / "results.jsonl").read_text().splitlines() if x.strip()]
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        task, _, dom = r["dataset"].removeprefix("world:").partition("@")
        acc[(r["method"], r["shots"], dom)][task].append(100 * r["metrics"]["acc1"])
    order = [(m, k) for m, k, s in plan(["zeroshot", "tip-adapter", "tip-adapter-f", "tip-x",
                                          "sus-x"], [1]) if True]
    tasks = list(world.tasks)
    summary = {"world": world.cfg.key(), "machine": machine(), "methods": []}
    lines = ["| method | " + " | ".join(f"{d} mean acc1 (tasks, seeds)" for d in DOMAINS)
             + " |", "|---|" + "---|" * len(DOMAINS)]
    for m, k in order:
        cells, entry = [], {"method": m, "shots": k}
        for dom in DOMAINS:
            per = acc.get((m, k, dom), {})
            if not per:
                cells.append("—")
                continue
            task_means = [statistics.mean(v) for v in per.values()]
            # seed-to-seed spread of the over-task mean
            nseed = min(len(v) for v in per.values())
            seed_means = [statistics.mean(per[t][i] for t in per) for i in range(nseed)]
            sd = statistics.stdev(seed_means) if len(seed_means) > 1 else 0.0
            mean = statistics.mean(task_means)
            entry[dom] = {"mean": mean, "sd_over_seeds": sd, "tasks": len(per), "seeds": nseed}
            cells.append(f"{mean:.1f} ± {sd:.1f} ({len(per)}, {nseed})")
        summary["methods"].append(entry)
        lines.append(f"| {_label(m, k)} | " + " | ".join(cells) + " |")
    per_task = []
    cols = [(m, k) for m, k in order if m in ("zeroshot", "sus-x") or k in (1, 16)]
    for dom in DOMAINS:
        per_task.append(f"\n**{dom}** (acc1, mean over seeds)\n")
        per_task.append("| task | " + " | ".join(_label(m, k) for m, k in cols) + " |")
        per_task.append("|---|" + "---|" * len(cols))
        for t in tasks:
            vals = [acc.get((m, k, dom), {}).get(t) for m, k in cols]
            per_task.append(f"| {t} | " + " | ".join(
                f"{statistics.mean(v):.1f}" if v else "—" for v in vals) + " |")
    md = "\n".join(lines + per_task) + "\n"
    (OUT / "summary.md").write_text(md)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--methods", nargs="+",
                   default=["zeroshot", "tip-adapter", "tip-x", "tip-adapter-f", "sus-x"])
    r.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    r.add_argument("--templates", default="single")
    sub.add_parser("report")
    a = ap.parse_args()
    run(a) if a.cmd == "run" else report(a)


if __name__ == "__main__":
    main()
