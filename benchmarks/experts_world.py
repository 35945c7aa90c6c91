"""The offline world's expert hub: one row per expert (architecture, parameters, concepts,
domain, training data, training time, accuracy), then means per architecture kind.

    ANYCLASS_WORLD=full python benchmarks/experts_world.py [--json out.json] [--tasks]

Builds the hub first if needed (`ensure_world_experts`). Accuracies are top-1 over the
expert's own concepts on held-out renders (4 per concept and domain, seeds disjoint from
training and from every task split), in each domain; "own" is the mean over the domain(s)
the expert was trained on. `--tasks` adds, per world task and domain, the accuracy of each
expert that covers every class of the task, restricted to those classes' heads, on the
task's test split (read through the logits cache).
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

from anyclass.world.build import ensure_world  # noqa: E402
from anyclass.world.experts import ensure_world_experts, expert_records, hub_dir  # noqa: E402


def describe_arch(a: dict) -> str:
    if a["kind"] == "timm":
        return f"timm {a['timm_name']} @{a['input_size']}px"
    if a["kind"] == "cnn":
        return f"cnn {'-'.join(map(str, a['widths']))}x{a['depth']} @{a['input_size']}px"
    if a["kind"] == "vit":
        return f"vit w{a['widths'][0]} d{a['depth']} p{a['patch']} @{a['input_size']}px"
    return f"mlp {'-'.join(map(str, a['widths']))} @{a['input_size']}px"


def table(recs: list[dict]) -> list[str]:
    lines = ["| expert | architecture | params | heads | domain | train imgs x epochs | train s | "
             "train acc | held-out colour | held-out sketch | own | chance |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in recs:
        h = r["heldout_acc"]
        lines.append(f"| {r['name']} | {describe_arch(r['arch'])} | {r['num_params'] / 1e3:.0f}k | "
                     f"{len(r['head_names'])} | {r['domain']} | {r['n_train_images']} x {r['epochs']} | "
                     f"{r['seconds']['train']:.0f} | {100 * r['train_acc']:.1f} | {100 * h['colour']:.1f} | "
                     f"{100 * h['sketch']:.1f} | {100 * r['heldout_acc_own']:.1f} | {100 * r['chance']:.1f} |")
    return lines


def per_kind(recs: list[dict]) -> list[str]:
    by = defaultdict(list)
    for r in recs:
        by[r["arch"]["kind"]].append(r)
    lines = ["| kind | experts | mean params | mean train s | mean own held-out acc | mean chance |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, rs in sorted(by.items()):
        lines.append(f"| {k} | {len(rs)} | {statistics.mean(r['num_params'] for r in rs) / 1e3:.0f}k | "
                     f"{statistics.mean(r['seconds']['train'] for r in rs):.0f} | "
                     f"{100 * statistics.mean(r['heldout_acc_own'] for r in rs):.1f} | "
                     f"{100 * statistics.mean(r['chance'] for r in rs):.1f} |")
    return lines


def task_table(world, recs: list[dict]) -> tuple[list[str], list[dict]]:
    """Accuracy of every expert covering a whole task, on the task's test split."""
    import numpy as np

    from anyclass.hub.experts import create_expert, expert_logits
    from anyclass.data.sources import load_dataset
    rows, out = [], []
    for task, info in world.tasks.items():
        for r in recs:
            ids = r["concept_ids"]
            if not all(c in ids for c in info.concept_ids):
                continue
            cols = [ids.index(c) for c in info.concept_ids]
            e = create_expert(r["spec"])
            for dom in ("colour", "sketch"):
                ds = load_dataset(f"world:{task}@{dom}", "test")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    logits = expert_logits(e, ds, progress=False)
                acc = float((logits[:, cols].argmax(1) == np.asarray(ds.labels)).mean())
                out.append({"task": task, "domain": dom, "expert": r["name"], "acc1": acc,
                            "classes": info.num_classes})
                rows.append(f"| {task} | {dom} | {r['name']} | {info.num_classes} | {100 * acc:.1f} |")
    return ["| task | domain | expert (covers all classes) | classes | acc1 |", "|---|---|---|---:|---:|"] + rows, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="also write the records (and task results) to this file")
    ap.add_argument("--tasks", action="store_true", help="accuracy of covering experts on world tasks")
    a = ap.parse_args()
    t0 = time.perf_counter()
    world = ensure_world()
    ensure_world_experts(world)
    recs = expert_records(world, progress=False)
    index = json.loads((hub_dir(world) / "hub.json").read_text())
    print(f"# Expert hub of the {world.cfg.name} world ({len(recs)} experts, hub {index['hub']})\n")
    print(f"machine: {machine()}")
    print(f"hub build time: {index['built_seconds']} s (as recorded when built; "
          f"sum of per-expert totals {sum(r['seconds']['total'] for r in recs):.0f} s)\n")
    print("\n".join(table(recs)) + "\n")
    print("\n".join(per_kind(recs)) + "\n")
    results: dict = {"world": world.cfg.key(), "hub": index, "experts": recs}
    if a.tasks:
        lines, results["tasks"] = task_table(world, recs)
        print("\n".join(lines) + "\n")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
