"""Evaluation of test-time methods (TPT, PromptAlign, PromptSync): same result keys as
runner.run_eval, plus what tuning did (images that fell back, untuned accuracy, per-image time).

On the offline world the methods need no flags: a method that tunes MaPLe's prompts and is
given none starts from MaPLe trained on `world:source` (16 shots, built on first use and
cached), and one that aligns statistics and is given none gets them computed once and cached:
from `world:source` when it has every class of the task, else from images of the task's class
names retrieved from the world's pool (a SuS-style proxy source). AugMix on the views follows
each method's reference code unless the user sets it: TPT's adds it on every task but
`world:source` and its shifted domains (its fine-grained sets, not ImageNet and its variants);
PromptAlign's (and so PromptSync's) never does.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.sources import load_dataset
from ..errors import AnyclassError
from .metrics import classification_metrics

#: MaPLe as PromptAlign starts from it (2 context words "a photo", depth 3, 2 epochs on the
#: ImageNet-like source), with the world's departures of the cross-dataset protocol (bigger
#: steps with a linearly scaled lr, bfloat16, 0.5–1 crops: docs/benchmarks.md)
WORLD_SOURCE = "world:source"
#: amp: bf16 where it pays (`bf16_pays`), decided per machine when the prompts are trained
WORLD_MAPLE = dict(depth=3, epochs=2, batch_size=32, lr=0.0035 * 8, crop_scale=[0.5, 1.0])
WORLD_SHOTS = 16


def _home() -> Path:
    import os
    return Path(os.environ.get("ANYCLASS_HOME", "~/.cache/anyclass")).expanduser() / "tta"


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in s)


def world_source_prompts(backbone, seed: int = 1, recipe: dict | None = None,
                         progress: bool = True) -> Path:
    """MaPLe trained on world:source (cached per backbone, seed and recipe)."""
    from .fitting import fit_on
    from ..methods.training import bf16_pays
    recipe = dict(WORLD_MAPLE if recipe is None else recipe)
    recipe.setdefault("amp", bf16_pays(backbone.device))
    key = hashlib.sha256(json.dumps([backbone.weights_hash, seed, recipe, WORLD_SHOTS],
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = _home() / _slug(backbone.identity) / f"maple-source-s{seed}-{key}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fit_on("maple", backbone, WORLD_SOURCE, shots=WORLD_SHOTS, seed=seed, hparams=recipe,
               state_path=path, progress=progress)
    return path


def stats_path_for(backbone, init, classnames: list[str], layers: int, pool: str | None = None
                   ) -> Path:
    key = hashlib.sha256(json.dumps([init.key, layers, pool, classnames if pool else None])
                         .encode()).hexdigest()[:12]
    return _home() / _slug(backbone.identity) / f"stats-{key}.safetensors"


def ensure_stats(backbone, init, classnames: list[str], layers: int, source: str | None = None,
                 pool: str | None = None, per_class: int = 16, seed: int = 1,
                 out: str | Path | None = None, progress: bool = True) -> Path:
    """Statistics of a labelled `source` dataset, or of a proxy source retrieved from `pool`
    for `classnames` (cached unless `out`)."""
    from ..methods.tta_stats import compute_stats
    path = Path(out) if out else stats_path_for(backbone, init, classnames if pool else [],
                                                 layers, pool or source)
    if out is None and path.exists():
        return path
    if pool is not None:
        from ..support import build_support
        sus = build_support(backbone, classnames, pool=pool, per_class=per_class, seed=seed,
                            progress=progress)
        ds, desc = sus.dataset, f"{pool} (retrieved for {len(classnames)} classes)"
    else:
        ds, desc = load_dataset(source, "train"), source
    compute_stats(backbone, init, ds, layers, desc, progress=progress).save(path)
    return path


def world_defaults(method, dataset: str, backbone, classnames: list[str], seed: int,
                   progress: bool = True) -> None:
    """Fill in `init` / `stats` / `augmix` for a world dataset (module docstring)."""
    from ..methods.tta import prompt_init
    if not dataset.startswith("world:"):
        return
    if method.augmix is None:             # TPT's rule: AugMix on fine-grained sets, not ImageNet's
        method.augmix = method.augments_fine_grained and dataset.split("@")[0] != WORLD_SOURCE
    if method.tunes_vision and method.init is None:
        method.init = str(world_source_prompts(backbone, seed, progress=progress))
    if "stats" in method.get_params() and method.stats is None:
        init = prompt_init(backbone, method.init)
        source_names = set(load_dataset(WORLD_SOURCE, "train").classnames)
        if all(c in source_names for c in classnames):
            method.stats = str(ensure_stats(backbone, init, classnames, method.layers,
                                            source=WORLD_SOURCE, progress=progress))
        else:
            method.stats = str(ensure_stats(backbone, init, classnames, method.layers,
                                            pool="world:pool", seed=seed, progress=progress))


def run_key(method, backbone, ds) -> str:
    """What a partial run's results depend on: method, θ_0, statistics, backbone, images."""
    from ..hashing import file_sha256
    stats = getattr(method, "stats", None)
    parts = [method.get_params(), method.init_.key, file_sha256(stats) if stats else None,
             backbone.identity, backbone.weights_hash, ds.paths, list(ds.classnames)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _load_partial(path: Path | None, key: str) -> dict[str, torch.Tensor] | None:
    if path is None or not path.exists():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
        return load_file(str(path))
    except Exception:  # noqa: BLE001 — a damaged partial file is recomputed, not fatal
        return None


def _save_partial(path: Path, key: str, parts: list, rows: list) -> None:
    from safetensors.torch import save_file

    from ..locks import atomic_path
    from ..methods.tta import TuneResult
    r = TuneResult.cat(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"logits": r.logits, "untuned": r.untuned, "failed": r.failed,
                   "idx": torch.cat(rows)}, str(tmp), metadata={"key": key})


def tta_predict(method, backbone, ds, progress: bool = True, checkpoint: str | Path | None = None,
                every_s: float = 30.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tuned logits, untuned logits, failed flags and row indices over the readable images of
    `ds` (unreadable ones are warned about and skipped). With `checkpoint`, the images done
    so far are saved there (atomically, every `every_s` seconds) and a rerun of the same run
    resumes after them; the file is removed when the run completes."""
    from ..methods.training import iter_batches
    from ..methods.tta import TuneResult
    ckpt = None if checkpoint is None else Path(checkpoint)
    key = run_key(method, backbone, ds) if ckpt is not None else ""
    out: list[TuneResult] = []
    rows: list[torch.Tensor] = []
    part = _load_partial(ckpt, key)
    todo = list(range(len(ds)))
    if part is not None:
        out.append(TuneResult(part["logits"], part["untuned"], part["failed"].bool()))
        rows.append(part["idx"].long())
        done = set(part["idx"].tolist())
        todo = [i for i in todo if i not in done]
    per = method.images_per_batch(len(ds.classnames), backbone.device)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(ds), initial=len(ds) - len(todo), desc=f"{type(method).__name__} {ds.name}",
                   unit="img", leave=False)
    last = time.perf_counter()
    if todo:
        rest = ds.subset(todo)
        where = torch.as_tensor(todo)
        for x, idx in iter_batches(backbone, rest, batch_size=per, progress=False):
            out.append(method.predict(backbone, x))
            rows.append(where[idx])
            if bar is not None:
                bar.update(len(idx))
                bar.set_postfix(failed=int(sum(int(r.failed.sum()) for r in out)))
            if ckpt is not None and time.perf_counter() - last > every_s:
                _save_partial(ckpt, key, out, rows)
                last = time.perf_counter()
    if bar is not None:
        bar.close()
    if not out:
        raise AnyclassError(f"{ds.name}: no readable image")
    r = TuneResult.cat(out)
    idx = torch.cat(rows)
    order = idx.argsort()
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return r.logits[order], r.untuned[order], r.failed[order], idx[order]


def evaluate_tta(method, backbone, test, progress: bool = True, resume: bool = True) -> dict:
    """Tune and score every readable image of `test` (LabeledImages) with a prepared method:
    metrics, what tuning did, and timings. `resume`: partial results are kept under
    $ANYCLASS_HOME/tta/partial/ while it runs, so an interrupted run continues."""
    t0 = time.perf_counter()
    ckpt = _home() / "partial" / f"{run_key(method, backbone, test)}.safetensors" if resume else None
    logits, untuned, failed, idx = tta_predict(method, backbone, test, progress, ckpt)
    t_tune = time.perf_counter() - t0
    labels = torch.as_tensor(np.asarray(test.labels, dtype=np.int64))[idx]
    return {"metrics": classification_metrics(logits, labels), "num_images": int(len(labels)),
            "skipped_images": int(len(test) - len(labels)),
            "tta": {"failed_images": int(failed.sum()),
                    "untuned_metrics": classification_metrics(untuned, labels),
                    "changed_predictions": int((logits.argmax(1) != untuned.argmax(1)).sum()),
                    "seconds_per_image": round(t_tune / max(1, len(labels)), 5),
                    "init": method.init, "stats": getattr(method, "stats", None)},
            "tune_seconds": round(t_tune, 3)}


def run_tta_eval(cfg, method, backbone=None, progress: bool = True) -> dict:
    from ..backbones.factory import create_backbone
    t0 = time.perf_counter()
    test = load_dataset(cfg.dataset, cfg.split)
    if len(test) == 0:
        raise AnyclassError(f"dataset {cfg.dataset!r} has no images in split {cfg.split!r}")
    if "seed" not in cfg.hparams:
        method.set_params(seed=cfg.seed)
    backbone = backbone or create_backbone(cfg.backbone, cfg.device)
    names = list(test.classnames)
    world_defaults(method, cfg.dataset, backbone, names, cfg.seed, progress)
    method.prepare(backbone, names)
    r = evaluate_tta(method, backbone, test, progress)
    return {
        "dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method,
        "shots": 0, "seed": cfg.seed, "metrics": r["metrics"], "split": cfg.split,
        "templates": "single", "cupl": None, "hparams": method.get_params(),
        "num_classes": len(names), "num_images": r["num_images"],
        "skipped_images": r["skipped_images"], "chance_acc1": 1.0 / len(names), "tta": r["tta"],
        "backbone_identity": backbone.identity, "anyclass_version": __version__,
        "timings_s": {"tune": r["tune_seconds"], "total": round(time.perf_counter() - t0, 3)},
    }
