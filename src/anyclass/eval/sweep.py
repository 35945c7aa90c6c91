"""Run a protocol's cells as one resumable sweep: in-process, local worker processes, or Ray.

Each cell's result is one JSON file named by its coordinates (protocols.Cell.relpath) and
stamped with its `cell_key`; a rerun skips every cell whose file is there with that key, so
a killed sweep resumes where it stopped. Workers compute and return records; the driver
alone writes result files (atomically), so a Ray cluster needs no shared result folder.
Shared trainings (xd/dg) keep their state under <out>/states/, one training per
(method, source, shots, seed) guarded by a file lock.
"""
from __future__ import annotations

import json
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import __version__
from ..errors import AnyclassError
from .protocols import Cell


@dataclass(frozen=True)
class Engine:
    """What a cell calls. None = the real thing; tests inject fakes (module-level functions,
    so worker processes can unpickle them)."""
    fit_on: Callable | None = None            # anyclass.eval.fitting.fit_on
    create_backbone: Callable | None = None   # anyclass.backbones.factory.create_backbone
    test_classnames: Callable | None = None   # spec -> the test split's class names

    def fit(self) -> Callable:
        if self.fit_on is not None:
            return self.fit_on
        from .fitting import fit_on
        return fit_on

    def backbone(self, spec: str, device: str | None) -> Any:
        key = (spec, device, self.create_backbone)
        if key not in _PROCESS["backbones"]:     # once per worker process
            make = self.create_backbone
            if make is None:
                from ..backbones.factory import create_backbone as make
            _PROCESS["backbones"][key] = make(spec, device)
        return _PROCESS["backbones"][key]

    def classnames(self, spec: str) -> list[str]:
        if self.test_classnames is not None:
            return list(self.test_classnames(spec))
        from ..data.sources import load_dataset
        return list(load_dataset(spec, "test").classnames)


#: per-process state of a worker: its backbone(s), and the last shared training (xd/dg
#: cells of one training run next to each other, so a method that saves no state is still
#: fitted once per worker rather than once per target)
_PROCESS: dict[str, Any] = {"backbones": {}, "fitted": None}


# --------------------------------------------------------------------------- one cell

def harmonic_mean(a: float, b: float) -> float:
    """CoCoOp's H; 0 when either side is 0."""
    return 2 * a * b / (a + b) if a > 0 and b > 0 else 0.0


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _shared_fit(cell: Cell, fit: Callable, backbone: Any, out: Path, kw: dict) -> tuple[Any, bool]:
    """(fitted, reused): one training per train_key across targets, workers and reruns."""
    from ..locks import build_lock
    key = (cell.train_key, str(out), fit)
    memo = _PROCESS["fitted"]
    if memo is not None and memo[0] == key:
        return memo[1], True
    state = out / cell.state_relpath()
    with build_lock(state.with_name(state.name + ".lock"), f"training for {cell.name}",
                    progress=False):
        fitted = fit(cell.method, backbone, cell.source, state_path=state, **kw)
    _PROCESS["fitted"] = (key, fitted)
    return fitted, False


def run_cell(cell: Cell, out: Path, engine: Engine = Engine(), device: str | None = None
             ) -> dict:
    """Fit and evaluate one cell; the result record (not written: the driver writes it)."""
    t0 = time.perf_counter()
    backbone = engine.backbone(cell.backbone, device)
    fit = engine.fit()
    kw = dict(shots=cell.shots, seed=cell.seed, hparams=cell.hparams_dict or None,
              templates=cell.templates, protocol=cell.protocol, progress=False)
    t_fit = time.perf_counter()
    extra: dict = {}
    reused = False
    if cell.protocol == "base2new":
        from ..data.fewshot import base_new_split
        names = engine.classnames(cell.dataset)
        base, new = base_new_split(names)
        # the learned state is kept (states/): analyses such as APEX's ensemble reuse it
        fitted = fit(cell.method, backbone, cell.dataset, classes=base,
                     state_path=out / cell.state_relpath(), **kw)
        t_fit = time.perf_counter() - t_fit
        t_ev = time.perf_counter()
        eb = fitted.evaluate(cell.dataset, classes=base, progress=False)
        en = fitted.evaluate(cell.dataset, classes=new, progress=False)
        metrics = {**{f"base_{k}": v for k, v in eb["metrics"].items()},
                   **{f"new_{k}": v for k, v in en["metrics"].items()},
                   "hm": harmonic_mean(eb["metrics"]["acc1"], en["metrics"]["acc1"])}
        evaluation = {"base": {"classes": [names[i] for i in base],
                               "num_images": eb["num_images"]},
                      "new": {"classes": [names[i] for i in new],
                              "num_images": en["num_images"]}}
    else:
        if cell.source is not None and cell.shots > 0:    # shots 0: nothing to train
            fitted, reused = _shared_fit(cell, fit, backbone, out, kw)
        elif cell.source is not None:
            fitted = fit(cell.method, backbone, cell.source, **kw)
        else:
            fitted = fit(cell.method, backbone, cell.dataset, **kw)
        t_fit = 0.0 if reused else time.perf_counter() - t_fit
        t_ev = time.perf_counter()
        ev = fitted.evaluate(cell.dataset, progress=False)
        metrics = dict(ev["metrics"])
        evaluation = {"num_images": ev["num_images"], "num_classes": ev["num_classes"]}
    t_ev = time.perf_counter() - t_ev
    where = ({"source": cell.source, "target": cell.dataset} if cell.source is not None
             else {"dataset": cell.dataset})
    if cell.source is not None:
        extra["train_shared"] = reused
    return {
        "protocol": cell.protocol, "method": cell.method, **where,
        "backbone": cell.backbone, "seed": cell.seed, "shots": cell.shots,
        "hparams": cell.hparams_dict, "templates": cell.templates,
        "metrics": _jsonable(metrics), "evaluation": _jsonable(evaluation),
        "train": _jsonable({**dict(getattr(fitted, "info", {}) or {}), **extra}),
        "timings_s": {"fit": round(t_fit, 3), "evaluate": round(t_ev, 3),
                      "total": round(time.perf_counter() - t0, 3)},
        "anyclass_version": __version__, "cell": cell.name, "cell_key": cell.key,
    }


def _cell_task(cell: Cell, out: str, engine: Engine, device: str | None
               ) -> tuple[dict | None, str | None, float]:
    """(record, error, seconds): what a worker sends back; errors as one line, never raised,
    so one failing cell does not stop the others."""
    t0 = time.perf_counter()
    try:
        return run_cell(cell, Path(out), engine, device), None, time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 — reported per cell, the sweep goes on
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not isinstance(e, AnyclassError) and os.environ.get("ANYCLASS_DEBUG"):
            traceback.print_exc()
        return None, f"{type(e).__name__}: {msg}" if msg else type(e).__name__, \
            time.perf_counter() - t0


# --------------------------------------------------------------------------- resume

def cell_path(out: Path, cell: Cell) -> Path:
    return out / cell.relpath()


def pending_cells(cells: list[Cell], out: Path) -> tuple[list[Cell], int]:
    """(cells still to compute, number already done). A file that does not parse or was
    written for another configuration is recomputed, with a warning naming it."""
    todo, done = [], 0
    for c in cells:
        p = cell_path(out, c)
        if not p.exists():
            todo.append(c)
            continue
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            warnings.warn(f"{p}: unreadable result ({type(e).__name__}); recomputing it",
                          stacklevel=2)
            todo.append(c)
            continue
        if not isinstance(rec, dict) or rec.get("cell_key") != c.key or "metrics" not in rec:
            warnings.warn(f"{p}: written for another configuration; recomputing it",
                          stacklevel=2)
            todo.append(c)
        else:
            done += 1
    return todo, done


# --------------------------------------------------------------------------- executors

Outcome = tuple[Cell, dict | None, str | None, float]


def _in_process(todo: list[Cell], out: Path, engine: Engine, device: str | None
                ) -> Iterator[Outcome]:
    for c in todo:
        yield (c, *_cell_task(c, str(out), engine, device))


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _processes(todo: list[Cell], out: Path, engine: Engine, device: str | None,
               workers: int) -> Iterator[Outcome]:
    """Spawned processes (no forked torch state), each building its backbone once; torch
    threads split so that all workers together use about the machine's cores."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futs = {pool.submit(_cell_task, c, str(out), engine, device): c for c in todo}
        try:
            for f in as_completed(futs):
                c = futs[f]
                try:
                    yield (c, *f.result())
                except Exception as e:  # noqa: BLE001 — a worker died (e.g. killed)
                    yield c, None, f"worker failed: {type(e).__name__}: {e}", 0.0
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _ray(todo: list[Cell], out: Path, engine: Engine, device: str | None, address: str
         ) -> Iterator[Outcome]:
    """Cells as Ray tasks (1 CPU each). `address`: "auto" (a running cluster), "local"
    (start one here), or a cluster address; an already initialised Ray is used as is."""
    import ray
    started = False
    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items()
               if k.startswith("ANYCLASS_") or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        try:
            ray.init(address=None if address == "local" else address,
                     runtime_env={"env_vars": env}, include_dashboard=False,
                     log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise AnyclassError(f"cannot connect to Ray at {address!r} ({str(e).splitlines()[0]}"
                                f"); start one with `ray start --head` or pass --ray local"
                                ) from None
        started = True
    try:
        task = ray.remote(num_cpus=1)(_cell_task)
        refs = {task.remote(c, str(out), engine, device): c for c in todo}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for r in ready:
                c = refs.pop(r)
                try:
                    yield (c, *ray.get(r))
                except Exception as e:  # noqa: BLE001 — the task's worker died
                    yield c, None, f"ray task failed: {type(e).__name__}: {e}", 0.0
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- the sweep

@dataclass
class SweepSummary:
    total: int
    skipped: int
    computed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def headline(rec: dict) -> str:
    """The cell's main metric(s), for the progress line."""
    m = rec["metrics"]
    if "hm" in m:
        return (f"base {100 * m['base_acc1']:.2f}  new {100 * m['new_acc1']:.2f}  "
                f"hm {100 * m['hm']:.2f}")
    return f"acc1 {100 * m['acc1']:.2f}"


def run_sweep(cells: list[Cell], out: str | Path, *, workers: int = 1, ray: str | None = None,
              device: str | None = None, engine: Engine = Engine(),
              log: Callable[[str], None] = print) -> SweepSummary:
    """Compute the cells not already done under `out`; one line per finished cell."""
    from .runner import write_json
    if workers < 1:
        raise AnyclassError(f"--workers must be >= 1 (got {workers})")
    out = Path(out).resolve()
    _PROCESS["fitted"] = None
    todo, skipped = pending_cells(cells, out)
    summary = SweepSummary(total=len(cells), skipped=skipped)
    how = (f"Ray ({ray})" if ray else f"{workers} worker processes" if workers > 1
           else "in-process")
    log(f"sweep: {len(cells)} cells, {skipped} already done (skipped), {len(todo)} to run "
        f"{how}; results in {out}")
    if not todo:
        return summary
    if ray:
        outcomes = _ray(todo, out, engine, device, ray)
    elif workers > 1:
        outcomes = _processes(todo, out, engine, device, min(workers, len(todo)))
    else:
        outcomes = _in_process(todo, out, engine, device)
    for i, (cell, rec, err, secs) in enumerate(outcomes, 1):
        if rec is None:
            summary.failed.append((cell.name, err or "unknown error"))
            warnings.warn(f"cell {cell.name} failed: {err}", stacklevel=2)
            continue
        write_json(rec, cell_path(out, cell))
        summary.computed += 1
        log(f"[{i}/{len(todo)}] {cell.name}: {headline(rec)}  ({secs:.1f} s)")
    log(f"sweep: {summary.computed} computed, {summary.skipped} skipped, "
        f"{len(summary.failed)} failed")
    return summary
