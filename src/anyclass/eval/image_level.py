"""Evaluation of image-level methods (the hub): same result keys as runner.run_eval, plus
what the hub did (models run, head per class, fallback classes, timings)."""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import __version__
from ..data.sources import load_dataset
from ..errors import AnyclassError
from .metrics import classification_metrics


def hub_predict(method, dataset, backbone=None, progress: bool = True) -> tuple[np.ndarray,
                                                                            np.ndarray, dict]:
    """Log-scores [N, K] of the hub on `dataset`, the valid-row mask, and a report."""
    from ..hub.reuse import hub_scores
    from ..hub.select import select_heads
    from ..hub.service import class_nodes, open_hub
    t0 = time.perf_counter()
    store = open_hub(method.hub, progress=progress)
    names = list(dataset.classnames)
    nodes, mapping = class_nodes(names, dataset.meta, method.overrides)
    labels = store.labels()
    sel = select_heads(labels, nodes, max_models=method.max_models, solver=method.solver,
                       lam=method.lam, mu=method.mu, min_utility=method.min_utility,
                       top_k=method.top_k, classnames=names, semantic=method.semantic)
    if sel.fallback and method.fallback is None and backbone is None:
        missing = ", ".join(names[c] for c in sel.fallback[:10])
        raise AnyclassError(f"no head in the hub covers {len(sel.fallback)} class(es) and no "
                            f"fallback model is configured: {missing}")
    t_sel = time.perf_counter()
    specs = {m.id: m.spec for m in store.models()}
    if backbone is None and method.fallback is not None and (sel.fallback or method.calibrate):
        from ..backbones.factory import create_backbone
        backbone = create_backbone(method.fallback)
    graph = store.load_graph() if method.calibrate else None
    scores, valid, cal = hub_scores(sel, specs, dataset, graph, nodes, backbone,
                                    calibrated=method.calibrate, reg=method.calibration_reg,
                                    progress=progress)
    report = {"selection": sel.summary(), "mapping": mapping,
              "calibration": cal.summary() if cal is not None else None,
              "models_run": len(sel.models), "models_in_hub": len(specs),
              "timings_s": {"select": round(t_sel - t0, 3),
                            "inference": round(time.perf_counter() - t_sel, 3)}}
    return scores, valid, report


def run_image_eval(cfg, method, backbone=None, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    test = load_dataset(cfg.dataset, cfg.split)
    if len(test) == 0:
        raise AnyclassError(f"dataset {cfg.dataset!r} has no images in split {cfg.split!r}")
    scores, valid, report = hub_predict(method, test, backbone, progress)
    labels = np.asarray(test.labels)[valid]
    metrics = classification_metrics(torch.from_numpy(scores[valid]),
                                     torch.from_numpy(labels.astype(np.int64)))
    return {
        "dataset": cfg.dataset, "backbone": method.fallback, "method": cfg.method,
        "shots": 0, "seed": cfg.seed, "metrics": metrics, "split": cfg.split,
        "templates": "single", "cupl": None, "hparams": method.get_params(),
        "num_classes": len(test.classnames), "num_images": int(valid.sum()),
        "skipped_images": int(len(test) - valid.sum()),
        "chance_acc1": 1.0 / len(test.classnames), "anyclass_version": __version__,
        "hub": report,
        "timings_s": {**report["timings_s"], "total": round(time.perf_counter() - t0, 3)},
    }
