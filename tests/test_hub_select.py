"""CHCO selection: the ILP against brute-force enumeration, greedy feasible and never above."""
import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from anyclass.errors import AnyclassError
from anyclass.hub.select import select_heads
from anyclass.hub.store import HubLabels


def _hub(seed, models=4, heads=3, nodes=6):
    rng = np.random.default_rng(seed)
    scores = (rng.random((models * heads, nodes)) ** 3).astype(np.float32)
    hl = [(m + 1, h) for m in range(models) for h in range(heads)]
    return HubLabels([f"n{i}.n.01" for i in range(nodes)], hl, scores,
                     {m + 1: 1.0 for m in range(models)})


def _brute(lab, cls_nodes, B, lam=1.0, mu=0.0, min_u=0.02):
    cols = [lab.nodes.index(n) for n in cls_nodes]
    S = lab.scores[:, cols].astype(np.float64)
    U = np.empty_like(S)
    for h in range(S.shape[0]):
        for c in range(S.shape[1]):
            others = [S[h, o] for o in range(S.shape[1]) if o != c]
            U[h, c] = S[h, c] - lam * (max(others) if others else 0.0)
    best = 0.0
    opts = [[-1] + [h for h in range(S.shape[0]) if U[h, c] >= min_u] for c in range(S.shape[1])]
    for a in itertools.product(*opts):
        used = [h for h in a if h >= 0]
        if len(used) != len(set(used)):
            continue
        models = {lab.heads[h][0] for h in used}
        if B is not None and len(models) > B:
            continue
        val = sum(U[h, c] for c, h in enumerate(a) if h >= 0) - mu * len(models)
        best = max(best, val)
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("B", [1, 2, None])
def test_milp_is_optimal_and_greedy_feasible(seed, B):
    lab = _hub(seed)
    cls = ["n0.n.01", "n2.n.01", "n3.n.01", "n5.n.01"]
    exact = select_heads(lab, cls, max_models=B, solver="milp")
    assert exact.objective == pytest.approx(_brute(lab, cls, B), abs=1e-6)
    greedy = select_heads(lab, cls, max_models=B, solver="greedy")
    assert greedy.objective <= exact.objective + 1e-9
    for sel in (exact, greedy):
        rows = [ch.row for ch in sel.choices if ch is not None]
        assert len(rows) == len(set(rows))                     # a head serves one class
        if B is not None:
            assert len(sel.models) <= B


def test_head_firing_on_another_class_is_avoided():
    # head 0 is strong on both task classes; head 1 is weaker but only fires on class a
    scores = np.array([[0.9, 0.8], [0.6, 0.0], [0.0, 0.5]], np.float32)
    lab = HubLabels(["a.n.01", "b.n.01"], [(1, 0), (2, 0), (3, 0)], scores, {1: 1, 2: 1, 3: 1})
    sel = select_heads(lab, ["a.n.01", "b.n.01"], solver="milp")
    assert [ch.model_id for ch in sel.choices] == [2, 3]


def test_unmapped_classes_fall_back_and_sparse_equals_dense():
    lab = _hub(7)
    cls = ["n1.n.01", None, "zz.n.09", "n4.n.01"]
    dense = select_heads(lab, cls, max_models=2, solver="greedy", classnames=list("abcd"))
    assert dense.unmapped == [1, 2] and {1, 2} <= set(dense.fallback)
    lab_sp = HubLabels(lab.nodes, lab.heads, sp.csc_matrix(lab.scores), lab.model_cost)
    sparse = select_heads(lab_sp, cls, max_models=2, solver="greedy", classnames=list("abcd"))
    assert [c and c.row for c in sparse.choices] == [c and c.row for c in dense.choices]
    assert sparse.objective == pytest.approx(dense.objective)


def test_bad_solver_and_bound():
    lab = _hub(0)
    with pytest.raises(AnyclassError, match="unknown selection solver 'ilp'"):
        select_heads(lab, ["n0.n.01"], solver="ilp")
    with pytest.raises(AnyclassError, match="max_models must be at least 1"):
        select_heads(lab, ["n0.n.01"], max_models=0)


def test_semantic_prior_prefers_the_head_named_for_the_class():
    # head 0 (model 1) fires a bit more on a's images but was trained on something else;
    # head 1 (model 2) is the a-head. With ν the named head wins; without, the stronger one.
    scores = np.array([[0.5, 0.0], [0.4, 0.0]], np.float32)
    lab = HubLabels(["a.n.01", "b.n.01"], [(1, 0), (2, 0)], scores, {1: 1, 2: 1},
                    head_synsets=["x.n.01", "a.n.01"])
    assert select_heads(lab, ["a.n.01", "b.n.01"], semantic=0.0).choices[0].model_id == 1
    sel = select_heads(lab, ["a.n.01", "b.n.01"], semantic=0.3)
    assert sel.choices[0].model_id == 2
    assert sel.choices[0].utility == pytest.approx(0.4 + 0.3)
