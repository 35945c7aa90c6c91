"""TIP-X and SuS-X (Udandarao et al., ICCV 2023; METHODS.md §2).

TIP-X over a support set F [M, D] with one-hot labels L [M, K]:

    Z = s · f W                                   (s: logit scale, 100 for CLIP)
    A = exp(−β (1 − f Fᵀ))                        (Tip-Adapter's cache affinities)
    s_i = softmax(f_i W / τ), S_j = softmax(F_j W / τ), τ = 0.5 on raw cosines
    M_ij = KL(s_i ‖ S_j)                          (image-text signature distance)
    logits = Z + α A L + γ (−ψ(M)) L              (ψ: min-max rescale into the range of f Fᵀ)

ψ is affine with split-level constants (min/max of M and of f Fᵀ). They are fixed at fit
time, on the split the search used (val; the held-out support for sus-x; val, else the
support itself, when α, β, γ are given), and kept as learned state `psi_`: γ was chosen for
that scale, and a prediction must not depend on which other images share its batch (ranged
per batch, one image alone and the same image inside a folder could get different labels).
The reference instead ranged the test matrix's M with the val affinities (a mix of two
splits, METHODS.md §2); here both ranges come from one split.

`tip-x`: the support is the k-shot train set (keys averaged over `augment_passes`
flip-crop passes, as for Tip-Adapter); α, β, γ searched on val over the reference's
20 × 200 × 50 grid (vectorised, methods/search.py), or fixed with alpha=/beta=/gamma=.

`sus-x`: name-only. The runner builds a SuS support set from the task's class names
(anyclass.support.build_support) and passes its features as `train`; no labelled image of
the target task is used, not even for the search: `holdout` of each class's support images
(seeded) is set aside as the search split and TIP-X runs over the rest. The paper searched
on the target dataset's labelled val split instead.
"""
from __future__ import annotations

import warnings
import zlib

import torch

from ..errors import AnyclassError
from . import METHODS
from .base import FeatureSet
from .search import (DEFAULT_MAX_BYTES, TIPX_ALPHA, TIPX_BETA, TIPX_GAMMA, cache_term,
                     kl_term, kl_term_ranged, search_grid)
from .tip_adapter import TipAdapter, _name, check_support, need_val


@METHODS.register("tip-x")
class TipX(TipAdapter):
    needs_train = True
    _name = "tip-x"

    def __init__(self, logit_scale: float = 100.0, alpha: float | None = None,
                 beta: float | None = None, gamma: float | None = None,
                 alpha_grid: tuple = TIPX_ALPHA, beta_grid: tuple = TIPX_BETA,
                 gamma_grid: tuple = TIPX_GAMMA, tau: float = 0.5, augment_passes: int = 10,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(logit_scale, alpha, beta, alpha_grid, beta_grid, augment_passes,
                         max_bytes)
        self.gamma = gamma
        self.gamma_grid = gamma_grid
        self.tau = tau

    def _kl(self, f: torch.Tensor) -> torch.Tensor:
        """T for any batch, with ψ fixed at fit time (`psi_`)."""
        return kl_term(f, self.keys_, self.W_, self.values_, self.tau, self.max_bytes,
                       psi=self.psi_)

    def _range_on(self, f: torch.Tensor) -> torch.Tensor:
        """Fix ψ on split `f` (sets `psi_`); returns that split's T."""
        T, self.psi_ = kl_term_ranged(f, self.keys_, self.W_, self.values_, self.tau,
                                      self.max_bytes)
        return T

    def _fit_tipx(self, text_weights: torch.Tensor, support: FeatureSet | None,
                  val: FeatureSet | None) -> None:
        self._cache(text_weights, support)
        has_val = val is not None and len(val) > 0
        if None not in (self.alpha, self.beta, self.gamma):
            self.alpha_, self.beta_, self.gamma_ = (float(self.alpha), float(self.beta),
                                                    float(self.gamma))
            self._range_on(val.features.float().to(self.W_.device) if has_val
                           else self.keys_)
            self.chosen_ = {"alpha": self.alpha_, "beta": self.beta_, "gamma": self.gamma_,
                            "searched": False, "psi_range": "val" if has_val else "support"}
            return
        val = need_val(self._name, val, "alpha, beta, gamma")
        f = val.features.float().to(self.W_.device)
        res = search_grid(self.logit_scale * f @ self.W_, f, self.keys_, self.values_,
                          val.labels, self._axis(self.alpha, self.alpha_grid),
                          self._axis(self.beta, self.beta_grid),
                          self._axis(self.gamma, self.gamma_grid), T=self._range_on(f),
                          max_bytes=self.max_bytes, order="abg")
        self.alpha_, self.beta_, self.gamma_ = res.alpha, res.beta, res.gamma
        self.chosen_ = {"alpha": res.alpha, "beta": res.beta, "gamma": res.gamma,
                        "val_acc": res.acc, "searched": True, "psi_range": "val",
                        "grid": [len(res.alphas), len(res.betas), len(res.gammas)]}

    def fit(self, text_weights: torch.Tensor, train: FeatureSet | None = None,
            val: FeatureSet | None = None) -> "TipX":
        self._fit_tipx(text_weights, train, val)
        return self

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        return (self.logit_scale * f @ self.W_
                + self.alpha_ * cache_term(f, self.keys_, self.values_, self.beta_,
                                           self.max_bytes)
                + self.gamma_ * self._kl(f))


def holdout_split(support: FeatureSet, num_classes: int, fraction: float, seed: int
                  ) -> tuple[FeatureSet, FeatureSet]:
    """Per class, hold out round(fraction · n_c) of its support images (at least one, and
    never all: a class with one image keeps it in the cache and is not searched on, with a
    warning naming it). Seeded per class by (seed, class name), so the split of a class does
    not depend on the order of the classes (or on the other classes)."""
    if not 0 < fraction < 1:
        raise AnyclassError(f"sus-x: holdout must be in (0, 1), got {fraction}")
    lab = support.labels.long()
    keep, held, lonely = [], [], []
    for k in range(num_classes):
        idx = torch.nonzero(lab == k).flatten()
        n = len(idx)
        if n < 2:
            lonely.append(_name(support, k))
            keep.append(idx)
            continue
        h = min(n - 1, max(1, round(fraction * n)))
        cname = support.classnames[k] if support.classnames else str(k)
        g = torch.Generator().manual_seed(zlib.crc32(f"{int(seed)}:{cname}".encode()))
        perm = idx[torch.randperm(n, generator=g)]
        held.append(perm[:h])
        keep.append(perm[h:])
    if lonely:
        warnings.warn(f"sus-x: class {lonely[0]}"
                      f"{f' (and {len(lonely) - 1} more)' if len(lonely) > 1 else ''} has "
                      f"only one support image: nothing held out for the search",
                      stacklevel=3)
    ki, hi = torch.cat(keep).sort().values, torch.cat(held or [keep[0][:0]]).sort().values

    def sub(i: torch.Tensor) -> FeatureSet:
        return FeatureSet(support.features[i], support.labels[i], None, support.classnames)
    return sub(ki), sub(hi)


@METHODS.register("sus-x")
class SusX(TipX):
    needs_train = False
    needs_support = True
    _name = "sus-x"

    def __init__(self, logit_scale: float = 100.0, alpha: float | None = None,
                 beta: float | None = None, gamma: float | None = None,
                 alpha_grid: tuple = TIPX_ALPHA, beta_grid: tuple = TIPX_BETA,
                 gamma_grid: tuple = TIPX_GAMMA, tau: float = 0.5, holdout: float = 0.25,
                 seed: int = 1, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(logit_scale, alpha, beta, gamma, alpha_grid, beta_grid, gamma_grid,
                         tau, 0, max_bytes)
        del self.augment_passes            # support images are used as they are
        self.holdout = holdout
        self.seed = seed

    def fit(self, text_weights: torch.Tensor, train: FeatureSet | None = None,
            val: FeatureSet | None = None) -> "SusX":
        """`train` is the SuS support set. `val` must be None: sus-x never looks at a
        labelled target image; it searches on held-out support images."""
        if val is not None:
            raise AnyclassError("sus-x: searches on held-out support images; it takes no "
                                "labelled val set (pass val=None)")
        check_support(self._name, train, text_weights.shape[1], what="support")
        cache, held = holdout_split(train, text_weights.shape[1], self.holdout, self.seed)
        self._fit_tipx(text_weights, cache, held if len(held) else None)
        self.chosen_.update({"support": len(train), "cache": len(cache),
                             "held_out": len(held),
                             "psi_range": "held-out support" if len(held) else "support"})
        return self
