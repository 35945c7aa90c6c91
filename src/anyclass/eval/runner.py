"""One evaluation run: (dataset × backbone × method × shots × seed) → result dict/JSON."""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..backbones.base import VisionLanguageModel
from ..backbones.factory import create_backbone
from ..data.fewshot import sample_few_shot
from ..data.sources import load_dataset
from ..data.templates import get_templates, load_descriptions
from ..errors import AnyclassError
from ..features.extract import extract_features
from ..methods import FeatureSet, create_method
from ..methods.classifier import build_text_classifier
from .metrics import classification_metrics


@dataclass
class EvalConfig:
    dataset: str
    backbone: str = "builtin"
    method: str = "zeroshot"
    templates: str = "single"
    cupl: str | None = None          # CuPL descriptions JSON
    cupl_mode: str = "plus"          # "plus" = CuPL+e (with templates), "alone"
    shots: int = 0
    seed: int = 1
    split: str = "test"
    hparams: dict = field(default_factory=dict)
    batch_size: int = 128
    num_workers: int | None = None
    device: str | None = None


def _featureset(feats) -> FeatureSet:
    """Valid rows only (unreadable images were warned about and are not scored)."""
    valid = np.asarray(feats.valid, dtype=bool)
    return FeatureSet(torch.from_numpy(np.array(feats.features[valid], dtype=np.float32)),
                      torch.from_numpy(np.asarray(feats.labels)[valid].astype(np.int64)))


def run_eval(cfg: EvalConfig, backbone: VisionLanguageModel | None = None,
             progress: bool = True) -> dict:
    """Evaluate one configuration; `backbone` may be passed in to share it across runs."""
    t0 = time.perf_counter()
    # cheap checks first: a typo must not cost a model load (or a world build)
    method = create_method(cfg.method, **cfg.hparams)
    if getattr(method, "image_level", False):      # runs its own models on images (hub)
        from .image_level import run_image_eval
        return run_image_eval(cfg, method, backbone=backbone, progress=progress)
    if method.needs_train and cfg.shots <= 0:
        raise AnyclassError(f"method {cfg.method!r} needs labelled shots: pass --shots K")
    test = load_dataset(cfg.dataset, cfg.split)
    if len(test) == 0:
        raise AnyclassError(f"dataset {cfg.dataset!r} has no images in split {cfg.split!r}")
    backbone = backbone or create_backbone(cfg.backbone, cfg.device)
    ext = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=progress)

    t_feat = time.perf_counter()
    test_f = extract_features(backbone, test, **ext)
    train = val = None
    if cfg.shots > 0:
        # extract the whole train split once (one cache entry for every shots/seed), then pick
        full = load_dataset(cfg.dataset, "train")
        fs = sample_few_shot(full, cfg.shots, cfg.seed)
        train = _featureset(extract_features(backbone, full, **ext).subset(fs.meta["source_indices"]))
        try:
            val_ds = load_dataset(cfg.dataset, "val")
        except AnyclassError:
            val_ds = None
        if val_ds is not None and len(val_ds):
            val = _featureset(extract_features(backbone, val_ds, **ext))
    t_feat = time.perf_counter() - t_feat

    templates = get_templates(cfg.templates, test.meta.get("dataset"), test.meta.get("templates"))
    desc = load_descriptions(cfg.cupl, test.classnames) if cfg.cupl else None
    W = build_text_classifier(backbone, test.classnames, templates, desc,
                              with_templates=not (desc and cfg.cupl_mode == "alone"))
    if "logit_scale" not in cfg.hparams and "logit_scale" in method.get_params():
        method.set_params(logit_scale=float(backbone.logit_scale))
    method.fit(W, train=train, val=val)
    ts = _featureset(test_f)
    with torch.no_grad():
        logits = method.predict_logits(ts.features.to(W.device))
    metrics = classification_metrics(logits.cpu(), ts.labels)
    return {
        "dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method,
        "shots": cfg.shots, "seed": cfg.seed, "metrics": metrics,
        "split": cfg.split, "templates": cfg.templates, "cupl": cfg.cupl,
        "hparams": {k: v for k, v in method.get_params().items()},
        "num_classes": len(test.classnames), "num_images": int(len(ts)),
        "skipped_images": int(len(test) - len(ts)),
        "chance_acc1": 1.0 / len(test.classnames),
        "backbone_identity": backbone.identity, "anyclass_version": __version__,
        "timings_s": {"features": round(t_feat, 3), "total": round(time.perf_counter() - t0, 3)},
    }


def write_json(obj: dict, path: str | Path) -> Path:
    """Atomic JSON write: a crash never leaves a half-written result file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path

