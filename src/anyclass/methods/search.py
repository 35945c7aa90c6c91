"""Vectorised hyperparameter search and memory-bounded terms of the cache-model family
(Tip-Adapter, TIP-X, SuS-X; METHODS.md §1–2).

Symbols: f query features [N, D], F support/cache keys [M, D], L one-hot support labels
[M, K], W text classifier [D, K], y query labels [N].

    Z = s · f W                                   zero-shot logits
    A_β L = exp(−β (1 − f Fᵀ)) L                  Tip-Adapter cache term
    T = −ψ(M) L,  M_ij = KL(s_i ‖ S_j)            TIP-X signature term
    logits(α, β, γ) = Z + α A_β L + γ T

Why it is fast: Z and T do not depend on (α, β, γ) and A_β L only on β, so the search
computes A_β L once per β (a few β at a time, within `max_bytes`) and then scores *every*
(α, γ) pair of that β at once. Scoring is exact and sparse: query i is right at (α, γ) iff
d_k(α, γ) = ΔZ_k + α ΔA_k + γ ΔT_k > 0 for every other class k (Δ = true class minus k).
d_k is linear in (α, γ), so its extremes over the grid's bounding box are at the corners;
classes that can never reach d_k ≤ 0 inside the box are dropped, queries where some class
wins at every corner are wrong everywhere. For the remaining queries and their candidate
classes, each value of the smaller axis (α) leaves an interval of right values on the other
(γ), counted on the grid with searchsorted and a difference array. The result is the same
count of right queries as computing every logit matrix and its argmax (up to float
rounding at exact ties).

Memory: nothing N×M×K is ever built. The KL matrix is M = rowwise Σ s log s − s (log S)ᵀ, a
matrix product, computed in row blocks of at most `max_bytes`; for TIP-X only its min/max
and M L are kept (ψ is affine, so ψ(M) L = a·(M L) + b·1ᵀL). ψ rescales M into the range of
the affinities f Fᵀ of one split: the search ranges each split on itself; a fitted method
keeps the constants of its search split (`psi_`) and applies them to every later batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

DEFAULT_MAX_BYTES = 256 * 2**20   # temporary memory per block (affinities, KL rows, ...)

# The reference grids: n values lo + i·(hi − lo)/n, i < n (hi itself is not reached).
TIP_ALPHA = (0.1, 50.0, 20)      # Tip-Adapter: α 0.1 … 47.5
TIP_BETA = (0.1, 50.0, 200)      # Tip-Adapter: β 0.1 … 49.85 (reference ranges per dataset)
TIPX_ALPHA = (0.1, 50.0, 20)     # TIP-X: α 0.1 … 47.5
TIPX_BETA = (1.0, 50.0, 200)     # TIP-X: β 1 … 49.8
TIPX_GAMMA = (0.1, 30.0, 50)     # TIP-X: γ 0.1 … 29.4


def grid(spec: Sequence[float] | torch.Tensor, dtype: torch.dtype = torch.float32
         ) -> torch.Tensor:
    """(lo, hi, n) → the reference's n-point grid lo + i·(hi − lo)/n; a tensor is used as
    is (explicit values)."""
    if isinstance(spec, torch.Tensor):
        return spec.to(dtype).reshape(-1)
    if len(spec) != 3 or float(spec[2]) < 1 or not float(spec[2]).is_integer():
        raise ValueError(f"a search grid is (lo, hi, n) with integer n >= 1, got {spec!r}")
    lo, hi, n = float(spec[0]), float(spec[1]), int(spec[2])
    return torch.tensor([lo + i * (hi - lo) / n for i in range(n)], dtype=dtype)


def _rows(cols: int, max_bytes: int, itemsize: int = 4, copies: int = 2) -> int:
    """Rows of a [rows, cols] block (times `copies` live buffers) that fit `max_bytes`."""
    return max(1, int(max_bytes) // max(1, cols * itemsize * copies))


def one_hot(labels: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), k).to(dtype)


# ------------------------------------------------------------------------- terms

def log_signatures(x: torch.Tensor, W: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax(x W / τ): TIP-X's image-text signatures (τ on raw cosines, no scale)."""
    return torch.log_softmax(x @ W.to(x.dtype) / tau, dim=-1)


def kl_matrix(s_log: torch.Tensor, S_log: torch.Tensor,
              max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """M_ij = KL(s_i ‖ S_j) = Σ_k s_ik log s_ik − s_i · log S_j, for log-probabilities
    s_log [N, K], S_log [M, K] → [N, M]; one matrix product per block of rows, every row
    filled (the reference left rows past its last full batch at zero)."""
    n, m = s_log.shape[0], S_log.shape[0]
    out = torch.empty(n, m, dtype=s_log.dtype, device=s_log.device)
    St = S_log.T.contiguous()
    step = _rows(m, max_bytes, s_log.element_size(), 1)
    for a in range(0, n, step):
        sl = s_log[a:a + step]
        s = sl.exp()
        neg_ent = (s * sl).sum(1, keepdim=True)                    # Σ_k s log s
        torch.addmm(neg_ent, s, St, beta=1, alpha=-1, out=out[a:a + step])
    return out


def kl_label_term(s_log: torch.Tensor, S_log: torch.Tensor, L: torch.Tensor,
                  max_bytes: int = DEFAULT_MAX_BYTES
                  ) -> tuple[torch.Tensor, float, float]:
    """(M L [N, K], min M, max M) with M = kl_matrix(s_log, S_log) built block by block:
    peak temporary memory is one [rows, M] block ≤ max_bytes, never N×M."""
    n, m = s_log.shape[0], S_log.shape[0]
    St = S_log.T.contiguous()
    L = L.to(s_log.dtype)
    ML = torch.empty(n, L.shape[1], dtype=s_log.dtype, device=s_log.device)
    lo, hi = float("inf"), float("-inf")
    step = _rows(m, max_bytes, s_log.element_size(), 1)
    for a in range(0, n, step):
        sl = s_log[a:a + step]
        s = sl.exp()
        blk = torch.addmm((s * sl).sum(1, keepdim=True), s, St, beta=1, alpha=-1)
        lo, hi = min(lo, float(blk.min())), max(hi, float(blk.max()))
        ML[a:a + step] = blk @ L
        del blk
    return ML, lo, hi


def affinity_range(f: torch.Tensor, F: torch.Tensor,
                   max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[float, float]:
    """(min, max) of f Fᵀ, block by block."""
    lo, hi = float("inf"), float("-inf")
    step = _rows(F.shape[0], max_bytes, f.element_size(), 1)
    Ft = F.T.to(f.dtype)
    for a in range(0, f.shape[0], step):
        blk = f[a:a + step] @ Ft
        lo, hi = min(lo, float(blk.min())), max(hi, float(blk.max()))
    return lo, hi


def psi_affine(m_lo: float, m_hi: float, a_lo: float, a_hi: float) -> tuple[float, float]:
    """ψ(M) = scale·M + shift: min-max rescale of M into [a_lo, a_hi]. A constant M maps
    to a_lo (no information, and no division by zero)."""
    if m_hi <= m_lo:
        return 0.0, a_lo
    scale = (a_hi - a_lo) / (m_hi - m_lo)
    return scale, a_lo - scale * m_lo


def psi(Mx: torch.Tensor, aff: torch.Tensor) -> torch.Tensor:
    """ψ on materialised matrices (tests, small inputs): rescale Mx into aff's range."""
    scale, shift = psi_affine(float(Mx.min()), float(Mx.max()), float(aff.min()),
                              float(aff.max()))
    return Mx * scale + shift


def kl_term(f: torch.Tensor, F: torch.Tensor, W: torch.Tensor, L: torch.Tensor,
            tau: float = 0.5, max_bytes: int = DEFAULT_MAX_BYTES,
            psi: tuple[float, float] | None = None) -> torch.Tensor:
    """T = −ψ(M) L [N, K] (memory-bounded). ψ = (scale, shift) fixed beforehand (a fitted
    method's `psi_`, so a row's logits do not depend on the other rows), or, with psi=None,
    ranged on this split's own M and f Fᵀ (the search, which ranges on its own split).

    Computed in float64 and returned in f's dtype: M = Σ s log s − s·log S subtracts two
    terms of size ~log K to get a small divergence, and ψ then stretches M's (small) range
    to the affinities' range, so float32 here would cost ~1e-3 in T (measured), enough to
    flip near-ties at large γ."""
    return kl_term_ranged(f, F, W, L, tau, max_bytes, psi)[0]


def kl_term_ranged(f: torch.Tensor, F: torch.Tensor, W: torch.Tensor, L: torch.Tensor,
                   tau: float = 0.5, max_bytes: int = DEFAULT_MAX_BYTES,
                   psi: tuple[float, float] | None = None
                   ) -> tuple[torch.Tensor, tuple[float, float]]:
    """(T, ψ's constants): `kl_term` plus the (scale, shift) it used, so a fit can keep the
    range of its search split and apply it to every later batch."""
    d = torch.float64
    ML, m_lo, m_hi = kl_label_term(log_signatures(f.to(d), W.to(d), tau),
                                   log_signatures(F.to(d), W.to(d), tau), L.to(d),
                                   max_bytes)
    if psi is None:
        a_lo, a_hi = affinity_range(f, F, max_bytes)
        psi = psi_affine(m_lo, m_hi, a_lo, a_hi)
    scale, shift = psi
    return (-(scale * ML + shift * L.to(d).sum(0))).to(f.dtype), (float(scale), float(shift))


def cache_term(f: torch.Tensor, F: torch.Tensor, L: torch.Tensor, beta: float,
               max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """A_β L = exp(−β (1 − f Fᵀ)) L [N, K], block by block."""
    Ft, L = F.T.to(f.dtype), L.to(f.dtype)
    out = torch.empty(f.shape[0], L.shape[1], dtype=f.dtype, device=f.device)
    step = _rows(F.shape[0], max_bytes, f.element_size(), 1)
    for a in range(0, f.shape[0], step):
        out[a:a + step] = torch.exp(-beta * (1 - f[a:a + step] @ Ft)) @ L
    return out


# ------------------------------------------------------------------------- search

@dataclass
class SearchResult:
    alpha: float
    beta: float
    gamma: float
    acc: float                    # fraction of the search split that is right at the pick
    correct: torch.Tensor = field(repr=False)   # [nα, nβ, nγ] counts of right queries
    alphas: torch.Tensor = field(repr=False)
    betas: torch.Tensor = field(repr=False)
    gammas: torch.Tensor = field(repr=False)

    def as_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "search_acc": self.acc,
                "grid": [len(self.alphas), len(self.betas), len(self.gammas)]}


def _intervals(e: torch.Tensor, dV: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row r is right at grid value v iff e_k + v·dV_k > 0 for every class k it competes
    with (e: margins with the other hyperparameters fixed). Each k bounds v from one side
    (−e_k/dV_k), so the right values form an open interval (lower, upper): returned as grid
    index range [start, end) and ok (non-empty, no class with dV_k = 0 and e_k <= 0).
    e, dV: [..., C] broadcastable; v: [nv] ascending."""
    pos, neg = dV > 0, dV < 0
    ratio = -e / dV                                    # where dV == 0: masked out below
    lower = torch.where(pos, ratio, float("-inf")).amax(-1)
    upper = torch.where(neg, ratio, float("inf")).amin(-1)
    bad = (~pos & ~neg & (e <= 0)).any(-1)
    start = torch.searchsorted(v, lower.contiguous(), right=True)   # first v > lower
    end = torch.searchsorted(v, upper.contiguous(), right=False)    # first v >= upper
    return start, end, ~bad & (start < end)


def _count_correct(dZ: torch.Tensor, dC: torch.Tensor, dT: torch.Tensor | None,
                   alphas: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """Right rows per (β, α, γ) [nb, nα, nγ] for one block of rows: margins dX = X[:, y] − X
    (own class: dZ = +inf), dZ/dT [rows, K], dC [nb, rows, K]; α, γ ascending.

    Exact and sparse. The margin to class k, d_k = dZ_k + α dC_k + γ dT_k, is linear in
    (α, γ), so its extremes over the grid's box are at the corners: a class that cannot
    reach d_k <= 0 inside the box never matters (most classes, for most rows); a row where
    some class wins at every corner is wrong everywhere. For the rest, only their candidate
    classes are gathered (rows bucketed by candidate count), the smaller of the α/γ axes is
    enumerated and the other solved as an interval per row (_intervals)."""
    nb, r, k = dC.shape
    if dT is None:                                     # Tip-Adapter: only α (γ = 0)
        u, dU, v, dV, swap = gammas, torch.zeros_like(dZ), alphas, dC, True
    elif len(alphas) <= len(gammas):
        u, dU, v, dV, swap = alphas, dC, gammas, dT, False
    else:
        u, dU, v, dV, swap = gammas, dT, alphas, dC, True
    dU, dV = dU.expand(nb, r, k), dV.expand(nb, r, k)
    ul, uh, vl, vh = float(u[0]), float(u[-1]), float(v[0]), float(v[-1])
    lo = dZ + torch.minimum(dU * ul, dU * uh) + torch.minimum(dV * vl, dV * vh)
    hi = dZ + torch.maximum(dU * ul, dU * uh) + torch.maximum(dV * vl, dV * vh)
    always_wrong = (hi <= 0).any(-1)                   # [nb, r]
    cnt = (lo <= 0).sum(-1)
    cnt[always_wrong] = -1
    nu, nv = len(u), len(v)
    out = (cnt == 0).sum(1)[:, None, None].expand(nb, nu, nv).clone()   # right everywhere
    bi, ri = torch.nonzero(cnt > 0, as_tuple=True)
    if len(bi):
        c_of = cnt[bi, ri]
        diff = torch.zeros(nb * nu, nv + 1, dtype=torch.long, device=dZ.device)
        uidx = torch.arange(nu, device=dZ.device)
        c = 1
        while True:
            sel = (c_of > c // 2) & (c_of <= c) if c > 1 else c_of == 1
            if sel.any():
                b_, r_ = bi[sel], ri[sel]
                # compact each row's candidate classes into c slots; padding slots carry
                # e = +inf, dV = 0: no constraint
                cand = lo[b_, r_] <= 0                                          # [S, K]
                si, ki = cand.nonzero(as_tuple=True)
                slot = cand.cumsum(1)[si, ki] - 1
                z = torch.full((len(b_), c), float("inf"), dtype=dZ.dtype)
                uu = torch.zeros(len(b_), c, dtype=dZ.dtype)
                vv = torch.zeros(len(b_), c, dtype=dZ.dtype)
                z[si, slot] = dZ[r_[si], ki]
                uu[si, slot] = dU[b_[si], r_[si], ki]
                vv[si, slot] = dV[b_[si], r_[si], ki]
                e = z[:, None, :] + u[None, :, None] * uu[:, None, :]          # [S, nu, c]
                start, end, ok = _intervals(e, vv[:, None, :], v)               # [S, nu]
                grp = (b_[:, None] * nu + uidx[None, :]).reshape(-1)
                okl = ok.long().reshape(-1)
                diff.index_put_((grp, start.reshape(-1)), okl, accumulate=True)
                diff.index_put_((grp, end.reshape(-1)), -okl, accumulate=True)
            if c >= int(c_of.max()):
                break
            c *= 2
        out += diff.cumsum(1)[:, :nv].reshape(nb, nu, nv)
    return out.transpose(1, 2) if swap else out


def search_grid(Z: torch.Tensor, f: torch.Tensor, F: torch.Tensor, L: torch.Tensor,
                labels: torch.Tensor, alphas, betas, gammas=(0.0, 0.0, 1),
                T: torch.Tensor | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                order: str = "abg") -> SearchResult:
    """Accuracy of Z + α A_β L + γ T at every grid point on (f, labels); the best point.

    Ties go to the first point in `order` ("abg": α outermost, then β, then γ — the TIP-X
    reference's loop nest; "bag": Tip-Adapter's β-then-α), as a strict `>` loop would.
    Memory: blocks of rows × β values within `max_bytes`; nothing N×M×K.
    """
    dt = Z.dtype
    if T is None:
        gammas = torch.zeros(1, dtype=torch.float64)
    exact = [grid(g, torch.float64) for g in (alphas, betas, gammas)]   # reported values
    alphas, betas, gammas = (g.to(dt) for g in exact)
    n, m = f.shape[0], F.shape[0]
    y = labels.long().to(Z.device)
    Ft, L = F.T.to(dt), L.to(dt)
    # grids ascending for the interval counting; counts are mapped back to the given order
    ao, go = torch.argsort(alphas), torch.argsort(gammas)
    a_s, g_s = alphas[ao], gammas[go]
    k = Z.shape[1]
    # A_β L = per-class sums of A's columns: with the support sorted by class in equal
    # groups (k-shot sets) a reshape-sum, else a product with the one-hot L
    sup = L.argmax(1)
    order_s = torch.argsort(sup, stable=True)
    per_class = torch.bincount(sup, minlength=k)
    equal = bool((per_class == per_class[0]).all()) and bool((L.sum(1) == 1).all())
    if equal:
        Ft = Ft[:, order_s]
    es = Z.element_size()
    rows = max(1, int(max_bytes) // (es * (2 * m + 10 * k)))   # affinities + margin blocks
    correct = torch.zeros(len(betas), len(alphas), len(gammas), dtype=torch.long)
    for a in range(0, n, rows):
        sl = slice(a, a + rows)
        yc = y[sl, None]
        dZ = Z[sl].gather(1, yc) - Z[sl]
        dZ.scatter_(1, yc, float("inf"))                   # the true class never competes
        dT = None if T is None else T[sl].gather(1, yc) - T[sl]
        aff1 = f[sl].to(dt) @ Ft - 1                       # fFᵀ − 1, once per row block
        r = aff1.shape[0]
        nb = max(1, min(len(betas), int(max_bytes) // (es * r * (m + 10 * k))))
        buf = torch.empty(nb, r, m, dtype=dt)              # reused: no fresh pages per β
        for b in range(0, len(betas), nb):
            bs = betas[b:b + nb]
            E = torch.mul(aff1, bs[:, None, None], out=buf[:len(bs)]).exp_()
            C = (E.view(len(bs), r, k, -1).sum(-1) if equal else E @ L)   # A_β L
            dC = C.gather(2, yc.expand(len(bs), -1, 1)) - C
            correct[b:b + len(bs)] += _count_correct(dZ, dC, dT, a_s, g_s)
    inv_a, inv_g = torch.argsort(ao), torch.argsort(go)
    correct = correct[:, inv_a][:, :, inv_g]
    cube = correct.permute(1, 0, 2)                                         # α, β, γ
    axes = {"a": 0, "b": 1, "g": 2}
    perm = [axes[c] for c in order]
    flat = cube.permute(*perm).reshape(-1)
    best = int(torch.argmax(flat))                      # first maximum in `order`
    idx = torch.unravel_index(torch.tensor(best), tuple(cube.permute(*perm).shape))
    pos = [0, 0, 0]
    for p, i in zip(perm, idx):
        pos[p] = int(i)
    ia, ib, ig = pos
    return SearchResult(float(exact[0][ia]), float(exact[1][ib]), float(exact[2][ig]),
                        float(cube[ia, ib, ig]) / max(1, n), cube, *exact)
