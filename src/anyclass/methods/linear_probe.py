"""Linear probe: CLIP's few-shot baseline (Radford et al. 2021, appendix A.3).

The paper fits scikit-learn's L-BFGS logistic regression (max 1,000 iterations) on frozen
image features and chooses the L2 strength on a validation split over 1e-6 … 1e6 (96 log
steps) by a "parametric binary search": start at [1e-6, 1e-4, …, 1e6] and repeatedly halve
the interval around the peak until it reaches 8 steps per decade. CoOp's `lpclip` does the
same with C = 1/λ; Tip-Adapter and CoOp report it as "Linear-probe CLIP".

Our choices:
- Multinomial logistic regression, logits = f W + b on the L2-normalised features f
  (re-normalised here; `FeatureSet` features already are), W [D, K], b [K] (b unpenalised).
  Objective (1/N)·(Σ CE + ‖W‖²/(2C)), i.e. scikit-learn's 0.5‖W‖² + C·Σ CE divided by C·N:
  the same minimiser, so our C is scikit-learn's C, and the same averaged scale, so `tol`
  (max |gradient|) means what scikit-learn's does. Analytic gradient, no autograd graph.
- Full batch, torch L-BFGS (strong Wolfe line search, history 10 like scipy), zero start.
  float64: at large C the problem is ill-conditioned and float32 L-BFGS stalls at
  max |g| ≈ 1e-5 and ends 3e-4 … 4e-3 away from scikit-learn's probabilities (measured on a
  toy problem, C = 1 … 1e4); float64 matches to < 1e-6. Deterministic on CPU; 2x the float32
  cost there. Runs on the device of `text_weights`.
- Search (`C=None`): `grid_points` log-spaced C from `c_min` to `c_max` (default 7: every 2
  decades), then `halvings` times evaluate the current best C at ± half the previous step
  (default 4: 2 → 1/8 decade, the paper's resolution); 15 L-BFGS solves, each warm-started
  from the previous (coarse grid, ascending C) or from the current best (halvings). Best =
  highest val accuracy; ties → lower val cross-entropy, then the smaller C (the paper leaves
  ties open; with a few val images they are common). The chosen C keeps its solution.
- `text_weights` only give K and the class order: the probe cannot score classes it was not
  trained on (transfers = False); every class needs a train image.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F_

from ..errors import AnyclassError
from . import METHODS
from .base import FeatureMethod, FeatureSet
from .tip_adapter import check_support

_NAME = "linear-probe"
_DT = torch.float64


def _prep(features: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    x = features.to(device=device, dtype=_DT)
    if x.ndim != 2:
        raise AnyclassError(f"{_NAME}: {what} features must be [N, D], got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise AnyclassError(f"{_NAME}: {what} features contain NaN or inf")
    return F_.normalize(x, dim=-1)


def _solve(X: torch.Tensor, Y: torch.Tensor, C: float, theta0: torch.Tensor, max_iter: int,
           tol: float) -> tuple[torch.Tensor, int, bool]:
    """argmin (1/N)(Σ CE(X W + b, Y) + ‖W‖²/(2C)) by full-batch L-BFGS from theta0 = [W; b]
    [D+1, K]. Returns (theta, iterations, converged: max |gradient| <= tol)."""
    n, d = X.shape
    Xb = torch.cat([X, X.new_ones(n, 1)], 1)
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=int(max_iter), tolerance_grad=tol,
                            tolerance_change=0.0, history_size=10,
                            line_search_fn="strong_wolfe")
    inv_c, inv_n = 1.0 / C, 1.0 / n

    def closure() -> torch.Tensor:
        with torch.no_grad():
            Z = Xb @ theta
            lse = torch.logsumexp(Z, 1)
            W = theta[:d]
            loss = ((lse - (Z * Y).sum(1)).sum() + 0.5 * inv_c * (W * W).sum()) * inv_n
            G = Xb.T @ (torch.softmax(Z, 1) - Y)
            G[:d] += inv_c * W
            theta.grad = G.mul_(inv_n)
        return loss

    opt.step(closure)
    n_iter = int(opt.state[theta].get("n_iter", 0))
    g = theta.grad
    converged = g is not None and float(g.abs().max()) <= tol
    return theta.detach(), n_iter, converged


@METHODS.register(_NAME)
class LinearProbe(FeatureMethod):
    needs_train = True
    transfers = False

    def __init__(self, C: float | None = None, c_min: float = 1e-6, c_max: float = 1e6,
                 grid_points: int = 7, halvings: int = 4, max_iter: int = 1000,
                 tol: float = 1e-6) -> None:
        self.C = C
        self.c_min = c_min
        self.c_max = c_max
        self.grid_points = grid_points
        self.halvings = halvings
        self.max_iter = max_iter
        self.tol = tol

    def _check_params(self) -> None:
        bad = None
        if self.C is not None and not float(self.C) > 0:
            bad = f"C={self.C!r} (must be > 0, or None to search it)"
        elif not 0 < float(self.c_min) <= float(self.c_max) < math.inf:
            bad = f"c_min={self.c_min!r}, c_max={self.c_max!r} (need 0 < c_min <= c_max)"
        elif int(self.grid_points) < 1 or int(self.halvings) < 0:
            bad = f"grid_points={self.grid_points!r}, halvings={self.halvings!r}"
        elif int(self.max_iter) < 1 or not float(self.tol) >= 0:
            bad = f"max_iter={self.max_iter!r}, tol={self.tol!r}"
        if bad:
            raise AnyclassError(f"{_NAME}: bad hyperparameter {bad}")

    def fit(self, text_weights: torch.Tensor, train: FeatureSet | None = None,
            val: FeatureSet | None = None) -> "LinearProbe":
        self._check_params()
        k = int(text_weights.shape[1])
        dev = text_weights.device
        check_support(_NAME, train, k)
        X = _prep(train.features, dev, "train")
        Y = F_.one_hot(train.labels.long().to(dev), k).to(_DT)
        has_val = val is not None and len(val) > 0
        if self.C is None and not has_val:
            raise AnyclassError(f"{_NAME}: no val images to choose C on; pass a val split "
                                f"or a fixed C (e.g. --hparam C=1)")
        if has_val:
            Xv = _prep(val.features, dev, "val")
            yv = val.labels.long().to(dev)
            if len(yv) and (int(yv.min()) < 0 or int(yv.max()) >= k):
                raise AnyclassError(f"{_NAME}: val label outside 0..{k - 1}")

        def score(theta: torch.Tensor) -> tuple[float, float]:
            Z = Xv @ theta[:-1] + theta[-1]
            acc = float((Z.argmax(1) == yv).to(_DT).mean())
            return acc, float(F_.cross_entropy(Z, yv))

        theta0 = torch.zeros(X.shape[1] + 1, k, dtype=_DT, device=dev)
        tol, it = float(self.tol), int(self.max_iter)
        if self.C is not None:
            c = float(self.C)
            theta, n_iter, conv = _solve(X, Y, c, theta0, it, tol)
            if not conv:
                warnings.warn(f"{_NAME}: L-BFGS stopped at max_iter={it} before max |grad| "
                              f"<= tol={tol:g} (C={c:g}); raise max_iter", stacklevel=2)
            acc = score(theta)[0] if has_val else None
            self.chosen_ = {"C": c, "val_acc1": acc, "searched": False, "n_iter": n_iter,
                            "converged": conv}
        else:
            c, theta, acc, n_iter, conv = self._search(X, Y, theta0, score, it, tol)
        self.C_ = c
        self.W_ = theta[:-1].clone()           # [D, K] float64
        self.b_ = theta[-1].clone()            # [K]
        self.n_iter_ = n_iter
        self.converged_ = conv
        return self

    def _search(self, X, Y, theta0, score, max_iter, tol):
        lo, hi = math.log10(float(self.c_min)), math.log10(float(self.c_max))
        n = int(self.grid_points)
        step = (hi - lo) / (n - 1) if n > 1 else 0.0
        seen: dict[float, tuple] = {}          # log10 C → (acc, val CE, n_iter, converged)
        best: tuple | None = None              # (rank key, log10 C, theta)

        def evaluate(lc: float, start: torch.Tensor) -> torch.Tensor:
            nonlocal best
            theta, n_iter, conv = _solve(X, Y, 10.0 ** lc, start, max_iter, tol)
            acc, ce = score(theta)
            seen[lc] = (acc, ce, n_iter, conv)
            key = (acc, -ce, -lc)              # accuracy, then val CE, then smaller C
            if best is None or key > best[0]:
                best = (key, lc, theta)
            return theta

        warm = theta0
        for i in range(n):                     # coarse grid, ascending C, warm-started
            warm = evaluate(lo + i * step if i < n - 1 else hi, warm)
        h = step
        for _ in range(int(self.halvings) if n > 1 else 0):
            h /= 2
            centre, start = best[1], best[2]
            for lc in (centre - h, centre + h):
                if lo - 1e-9 <= lc <= hi + 1e-9 and not any(abs(lc - s) < 1e-9 for s in seen):
                    evaluate(min(max(lc, lo), hi), start)
        _, lc, theta = best
        acc, _, n_iter, conv = seen[lc]
        c = 10.0 ** lc
        self.chosen_ = {"C": c, "val_acc1": acc, "searched": True, "n_iter": n_iter,
                        "converged": conv,
                        "evaluated": [[10.0 ** s, seen[s][0]] for s in sorted(seen)]}
        return c, theta, acc, n_iter, conv

    def predict_logits(self, features: torch.Tensor) -> torch.Tensor:
        x = F_.normalize(features.to(device=self.W_.device, dtype=_DT), dim=-1)
        return (x @ self.W_ + self.b_).float()
