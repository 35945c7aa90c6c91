"""CHCO — classification head combination optimisation (MLL, METHODS.md §5).

For a task with classes c (each mapped to a graph node v_c), pick for each class one head h
(model m(h), output j) from any model so that the chosen heads recognise their classes and do
not fire on the task's other classes, running at most B models:

    u[h, c] = s[h, v_c] − λ · max_{c' ≠ c} s[h, v_c'] + ν · [synset(h) = v_c]   (utility)
    max  Σ u[h,c]·x[h,c] − μ · Σ cost_m·y_m
    s.t. Σ_h x[h,c] ≤ 1  (one head per class),  Σ_c x[h,c] ≤ 1  (one class per head),
         x[h,c] ≤ y_m(h),  Σ_m y_m ≤ B,  x, y ∈ {0, 1}

s = the hub's (propagated) label scores; ν (`semantic`) is a prior for a head trained on the
class's own concept, which guards against heads that fire on images they never saw. Only the top-k heads per class (by u) are candidates,
which keeps the ILP small and the greedy fast; classes whose best utility is below
`min_utility` (or whose name has no node) go to the fallback vision-language model.
Solvers: "milp" (exact, scipy.optimize.milp), "greedy" (model-wise greedy + swap local search),
"auto" (milp when the candidate problem is small).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import AnyclassError

MILP_MAX_VARS = 20_000


@dataclass
class Choice:
    cls: int                 # task class index
    row: int                 # row of the head in HubLabels
    model_id: int
    head: int
    score: float             # s[h, v_c]
    utility: float           # u[h, c]


@dataclass
class Selection:
    classes: list[str]
    choices: list[Choice | None]          # per class; None = fallback
    models: list[int]                     # model ids to run
    objective: float
    solver: str
    seconds: float
    unmapped: list[int] = field(default_factory=list)   # classes without a graph node

    @property
    def fallback(self) -> list[int]:
        return [c for c, ch in enumerate(self.choices) if ch is None]

    def summary(self) -> dict:
        return {"solver": self.solver, "objective": round(self.objective, 6),
                "seconds": round(self.seconds, 4), "models": self.models,
                "fallback": [self.classes[c] for c in self.fallback],
                "choices": {self.classes[ch.cls]: {"model": ch.model_id, "head": ch.head,
                                                   "score": round(ch.score, 4),
                                                   "utility": round(ch.utility, 4)}
                            for ch in self.choices if ch is not None}}


def _task_columns(scores, nodes: Sequence[str], class_nodes: Sequence[str | None]):
    index = {n: i for i, n in enumerate(nodes)}
    cols = np.array([index.get(n, -1) if n else -1 for n in class_nodes], dtype=np.int64)
    mapped = np.flatnonzero(cols >= 0)
    sub = scores[:, cols[mapped]]                       # [n_heads, C'] dense or sparse
    return cols, mapped, sub


def _topk_rows(sub, k: int) -> np.ndarray:
    """Candidate head rows: the k best heads of each class column (union)."""
    try:
        import scipy.sparse as sp
        sparse = sp.issparse(sub)
    except ImportError:          # pragma: no cover
        sparse = False
    if not sparse:
        k = min(k, sub.shape[0])
        top = np.argpartition(-np.nan_to_num(sub, nan=-np.inf), k - 1, axis=0)[:k]
        return np.unique(top)
    sub = sub.tocsc()
    rows = []
    for j in range(sub.shape[1]):                       # per class, not per head
        a, b = sub.indptr[j], sub.indptr[j + 1]
        data = sub.data[a:b]
        kk = min(k, len(data))
        if kk:
            rows.append(sub.indices[a:b][np.argpartition(-data, kk - 1)[:kk]])
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def _utilities(R: np.ndarray, lam: float) -> np.ndarray:
    """u = R − λ · (max over the other columns), for every (row, column) at once."""
    R = np.nan_to_num(R.astype(np.float64), nan=0.0)
    if R.shape[1] == 1:
        return R.copy()
    order = np.argsort(-R, axis=1)
    m1 = np.take_along_axis(R, order[:, :1], axis=1)
    m2 = np.take_along_axis(R, order[:, 1:2], axis=1)
    other = np.where(np.arange(R.shape[1])[None, :] == order[:, :1], m2, m1)
    return R - lam * other


def select_heads(labels, class_nodes: Sequence[str | None], max_models: int | None = None,
                 solver: str = "auto", lam: float = 1.0, mu: float = 0.0,
                 min_utility: float = 0.02, top_k: int = 20,
                 classnames: Sequence[str] | None = None, semantic: float = 0.3) -> Selection:
    """Choose a head per class (see module docstring). `labels` is a HubLabels (or anything
    with nodes, heads, scores, model_cost; scores may be a scipy.sparse matrix)."""
    t0 = time.perf_counter()
    if solver not in ("auto", "milp", "greedy"):
        raise AnyclassError(f"unknown selection solver {solver!r} (auto, milp or greedy)")
    if max_models is not None and max_models < 1:
        raise AnyclassError(f"max_models must be at least 1, got {max_models}")
    K = len(class_nodes)
    classes = list(classnames) if classnames is not None else [str(n) for n in class_nodes]
    cols, mapped, sub = _task_columns(labels.scores, labels.nodes, class_nodes)
    unmapped = [int(c) for c in np.flatnonzero(cols < 0)]
    heads = np.asarray(labels.heads, dtype=np.int64).reshape(-1, 2)
    empty = Selection(classes, [None] * K, [], 0.0, solver, 0.0, unmapped)
    if len(mapped) == 0 or len(heads) == 0:
        empty.seconds = time.perf_counter() - t0
        return empty

    rows = _topk_rows(sub, top_k)
    hs = np.asarray(getattr(labels, "head_synsets", None) or [], dtype=object)
    task_nodes = np.asarray([class_nodes[c] for c in mapped], dtype=object)
    if semantic and len(hs):                  # heads named for a task class are candidates too
        rows = np.union1d(rows, np.flatnonzero(np.isin(hs, task_nodes)))
    R = sub[rows]
    R = R.toarray() if hasattr(R, "toarray") else np.asarray(R)
    U = _utilities(R, lam)                                    # [n_cand, C']
    if semantic and len(hs):                  # + ν·[synset(h) = v_c]: the head's own concept
        U = U + semantic * (hs[rows][:, None] == task_nodes[None, :])
    # keep the top_k candidates per class whose utility clears the bar
    keep = np.zeros_like(U, dtype=bool)
    kk = min(top_k, U.shape[0])
    top = np.argpartition(-U, kk - 1, axis=0)[:kk]
    np.put_along_axis(keep, top, True, axis=0)
    keep &= U >= min_utility
    cand_model = heads[rows, 0]
    models_u, model_idx = np.unique(cand_model, return_inverse=True)
    cost = np.array([float(labels.model_cost.get(int(m), 1.0)) for m in models_u])

    use_milp = solver == "milp" or (solver == "auto" and keep.sum() + len(models_u)
                                    <= MILP_MAX_VARS)
    if use_milp:
        assign, objective = _solve_milp(U, keep, model_idx, cost, max_models, mu)
        name = "milp"
    else:
        assign, objective = _solve_greedy(U, keep, model_idx, cost, max_models, mu)
        name = "greedy"

    choices: list[Choice | None] = [None] * K
    for j, r in enumerate(assign):
        if r < 0:
            continue
        c = int(mapped[j])
        row = int(rows[r])
        choices[c] = Choice(c, row, int(heads[row, 0]), int(heads[row, 1]), float(R[r, j]),
                            float(U[r, j]))
    used = sorted({ch.model_id for ch in choices if ch is not None})
    return Selection(classes, choices, used, float(objective), name,
                     time.perf_counter() - t0, unmapped)


def _objective(U, assign, model_idx, cost, mu) -> float:
    a = np.asarray(assign)
    ok = a >= 0
    util = U[a[ok], np.flatnonzero(ok)].sum()
    return float(util - mu * cost[np.unique(model_idx[a[ok]])].sum())


def _solve_milp(U, keep, model_idx, cost, max_models, mu):
    """Exact ILP over the candidate pairs (scipy.optimize.milp / HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, vstack
    pr, pc = np.nonzero(keep)                       # candidate pairs (head row, class col)
    P, M = len(pr), len(cost)
    if P == 0:
        return np.full(U.shape[1], -1), 0.0
    c = np.concatenate([-U[pr, pc], mu * cost])     # minimise −objective
    n = P + M
    ar = np.arange(P)
    blocks, lo, hi = [], [], []
    # one head per class; one class per head
    blocks.append(coo_matrix((np.ones(P), (pc, ar)), shape=(U.shape[1], n)))
    lo.append(np.full(U.shape[1], -np.inf)); hi.append(np.ones(U.shape[1]))
    blocks.append(coo_matrix((np.ones(P), (pr, ar)), shape=(U.shape[0], n)))
    lo.append(np.full(U.shape[0], -np.inf)); hi.append(np.ones(U.shape[0]))
    # x_p − y_m(p) ≤ 0
    blocks.append(coo_matrix((np.r_[np.ones(P), -np.ones(P)],
                              (np.r_[ar, ar], np.r_[ar, P + model_idx[pr]])), shape=(P, n)))
    lo.append(np.full(P, -np.inf)); hi.append(np.zeros(P))
    if max_models is not None:
        blocks.append(coo_matrix((np.ones(M), (np.zeros(M, int), P + np.arange(M))),
                                 shape=(1, n)))
        lo.append(np.array([-np.inf])); hi.append(np.array([float(max_models)]))
    A = vstack(blocks).tocsr()
    res = milp(c, constraints=LinearConstraint(A, np.concatenate(lo), np.concatenate(hi)),
               integrality=np.ones(n), bounds=Bounds(0, 1))
    if res.x is None:
        raise AnyclassError(f"head selection ILP failed: {res.message}")
    x = res.x[:P] > 0.5
    assign = np.full(U.shape[1], -1)
    assign[pc[x]] = pr[x]
    return assign, -float(res.fun)


def _assign_within(U, keep, model_idx, chosen: np.ndarray) -> np.ndarray:
    """Best allowed head per class among the chosen models; a head serves one class."""
    Um = np.where(keep & chosen[model_idx][:, None], U, -np.inf)
    assign = Um.argmax(axis=0)
    assign[~np.isfinite(Um.max(axis=0))] = -1
    # rare: one head best for two classes -> keep the higher, re-pick for the other
    dup = np.flatnonzero(np.bincount(assign[assign >= 0], minlength=U.shape[0]) > 1)
    for r in dup:
        cls = np.flatnonzero(assign == r)
        best = cls[U[r, cls].argmax()]
        for c in cls[cls != best]:
            col = Um[:, c].copy()
            col[np.unique(assign[assign >= 0])] = -np.inf
            assign[c] = col.argmax() if np.isfinite(col.max()) else -1
    return assign


def _solve_greedy(U, keep, model_idx, cost, max_models, mu, swaps: int = 2):
    """Add the model with the largest marginal gain until B models or no gain; then try
    swapping a chosen model for an unchosen one. All gains are computed as one tensor op
    over models × classes."""
    M, C = len(cost), U.shape[1]
    G = np.full((M, C), -np.inf)                   # best utility of each model per class
    Uk = np.where(keep, U, -np.inf)
    np.maximum.at(G, model_idx, Uk)
    G = np.maximum(G, 0.0)
    B = M if max_models is None else min(max_models, M)
    chosen = np.zeros(M, dtype=bool)
    cur = np.zeros(C)
    for _ in range(B):
        gain = np.maximum(G - cur, 0.0).sum(axis=1) - mu * cost
        gain[chosen] = -np.inf
        m = int(gain.argmax())
        if gain[m] <= 0:
            break
        chosen[m] = True
        cur = np.maximum(cur, G[m])
    for _ in range(swaps):                           # local search: 1-swap moves
        improved = False
        for m_out in np.flatnonzero(chosen):
            rest = chosen.copy(); rest[m_out] = False
            base = G[rest].max(axis=0) if rest.any() else np.zeros(C)
            base = np.maximum(base, 0.0)
            val = np.maximum(G, base).sum(axis=1) - mu * cost
            val[rest] = -np.inf
            m_in = int(val.argmax())
            if m_in != m_out and val[m_in] > np.maximum(G[m_out], base).sum() - mu * cost[m_out] + 1e-12:
                chosen = rest; chosen[m_in] = True
                improved = True
        if not improved:
            break
    assign = _assign_within(U, keep, model_idx, chosen)
    return assign, _objective(U, assign, model_idx, cost, mu)
