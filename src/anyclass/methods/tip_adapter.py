"""Tip-Adapter and Tip-Adapter-F (Zhang et al. 2022; METHODS.md §1).

Cache model over the k-shot train set: keys F = the train features averaged over
`augment_passes` flip-crop passes and re-normalised (the runner builds them), values L =
one-hot labels.

    logits = s · f W + α · exp(−β (1 − f Fᵀ)) L

α, β are searched on the val split over the reference's 20 α × 200 β grid (vectorised,
methods/search.py), or fixed by passing `alpha=` / `beta=` (then that axis is not searched).
No val split and no fixed values → AnyclassError: we do not guess α, β silently, and
searching on the train set itself is meaningless (every train image finds its own key with
affinity 1, so the largest α always wins).

Tip-Adapter-F makes the keys trainable (a bias-free linear layer initialised from F) and
trains them with cross-entropy on the train features, one augmented pass per epoch when the
passes are given (the reference re-augments every epoch), with the reference's optimiser
(AdamW lr 1e-3, eps 1e-4, cosine over all steps, 20 epochs, batch 256) at fixed
(init_alpha, init_beta). The epoch is chosen on val (the reference chose it on test), then
α, β are searched on val with the chosen keys. Seeded (`seed`) and deterministic on CPU.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F_

from ..errors import AnyclassError
from . import METHODS
from .base import FeatureMethod, FeatureSet
from .search import (DEFAULT_MAX_BYTES, TIP_ALPHA, TIP_BETA, SearchResult, cache_term, grid,
                     one_hot, search_grid)


def _name(fs: FeatureSet | None, k: int) -> str:
    if fs is not None and fs.classnames is not None and k < len(fs.classnames):
        return repr(fs.classnames[k])
    return f"#{k}"


def check_support(method: str, train: FeatureSet | None, num_classes: int,
                  what: str = "train") -> None:
    """Every class needs at least one cache entry: a missing class would silently never get
    a cache vote. Errors name the class."""
    if train is None or len(train) == 0:
        raise AnyclassError(f"{method}: needs a non-empty labelled {what} set")
    lab = train.labels.long()
    bad = lab[(lab < 0) | (lab >= num_classes)]
    if len(bad):
        raise AnyclassError(f"{method}: {what} label {int(bad[0])} outside 0..{num_classes - 1}")
    counts = torch.bincount(lab, minlength=num_classes)
    missing = [_name(train, k) for k in torch.nonzero(counts == 0).flatten().tolist()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AnyclassError(f"{method}: class {missing[0]}{more} has no image in the "
                            f"{what} set")


def need_val(method: str, val: FeatureSet | None, what: str) -> FeatureSet:
    if val is None or len(val) == 0:
        raise AnyclassError(f"{method}: no val images to choose {what} on (the dataset has "
                            f"no val split, or it is empty); give the dataset a val split or "
                            f"fix them with --hparam (e.g. alpha=1 beta=5.5)")
    return val


@METHODS.register("tip-adapter")
class TipAdapter(FeatureMethod):
    needs_train = True
    _name = "tip-adapter"

    def __init__(self, logit_scale: float = 100.0, alpha: float | None = None,
                 beta: float | None = None, alpha_grid: tuple = TIP_ALPHA,
                 beta_grid: tuple = TIP_BETA, augment_passes: int = 10,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.logit_scale = logit_scale
        self.alpha = alpha
        self.beta = beta
        self.alpha_grid = alpha_grid
        self.beta_grid = beta_grid
        self.augment_passes = augment_passes
        self.max_bytes = max_bytes

    # -- shared pieces
    def _cache(self, W: torch.Tensor, train: FeatureSet | None) -> None:
        self.W_ = W.float()
        check_support(self._name, train, W.shape[1])
        self.keys_ = train.features.float().to(W.device)             # F [M, D]
        self.values_ = one_hot(train.labels, W.shape[1]).to(W.device)  # L [M, K]

    def _axis(self, fixed, spec) -> torch.Tensor:
        return (torch.tensor([float(fixed)], dtype=torch.float64) if fixed is not None
                else grid(spec, torch.float64))

    def _search_tip(self, val: FeatureSet | None, keys: torch.Tensor) -> None:
        if self.alpha is not None and self.beta is not None:
            self.alpha_, self.beta_ = float(self.alpha), float(self.beta)
            self.chosen_ = {"alpha": self.alpha_, "beta": self.beta_, "searched": False}
            return
        val = need_val(self._name, val, "alpha, beta")
        f = val.features.float().to(keys.device)
        res: SearchResult = search_grid(
            self.logit_scale * f @ self.W_, f, keys, self.values_, val.labels,
            self._axis(self.alpha, self.alpha_grid), self._axis(self.beta, self.beta_grid),
            max_bytes=self.max_bytes, order="bag")             # Tip's β-then-α loop
        self.alpha_, self.beta_ = res.alpha, res.beta
        self.chosen_ = {"alpha": res.alpha, "beta": res.beta, "val_acc": res.acc,
                        "searched": True, "grid": [len(res.alphas), len(res.betas)]}

    def fit(self, text_weights: torch.Tensor, train: FeatureSet | None = None,
            val: FeatureSet | None = None) -> "TipAdapter":
        self._cache(text_weights, train)
        self._search_tip(val, self.keys_)
        return self

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        return (self.logit_scale * f @ self.W_
                + self.alpha_ * cache_term(f, self.keys_, self.values_, self.beta_,
                                           self.max_bytes))


@METHODS.register("tip-adapter-f")
class TipAdapterF(TipAdapter):
    _name = "tip-adapter-f"

    def __init__(self, logit_scale: float = 100.0, alpha: float | None = None,
                 beta: float | None = None, alpha_grid: tuple = TIP_ALPHA,
                 beta_grid: tuple = TIP_BETA, augment_passes: int = 10,
                 max_bytes: int = DEFAULT_MAX_BYTES, epochs: int = 20, lr: float = 1e-3,
                 eps: float = 1e-4, batch_size: int = 256, init_alpha: float = 1.0,
                 init_beta: float = 1.0, seed: int = 1) -> None:
        super().__init__(logit_scale, alpha, beta, alpha_grid, beta_grid, augment_passes,
                         max_bytes)
        self.epochs = epochs
        self.lr = lr
        self.eps = eps
        self.batch_size = batch_size
        self.init_alpha = init_alpha
        self.init_beta = init_beta
        self.seed = seed

    def _logits(self, f: torch.Tensor, keys: torch.Tensor, a: float, b: float) -> torch.Tensor:
        # keys is the trainable linear layer's weight: affinity = f keysᵀ (not re-normalised)
        return (self.logit_scale * f @ self.W_
                + a * torch.exp(-b * (1 - f @ keys.T)) @ self.values_)

    def fit(self, text_weights: torch.Tensor, train: FeatureSet | None = None,
            val: FeatureSet | None = None) -> "TipAdapterF":
        self._cache(text_weights, train)
        val = need_val(self._name, val, "the epoch")
        fv, yv = val.features.float().to(self.W_.device), val.labels.long().to(self.W_.device)
        views = (train.views.float() if train.views is not None
                 else train.features.float()[None]).to(self.W_.device)
        y = train.labels.long().to(self.W_.device)
        n = len(y)
        g = torch.Generator().manual_seed(int(self.seed))
        keys = torch.nn.Parameter(self.keys_.clone())
        opt = torch.optim.AdamW([keys], lr=self.lr, eps=self.eps)
        steps = max(1, self.epochs * -(-n // self.batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        best = (-1.0, 0, self.keys_.clone())
        history = []
        for epoch in range(self.epochs):
            x = views[epoch % len(views)]
            for idx in torch.randperm(n, generator=g).split(self.batch_size):
                loss = F_.cross_entropy(self._logits(x[idx], keys, self.init_alpha,
                                                     self.init_beta), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                acc = float((self._logits(fv, keys, self.init_alpha, self.init_beta)
                             .argmax(1) == yv).float().mean())
            history.append(round(acc, 6))
            if acc > best[0]:
                best = (acc, epoch + 1, keys.detach().clone())
        if self.epochs < 1:
            warnings.warn(f"{self._name}: epochs={self.epochs}, keys left untrained",
                          stacklevel=2)
        self.keys_ = best[2]
        self.epoch_ = best[1]
        self._search_tip(val, self.keys_)
        self.chosen_.update({"epoch": best[1], "epoch_val_acc": best[0],
                             "val_acc_per_epoch": history})
        return self
