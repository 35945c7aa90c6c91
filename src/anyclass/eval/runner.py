"""One evaluation run: (dataset × backbone × method × shots × seed) → result dict/JSON."""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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
from .featuresets import augmented_train, featureset
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
    # support sets (methods with needs_support, e.g. sus-x): built from the class names only
    pool: str | None = None          # image pool spec; None = the dataset's default (world:pool)
    support_per_class: int = 16
    support_strategy: str = "retrieval"
    support_prompts: str = "photo"
    generator: str | None = None     # local diffusers folder (support_strategy="generation")
    augment: str = "flip_crop"       # augmentation of the cache passes (augment_passes > 0)
    save_prompts: str | None = None  # methods learning inside the backbone: learned-state file


def _support_set(cfg: EvalConfig, backbone, classnames: list[str], desc, ext: dict,
                 progress: bool) -> tuple[FeatureSet, dict]:
    """SuS: a support set built from the class names only (anyclass.support), as `train`."""
    from ..support import build_support, default_pool
    generating = cfg.support_strategy == "generation"
    pool = cfg.pool or (None if generating else default_pool(cfg.dataset))
    sus = build_support(backbone, classnames, pool=pool, strategy=cfg.support_strategy,
                        prompts=cfg.support_prompts, descriptions=desc,
                        per_class=cfg.support_per_class, seed=cfg.seed,
                        generator=cfg.generator, progress=progress)
    if list(sus.dataset.classnames) != list(classnames):
        raise AnyclassError(f"support set {sus.root} has classes in another order or other "
                            f"classes than the task")
    support = featureset(extract_features(backbone, sus.dataset, **ext), list(classnames))
    info = {"root": str(sus.root), "pool": pool, "strategy": cfg.support_strategy,
            "prompts": cfg.support_prompts, "per_class": cfg.support_per_class,
            "counts": dict(sus.counts), "images": len(support)}
    return support, info


def _check_support_source(cfg: EvalConfig) -> None:
    """A support set needs images from somewhere: a pool to retrieve from or a generator."""
    from ..support import default_pool
    if cfg.support_strategy == "generation":
        if not cfg.generator:
            raise AnyclassError("support strategy 'generation' needs a local text-to-image "
                                "model folder: pass --generator DIR")
    elif not (cfg.pool or default_pool(cfg.dataset)):
        raise AnyclassError(f"method {cfg.method!r} builds a support set from the class names "
                            f"and needs an image pool for {cfg.dataset!r}: pass --pool "
                            f"folder:DIR, list:FILE or wds:SHARDS")


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
    if getattr(method, "learns_in_backbone", False):  # trains on images (prompt learning)
        return _run_fitted(cfg, backbone, progress, t0)
    if getattr(method, "tunes_at_test", False):       # tunes on each test image (TPT ...)
        from .tta import run_tta_eval
        return run_tta_eval(cfg, method, backbone, progress)
    if getattr(method, "needs_support", False):
        _check_support_source(cfg)
    test = load_dataset(cfg.dataset, cfg.split)
    if len(test) == 0:
        raise AnyclassError(f"dataset {cfg.dataset!r} has no images in split {cfg.split!r}")
    # lazy: a run whose features and text classifier are cached never builds the model
    backbone = backbone or create_backbone(cfg.backbone, cfg.device, lazy=True)
    ext = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=progress)

    params = method.get_params()
    if "seed" in params and "seed" not in cfg.hparams:
        method.set_params(seed=cfg.seed)
    passes = int(params.get("augment_passes") or 0)

    t_feat = time.perf_counter()
    test_f = extract_features(backbone, test, **ext)
    templates = get_templates(cfg.templates, test.meta.get("dataset"), test.meta.get("templates"))
    desc = load_descriptions(cfg.cupl, test.classnames) if cfg.cupl else None
    train = val = None
    support_info = None
    if method.needs_support:
        # name-only: no labelled image of the task, neither train nor val
        train, support_info = _support_set(cfg, backbone, list(test.classnames), desc, ext,
                                           progress)
    elif cfg.shots > 0:
        # extract the whole train split once (one cache entry for every shots/seed), then pick
        full = load_dataset(cfg.dataset, "train")
        fs = sample_few_shot(full, cfg.shots, cfg.seed)
        idx = fs.meta["source_indices"]
        if passes > 0 and method.needs_train:
            train = augmented_train(backbone, full, idx, passes, cfg.augment, ext)
        else:
            train = featureset(extract_features(backbone, full, **ext).subset(idx),
                                list(full.classnames))
        try:
            val_ds = load_dataset(cfg.dataset, "val")
        except AnyclassError:
            val_ds = None
        if val_ds is not None and len(val_ds):
            val = featureset(extract_features(backbone, val_ds, **ext), list(val_ds.classnames))
    t_feat = time.perf_counter() - t_feat

    W = build_text_classifier(backbone, test.classnames, templates, desc,
                              with_templates=not (desc and cfg.cupl_mode == "alone"))
    if "logit_scale" not in cfg.hparams and "logit_scale" in params:
        method.set_params(logit_scale=float(backbone.logit_scale))
    t_fit = time.perf_counter()
    method.fit(W, train=train, val=val)
    t_fit = time.perf_counter() - t_fit
    ts = featureset(test_f)
    with torch.no_grad():
        logits = method.predict_logits(ts.features.to(W.device))
    metrics = classification_metrics(logits.cpu(), ts.labels)
    return {
        "dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method,
        "shots": cfg.shots, "seed": cfg.seed, "metrics": metrics,
        "split": cfg.split, "templates": cfg.templates, "cupl": cfg.cupl,
        "hparams": {k: v for k, v in method.get_params().items()},
        "chosen": getattr(method, "chosen_", None),
        **({"support": support_info} if support_info is not None else {}),
        "train_images": 0 if train is None else len(train),
        "val_images": 0 if val is None else len(val),
        "num_classes": len(test.classnames), "num_images": int(len(ts)),
        "skipped_images": int(len(test) - len(ts)),
        "chance_acc1": 1.0 / len(test.classnames),
        "backbone_identity": backbone.identity, "anyclass_version": __version__,
        "timings_s": {"features": round(t_feat, 3), "fit": round(t_fit, 3), "total": round(time.perf_counter() - t0, 3)},
    }


def _run_fitted(cfg: EvalConfig, backbone, progress: bool, t0: float) -> dict:
    """Methods that learn inside the backbone: fit on the few-shot train split (epoch chosen
    on val), score `cfg.split`; same result keys as the feature-level path."""
    from .fitting import fit_on
    backbone = backbone or create_backbone(cfg.backbone, cfg.device)
    fitted = fit_on(cfg.method, backbone, cfg.dataset, shots=cfg.shots, seed=cfg.seed,
                    hparams=cfg.hparams, templates=cfg.templates, state_path=cfg.save_prompts,
                    progress=progress)
    res = fitted.evaluate(cfg.dataset, cfg.split, progress=progress)
    info = fitted.info
    return {
        "dataset": cfg.dataset, "backbone": cfg.backbone, "method": cfg.method,
        "shots": cfg.shots, "seed": cfg.seed, "metrics": res["metrics"], "split": cfg.split,
        "templates": cfg.templates, "cupl": None, "hparams": info["hparams"],
        "chosen": info.get("chosen"), "train_images": info.get("train_images", 0),
        "val_images": info.get("val_images", 0), "num_classes": res["num_classes"],
        "num_images": res["num_images"], "skipped_images": res["skipped_images"],
        "chance_acc1": 1.0 / res["num_classes"], "learned_parameters": info.get("learned_parameters"),
        "prompts": info.get("state_file"),
        "backbone_identity": backbone.identity, "anyclass_version": __version__,
        "timings_s": {"fit": info.get("fit_seconds"), "evaluate": res["seconds"],
                      "total": round(time.perf_counter() - t0, 3)},
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

