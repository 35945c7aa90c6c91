"""The estimator contract of feature-level methods (scikit-learn style).

Hyperparameters are keyword arguments of `__init__` and stored unchanged; `fit` returns
self; learned state lives in attributes ending in `_`; `predict_logits(features)` maps
L2-normalised image features [N, D] to logits [N, K] in the class order of `text_weights`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class FeatureSet:
    """Features [N, D] (normalised) with labels [N] (class indices of the task).

    `views` [P, N, D]: optional per-pass augmented features the averaged `features` came
    from (Tip-Adapter-F trains on one pass per epoch). `classnames`: the task's class names,
    so methods can name a class in an error.
    """
    features: torch.Tensor
    labels: torch.Tensor
    views: torch.Tensor | None = None
    classnames: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


class FeatureMethod:
    #: whether `fit` needs a labelled few-shot train set
    needs_train: bool = False
    #: whether the runner must build a SuS support set (name-only) and pass it as `train`
    needs_support: bool = False
    #: whether the method runs its own models on images (eval/image_level.py)
    image_level: bool = False
    #: whether the method learns parameters inside the frozen backbone (methods/prompted.py)
    learns_in_backbone: bool = False
    #: whether a fitted method can score classes it was not fitted on (base-to-new, cross-
    #: dataset): true of zero-shot and prompt learning, false of cache/probe classifiers
    transfers: bool = False

    def get_params(self) -> dict:
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self"}

    def set_params(self, **params) -> "FeatureMethod":
        for k, v in params.items():
            if k not in self.get_params():
                raise ValueError(f"{type(self).__name__} has no hyperparameter {k!r}")
            setattr(self, k, v)
        return self

    def fit(self, text_weights: torch.Tensor, train: FeatureSet | None = None,
            val: FeatureSet | None = None) -> "FeatureMethod":
        raise NotImplementedError

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def set_defaults(est: FeatureMethod, given: dict, defaults: dict) -> None:
    """Set `defaults` overridden by `given` as attributes; an unknown key is an error (the
    shared recipe of a method family: prompt learning, test-time tuning)."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{type(est).__name__} has no hyperparameter {unknown[0]!r}")
    for k, v in {**defaults, **given}.items():
        setattr(est, k, v)


def params_with(est: FeatureMethod, shared: dict) -> dict:
    """`__init__`'s named hyperparameters plus the family's shared ones (`**kwargs`)."""
    sig = inspect.signature(type(est).__init__)
    own = {p.name: getattr(est, p.name) for p in sig.parameters.values()
           if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return {**own, **{k: getattr(est, k) for k in shared}}
