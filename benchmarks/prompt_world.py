"""Prompt learning on the offline world: the tables of docs/benchmarks.md, each one sweep.

    python benchmarks/prompt_world.py b2n      --seeds 1,2,3 --workers 2
    python benchmarks/prompt_world.py fewshot  --seeds 1 --workers 2
    python benchmarks/prompt_world.py xd       --seeds 1 --workers 2
    python benchmarks/prompt_world.py dg       --seeds 1 --workers 2
    python benchmarks/prompt_world.py ensemble --seeds 1
    python benchmarks/prompt_world.py report   (markdown tables of everything under --out)

Every sweep writes one result JSON per cell under --out/<protocol>/ and resumes: rerunning a
command computes only the missing cells. The schedules are the papers' except where
WORLD_SCHEDULE says otherwise (2 CPU cores: the MiniLM text tower costs ~5 ms per class text
forward+backward, so methods whose step encodes every class text are cut in epochs); every
deviation is printed with the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from anyclass.methods.training import bf16_pays

#: bf16 autocast only where it pays (CUDA, or a CPU with bf16 units)
AMP = bf16_pays()

B2N_METHODS = ["zeroshot", "apex", "vpt", "maple", "coop", "cocoop"]   # cheap + key first
FEWSHOT_METHODS = ["linear-probe", "coop", "maple", "apex", "tip-adapter-f"]
#: CoCoOp encodes K texts per image: on world:source (K = 318) one epoch of 4-shot training is
#: ~47 min and scoring the 4 x 6,360 DG test images ~9 h on 2 CPU cores -> GPU only
TRANSFER_METHODS = ["zeroshot", "coop", "maple", "apex"]

#: departures from the papers' schedules, per protocol (documented with the tables)
WORLD_SCHEDULE = {
    "b2n": {"coop": {"epochs": 25}, "cocoop": {"epochs": 2}},
    "fewshot": {"coop": {"epochs": 25}},
    # 318 source classes: every step encodes 318 class texts; bfloat16 autocast on the CPU
    # (amp) halves that where the CPU has bf16 units (elsewhere it is 6-9x slower: off),
    # MaPLe takes 8x larger steps (lr scaled linearly)
    "xd": {"coop": {"epochs": 5, "amp": AMP}, "maple": {"epochs": 2, "batch_size": 32,
           "lr": 0.0035 * 8, "amp": AMP}, "apex": {"amp": AMP}},
}
WORLD_SCHEDULE["dg"] = WORLD_SCHEDULE["xd"]
#: CoOp's random resized crop draws 8-100 % of the image; at the world's 64 px an 8 % crop
#: is an 18-px corner of an emoji, upsampled: the loss on such crops starts at chance level
#: (benchmarks/prompt_probe.py, world:tools base acc: APEX 81.7 % at 0.08-1 vs 87.2 % at 0.5-1;
#: VPT 63.1 vs 71.1).
#: The world runs every prompt method with Tip-Adapter's crop range instead.
WORLD_CROP = {"crop_scale": [0.5, 1.0]}
PROMPT_METHODS = ("coop", "cocoop", "vpt", "maple", "apex")
for _p in ("b2n", "fewshot", "xd", "dg"):
    WORLD_SCHEDULE[_p] = {m: {**WORLD_SCHEDULE.get(_p, {}).get(m, {}), **WORLD_CROP}
                          for m in PROMPT_METHODS}
#: few-shot: a spread of tasks from easy to fine-grained (all 21 cost ~3 h on 2 cores)
FEWSHOT_TASKS = ["objects", "animals", "fruit_veg", "vehicles", "weather", "clocks",
                 "hand_gestures"]
XD_SHOTS = 4


def _tasks() -> list[str]:
    from anyclass.eval.protocols import world_downstream_targets
    return world_downstream_targets()


def sweep(protocol: str, methods: list[str], datasets: list[str] | None, seeds: list[int],
          shots: list[int] | None, out: Path, workers: int) -> int:
    from anyclass.eval.protocols import expand, make_grid
    from anyclass.eval.sweep import run_sweep
    sched = WORLD_SCHEDULE.get(protocol, {})
    grid = make_grid(None, protocol={"b2n": "base2new"}.get(protocol, protocol),
                     methods=methods, datasets=datasets, seeds=seeds, shots=shots,
                     hparams={m: dict(h) for m, h in sched.items() if m in methods})
    cells = expand(grid)
    summary = run_sweep(cells, out, workers=workers)
    return 1 if summary.failed else 0


def seed_summary(out: Path) -> str:
    """Base-to-new per seed (mean of the tasks; HM of the mean base and new, as the papers)
    and the mean of the seeds ± the standard deviation of the seed means."""
    import statistics as st
    from collections import defaultdict
    cells: dict = defaultdict(lambda: defaultdict(list))
    for f in sorted((out / "base2new").rglob("*.json")):
        r = json.loads(f.read_text())
        cells[r["method"]][r["seed"]].append((100 * r["metrics"]["base_acc1"], 100 * r["metrics"]["new_acc1"]))
    seeds = sorted({s for m in cells.values() for s in m})
    lines = ["| method | " + " | ".join(f"seed {s} B / N / HM" for s in seeds)
             + " | mean of seeds B / N / HM (± std of seed means) |", "|---|" + "---|" * (len(seeds) + 1)]
    for meth in [m for m in B2N_METHODS if m in cells]:
        per = {}
        for s, v in cells[meth].items():
            b, n = (sum(x[i] for x in v) / len(v) for i in (0, 1))
            per[s] = (b, n, 2 * b * n / (b + n))
        row = [" / ".join(f"{x:.2f}" for x in per[s]) if s in per else "–" for s in seeds]
        mean = [st.mean(p[i] for p in per.values()) for i in range(3)]
        sd = [st.pstdev([p[i] for p in per.values()]) for i in range(3)]
        lines.append(f"| {meth} | " + " | ".join(row) + " | "
                     + " / ".join(f"{m:.2f} ± {d:.2f}" for m, d in zip(mean, sd)) + f" ({len(per)} seeds) |")
    return "\n".join(lines)


def report(out: Path) -> None:
    from anyclass.eval.report import load_results, protocol_tables
    results = load_results([str(out)])
    for t in protocol_tables(results, "acc1").values():
        print(f"## {t.title}\n\n{t.to_markdown()}\n")
    if (out / "base2new").is_dir():
        print(f"## Base-to-new by seed\n\n{seed_summary(out)}\n")
    print("Schedules departing from the papers':", json.dumps(WORLD_SCHEDULE))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["b2n", "fewshot", "xd", "dg", "ensemble", "report"])
    p.add_argument("--seeds", default="1")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tasks", help="comma-separated world tasks (default: the table's)")
    p.add_argument("--methods", help="comma-separated subset of the table's methods")
    p.add_argument("--out", type=Path, default=Path("runs/bench-prompt"))
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    tasks = [f"world:{t}" for t in a.tasks.split(",")] if a.tasks else None
    only = (lambda ms: [m for m in ms if m in a.methods.split(",")]) if a.methods else (lambda ms: ms)
    if a.what == "b2n":
        return sweep("b2n", only(B2N_METHODS), tasks or _tasks(), seeds, [16], a.out, a.workers)
    if a.what == "fewshot":
        return sweep("fewshot", only(FEWSHOT_METHODS), tasks or [f"world:{t}" for t in FEWSHOT_TASKS],
                     seeds, [1, 2, 4, 8, 16], a.out, a.workers)
    if a.what in ("xd", "dg"):
        return sweep(a.what, only(TRANSFER_METHODS), tasks, seeds, [XD_SHOTS], a.out, a.workers)
    if a.what == "ensemble":
        from apex_ensemble import run as run_ensemble
        return run_ensemble(tasks or _tasks(), seeds, a.out)
    report(a.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
