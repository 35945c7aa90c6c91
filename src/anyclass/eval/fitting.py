"""Fit any method on (a class subset of) a dataset's few-shot train split, then score any
dataset with it: the one primitive under `anyclass eval` for prompt methods and under every
sweep protocol (few-shot, base-to-new, cross-dataset, DG).

It dispatches on the method's contract, never on its name: feature-level methods
(`FeatureMethod`: zero-shot, Tip-Adapter, linear probe ...) work on cached features and a
text classifier; methods that learn inside the backbone (`PromptMethod`) train on images and
keep their learned state in a safetensors file (`state_path`), which later cells reuse.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.base import LabeledImages
from ..data.fewshot import sample_few_shot, subset_classes
from ..data.sources import load_dataset
from ..data.templates import get_templates
from ..errors import AnyclassError, SpecError
from ..features.extract import extract_features
from ..methods import METHODS, create_method
from ..methods.classifier import build_text_classifier
from .featuresets import augmented_train, featureset
from .metrics import classification_metrics

#: method hyperparameters set from the protocol when the user did not set them
PROTOCOL_SETTING = {"fewshot": "base2new", "base2new": "base2new", "xd": "transfer", "dg": "transfer"}


def check_method(method: str, hparams: dict | None = None) -> None:
    """Unknown method or hyperparameter -> SpecError (cheap: builds the estimator only)."""
    try:
        est = create_method(method, **(hparams or {}))
    except (TypeError, ValueError) as e:
        raise SpecError(f"method {method!r}: {e}") from None
    if getattr(est, "needs_support", False) or getattr(est, "image_level", False) \
            or getattr(est, "tunes_at_test", False):
        raise SpecError(f"method {method!r} is not fitted on a train split (it builds its own "
                        f"support set, runs its own models or tunes on each test image): run "
                        f"it with `anyclass eval`")


def method_transfers(method: str) -> bool:
    return bool(METHODS.get(method).transfers)


def method_needs_train(method: str) -> bool:
    return bool(METHODS.get(method).needs_train)


def _split(dataset: str, split: str, classes: list[int] | None, required: bool = True
           ) -> LabeledImages | None:
    try:
        ds = load_dataset(dataset, split)
    except AnyclassError:
        if required:
            raise
        return None
    return subset_classes(ds, classes) if classes is not None else ds


@dataclass
class Fitted:
    """A method fitted on `train_classnames`; `evaluate` scores any dataset split."""
    method: str
    backbone: object
    train_classnames: list[str]
    estimator: object
    templates: str = "single"
    info: dict = field(default_factory=dict)
    #: the classes a class-agnostic estimator's classifier currently holds (refit on change)
    current_classnames: list[str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.current_classnames = list(self.train_classnames)

    def evaluate(self, dataset: str, split: str = "test", classes: list[int] | None = None,
                 progress: bool = True) -> dict:
        test = _split(dataset, split, classes)
        if len(test) == 0:
            raise AnyclassError(f"dataset {dataset!r} has no images in split {split!r}")
        return self.evaluate_on(test, progress)

    def evaluate_on(self, test: LabeledImages, progress: bool = True) -> dict:
        """Score the images of `test` (e.g. a subsample of a split)."""
        t0 = time.perf_counter()
        names = list(test.classnames)
        est = self.estimator
        if names != self.train_classnames and not est.transfers:
            raise AnyclassError(f"method {self.method!r} cannot score classes it was not trained "
                                f"on ({test.name} has other classes than {self.info.get('train')})")
        if getattr(est, "learns_in_backbone", False):
            logits, labels, _ = predict_images(est, self.backbone, test, progress)
        else:
            if names != self.current_classnames:         # class-agnostic (zero-shot): refit
                W = build_text_classifier(self.backbone, names, _templates(self.templates, test))
                est.fit(W)
                self.current_classnames = names
            ts = featureset(extract_features(self.backbone, test, progress=progress), names)
            with torch.no_grad():
                logits = est.predict_logits(ts.features.to(self.backbone.device)).cpu()
            labels = ts.labels
        return {"metrics": classification_metrics(logits, labels), "num_images": int(len(labels)),
                "num_classes": len(names), "skipped_images": int(len(test) - len(labels)),
                "seconds": round(time.perf_counter() - t0, 3)}


def _templates(name: str, ds: LabeledImages) -> list[str]:
    return get_templates(name, ds.meta.get("dataset"), ds.meta.get("templates"))


@torch.no_grad()
def predict_images(est, backbone, ds: LabeledImages, progress: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [N', K], labels [N'] and row indices [N'] of the readable images of `ds`."""
    from ..methods.training import iter_batches
    classes = est.encode_classes(backbone, list(ds.classnames))     # once for all batches
    out, rows = [], []
    for x, idx in iter_batches(backbone, ds, progress=progress):
        out.append(est.predict_logits(backbone, x, list(ds.classnames), classes=classes).cpu())
        rows.append(idx)
    if not out:
        raise AnyclassError(f"{ds.name}: no readable image")
    idx = torch.cat(rows)
    return torch.cat(out), torch.as_tensor(np.asarray(ds.labels, dtype=np.int64))[idx], idx


def fit_on(method: str, backbone, dataset: str, *, shots: int, seed: int,
           hparams: dict | None = None, classes: list[int] | None = None,
           templates: str = "single", state_path: str | Path | None = None,
           protocol: str | None = None, progress: bool = True) -> Fitted:
    """Fit `method` on `shots` images per class (seeded sample) of `dataset`'s train split,
    restricted to `classes` (indices) when given; the epoch/hyperparameters are chosen on its
    val split. `state_path`: where a prompt method keeps its learned state (reused if there)."""
    hparams = dict(hparams or {})
    t0 = time.perf_counter()
    est = create_method(method, **hparams)
    params = est.get_params()
    if "seed" in params and "seed" not in hparams:
        est.set_params(seed=seed)
    if "setting" in params and "setting" not in hparams and protocol in PROTOCOL_SETTING:
        est = create_method(method, **{**hparams, "setting": PROTOCOL_SETTING[protocol],
                                       **({"seed": seed} if "seed" in params else {})})
    if getattr(est, "needs_support", False) or getattr(est, "image_level", False):
        raise AnyclassError(f"method {method!r} is run by `anyclass eval`, not fitted on a train split")
    if est.needs_train and shots <= 0:
        raise AnyclassError(f"method {method!r} needs labelled shots: pass shots > 0")
    info: dict = {"hparams": est.get_params(), "backbone_identity": backbone.identity,
                  "train": dataset, "shots": shots, "seed": seed}
    if not est.needs_train:                                 # zero-shot: nothing to learn
        test = _split(dataset, "test", classes)
        names = list(test.classnames)
        est.fit(build_text_classifier(backbone, names, _templates(templates, test)))
        return Fitted(method, backbone, names, est, templates,
                      {**info, "train_images": 0, "val_images": 0})
    full = _split(dataset, "train", classes)
    train = sample_few_shot(full, shots, seed)
    val = _split(dataset, "val", classes, required=False)
    names = list(full.classnames)
    if getattr(est, "learns_in_backbone", False):
        est = _fit_prompts(est, backbone, train, val, state_path, progress)
        info.update(train_images=len(train), val_images=0 if val is None else len(val),
                    chosen=getattr(est, "chosen_", None), learned_parameters=est.n_learned(),
                    state_file=None if state_path is None else str(state_path),
                    train_seconds=round(getattr(est, "train_seconds_", 0.0), 3))
    else:
        idx = train.meta["source_indices"]
        passes = int(params.get("augment_passes") or 0)
        if passes > 0:                     # Tip-Adapter's cache: averaged augmented passes
            tr = augmented_train(backbone, full, idx, passes, "flip_crop",
                                  dict(progress=progress))
        else:
            tr = featureset(extract_features(backbone, full, progress=progress).subset(idx),
                             names)
        va = None
        if val is not None and len(val):
            va = featureset(extract_features(backbone, val, progress=progress), names)
        if "logit_scale" in params and "logit_scale" not in hparams:
            est.set_params(logit_scale=float(backbone.logit_scale))
        W = build_text_classifier(backbone, names, _templates(templates, full))
        est.fit(W, train=tr, val=va)
        info.update(train_images=len(tr), val_images=0 if va is None else len(va),
                    chosen=getattr(est, "chosen_", None))
    info["fit_seconds"] = round(time.perf_counter() - t0, 3)
    return Fitted(method, backbone, names, est, templates, info)


def _fit_prompts(est, backbone, train: LabeledImages, val: LabeledImages | None,
                 state_path: str | Path | None, progress: bool):
    from ..methods.prompted import PromptFileError, load_prompts
    if state_path is not None and Path(state_path).exists():
        try:
            loaded = load_prompts(state_path, backbone, list(train.classnames))
            # tuples and lists dump alike, so the file's JSON round trip compares equal
            if json.dumps(loaded.get_params(), default=str) == json.dumps(est.get_params(), default=str):
                return loaded
            warnings.warn(f"{state_path} was learned with other hyperparameters; retraining",
                          stacklevel=3)
        except PromptFileError as e:
            warnings.warn(f"{e}; retraining", stacklevel=3)
    ckpt = None if state_path is None else Path(f"{state_path}.ckpt")
    est.fit(backbone, train, val, checkpoint=ckpt, progress=progress)
    if state_path is not None:
        est.save(state_path)
        ckpt.unlink(missing_ok=True)
    return est
