"""Training-free adaptation on every offline-world task (issue 3's must-show table).

    ANYCLASS_WORLD=full python benchmarks/adaptation_world.py run [--methods ...] [--seeds 1 2 3]
    ANYCLASS_WORLD=full python benchmarks/adaptation_world.py report

`run` evaluates, on every downstream world task × {colour, sketch}: zero-shot
(deterministic: once), tip-adapter and tip-adapter-f at 1/2/4/8/16 shots, tip-x at 16 shots,
sus-x name-only, for each seed (zero-shot and sus-x on every domain); one backbone and the feature cache are shared by all runs. Results are appended
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
DOMAINS = ("colour", "sketch")            # few-shot methods (train splits of these)
ALL_DOMAINS = ("colour", "sketch", "rendition", "v2", "adversarial")   # name-only methods


def domains_for(method: str) -> tuple[str, ...]:
    """zero-shot and SuS-X need no labelled image: run them on every domain."""
    return ALL_DOMAINS if method in ("zeroshot", "sus-x") else DOMAINS


def tasks_of(world) -> list[str]:
    from anyclass.world.tasks import downstream_tasks
    return downstream_tasks(world.tasks)


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
    path = OUT / a.results
    done = {key(r) for r in _load()}
    jobs = plan(a.methods, a.seeds)
    t0 = time.perf_counter()
    n = 0
    for m, k, s in jobs:              # method-major: a partial run still gives whole columns
        for dom in domains_for(m):
            for task in tasks_of(world):
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


def _load() -> list[dict]:
    """Every finished run (results*.jsonl: parallel runs write separate files)."""
    return [json.loads(x) for p in sorted(OUT.glob("results*.jsonl"))
            for x in p.read_text().splitlines() if x.strip()]


def _label(m: str, k: int) -> str:
    return m if m in ("zeroshot", "sus-x") else f"{m} {k}-shot"


def report(a) -> None:
    from anyclass.world.build import ensure_world
    world = ensure_world()
    rows = _load()
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        task, _, dom = r["dataset"].removeprefix("world:").partition("@")
        acc[(r["method"], r["shots"], dom)][task].append(100 * r["metrics"]["acc1"])
    order = [(m, k) for m, k, s in plan(["zeroshot", "tip-adapter", "tip-adapter-f", "tip-x",
                                          "sus-x"], [1]) if True]
    tasks = tasks_of(world)
    summary = {"world": world.cfg.key(), "machine": machine(), "methods": []}
    lines = ["| method | " + " | ".join(f"{d} mean acc1 (tasks, seeds)" for d in ALL_DOMAINS)
             + " |", "|---|" + "---|" * len(ALL_DOMAINS)]
    for m, k in order:
        cells, entry = [], {"method": m, "shots": k}
        for dom in ALL_DOMAINS:
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


def _paired(rows: list[dict], a: tuple, b: tuple, dom: str) -> dict:
    """Method a minus method b, paired by (task, seed): mean difference and how many
    (task, seed) pairs a wins / ties / loses."""
    idx = {(r["dataset"], r["method"], r["shots"], r["seed"]): 100 * r["metrics"]["acc1"]
           for r in rows}
    diffs = []
    for (ds, m, k, s), v in idx.items():
        if (m, k) != a or not ds.endswith("@" + dom):
            continue
        other = idx.get((ds, b[0], b[1], s if b[0] != "zeroshot" else 0))
        if other is not None:
            diffs.append(v - other)
    if not diffs:
        return {}
    return {"mean_diff": round(statistics.mean(diffs), 2), "pairs": len(diffs),
            "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs)}


def checks(a) -> None:
    """The concrete checks behind the analysis in docs/benchmarks.md."""
    from anyclass.backbones.factory import create_backbone
    from anyclass.eval.runner import EvalConfig, run_eval
    from anyclass.world.build import ensure_world
    world = ensure_world()
    rows = _load()
    out: dict = {"paired": {}}
    comps = {"tip-adapter 16 - zeroshot": (("tip-adapter", 16), ("zeroshot", 0)),
             "tip-adapter 1 - zeroshot": (("tip-adapter", 1), ("zeroshot", 0)),
             "tip-adapter-f 16 - tip-adapter 16": (("tip-adapter-f", 16), ("tip-adapter", 16)),
             "tip-adapter-f 1 - tip-adapter 1": (("tip-adapter-f", 1), ("tip-adapter", 1)),
             "tip-x 16 - tip-adapter 16": (("tip-x", 16), ("tip-adapter", 16)),
             "sus-x - zeroshot": (("sus-x", 0), ("zeroshot", 0))}
    for name, (x, y) in comps.items():
        out["paired"][name] = {d: _paired(rows, x, y, d) for d in ALL_DOMAINS}
    # what the searches chose
    chosen: dict = defaultdict(list)
    for r in rows:
        c = r.get("chosen") or {}
        dom = r["dataset"].rpartition("@")[2]
        if r["method"] == "tip-adapter-f":
            chosen[("tip-f epoch", dom)].append(c.get("epoch"))
        if r["method"] == "tip-x":
            chosen[("tip-x gamma", dom)].append(c.get("gamma"))
        if r["method"] == "sus-x":
            chosen[("sus-x held-out support acc", dom)].append(100 * c.get("val_acc", 0))
            chosen[("sus-x test acc", dom)].append(100 * r["metrics"]["acc1"])
            chosen[("sus-x gamma", dom)].append(c.get("gamma"))
            chosen[("sus-x alpha", dom)].append(c.get("alpha"))
    out["chosen"] = {f"{k[0]} ({k[1]})": {"median": statistics.median(v), "min": min(v),
                                          "max": max(v), "n": len(v)}
                     for k, v in chosen.items() if v and None not in v}
    # SuS retrieval precision: which concept each pool image shows (analysis only: the
    # pool's render plan; the method never sees it)
    from anyclass.world import pool as wpool
    from anyclass.world.tasks import get_tasks
    per = wpool.PER_CONCEPT.get(world.cfg.name, 8)
    concept_of = {name: c.id for c, _, name in wpool._plan(world, per)}
    prec: dict = {}
    for r in rows:
        if r["method"] != "sus-x" or r["seed"] != 1 or "support" not in r:
            continue
        m = json.loads((Path(r["support"]["root"]) / "manifest.json").read_text())
        task = r["dataset"].removeprefix("world:").partition("@")[0]
        cids = get_tasks(world.cfg)[task].concept_ids
        hits = [concept_of.get(Path(src).name) == cids[lab]
                for src, (_, lab) in zip(m["sources"], m["items"])]
        prec[r["dataset"]] = round(100 * sum(hits) / max(1, len(hits)), 1)
    out["support_precision_pct"] = prec
    out["support_precision_mean_pct"] = round(statistics.mean(prec.values()), 1) if prec else None
    out["pool_renders_per_concept"] = per
    if getattr(a, "no_ablations", False):
        (OUT / "checks.json").write_text(json.dumps(out, indent=1))
        print(json.dumps({k: out[k] for k in ("paired", "support_precision_mean_pct")}, indent=1))
        return
    # flip-crop augmentation vs plain cache features (chiral classes: moon phases, arrows),
    # and Tip-F's learning rate, 16 shots, seed 1
    bb = create_backbone("builtin")

    def acc(ds: str, m: str, **hp) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = run_eval(EvalConfig(ds, method=m, shots=16, seed=1, hparams=hp), backbone=bb,
                         progress=False)
        return round(100 * r["metrics"]["acc1"], 1)
    aug: dict = {}
    for dom in DOMAINS:
        for task in tasks_of(world):
            ds = f"world:{task}@{dom}"
            row = {"tip passes 10": acc(ds, "tip-adapter", augment_passes=10),
                   "tip passes 0": acc(ds, "tip-adapter", augment_passes=0),
                   "tip-f passes 0 lr 1e-3": acc(ds, "tip-adapter-f", augment_passes=0)}
            if dom == "sketch":
                for lr in (1e-4, 1e-5):
                    row[f"tip-f passes 0 lr {lr:g}"] = acc(ds, "tip-adapter-f",
                                                           augment_passes=0, lr=lr)
            aug[ds] = row
            print(ds, row, flush=True)
    out["augment_and_lr_16shot_seed1"] = aug
    out["augment_and_lr_means"] = {
        dom: {k: round(statistics.mean(v[k] for d, v in aug.items() if d.endswith(dom)), 2)
              for k in next(v for d, v in aug.items() if d.endswith(dom))}
        for dom in DOMAINS}
    (OUT / "checks.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("paired", "augment_and_lr_means")}, indent=1))


def oracle(a) -> None:
    """Headroom check (analysis only, never a reported method): search each method's
    hyperparameters (and Tip-F's epoch) on the TEST split itself, 16 shots, seed 1. If a
    method does not beat Tip-Adapter even then, its extra term / fine-tuning carries no
    information in this world; if it does, the val-based choice is what loses."""
    import torch
    from anyclass.backbones.factory import create_backbone
    from anyclass.data.fewshot import sample_few_shot
    from anyclass.data.sources import load_dataset
    from anyclass.eval import featuresets, runner
    from anyclass.features.extract import extract_features
    from anyclass.methods import create_method
    from anyclass.methods.classifier import build_text_classifier
    from anyclass.world.build import ensure_world
    world = ensure_world()
    bb = create_backbone("builtin")
    ext = {"batch_size": 128, "progress": False}
    res: dict = defaultdict(dict)
    for dom in DOMAINS:
        for task in tasks_of(world):
            ds = f"world:{task}@{dom}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                test = load_dataset(ds, "test")
                full = load_dataset(ds, "train")
                idx = sample_few_shot(full, 16, 1).meta["source_indices"]
                train = featuresets.augmented_train(bb, full, idx, 10, "flip_crop", ext)
                val = featuresets.featureset(extract_features(bb, load_dataset(ds, "val"), **ext))
                te = featuresets.featureset(extract_features(bb, test, **ext))
            W = build_text_classifier(bb, test.classnames, ["a photo of a {}."])
            row = {}
            for m in ("tip-adapter", "tip-adapter-f", "tip-x"):
                for on, split in (("val", val), ("test", te)):
                    meth = create_method(m, logit_scale=float(bb.logit_scale)).fit(W, train, split)
                    with torch.no_grad():
                        acc = (meth.predict_logits(te.features).argmax(1) == te.labels)
                    row[f"{m} searched on {on}"] = round(100 * float(acc.float().mean()), 1)
            res[dom][task] = row
            print(ds, row, flush=True)
    means = {dom: {k: round(statistics.mean(r[k] for r in res[dom].values()), 2)
                   for k in next(iter(res[dom].values()))} for dom in DOMAINS}
    out = {"per_task": res, "means": means}
    (OUT / "oracle.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(means, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--methods", nargs="+",
                   default=["zeroshot", "tip-adapter", "tip-x", "tip-adapter-f", "sus-x"])
    r.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    r.add_argument("--templates", default="single")
    r.add_argument("--results", default="results.jsonl", help="file under runs/adaptation/")
    sub.add_parser("report")
    c = sub.add_parser("checks")
    c.add_argument("--no-ablations", action="store_true",
                   help="paired differences, searched values and support precision only "
                        "(skip the augmentation / learning-rate re-runs)")
    sub.add_parser("oracle")
    a = ap.parse_args()
    {"run": run, "report": report, "checks": checks, "oracle": oracle}[a.cmd](a)


if __name__ == "__main__":
    main()
