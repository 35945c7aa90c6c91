"""Reuse: chosen heads' per-model softmax and the fallback's probabilities, combined."""
import numpy as np
import pytest

from anyclass.errors import AnyclassError
from anyclass.hub.reuse import combine
from anyclass.hub.select import Choice, Selection


def _sel(choices, models):
    return Selection(["a", "b", "c"], choices, models, 0.0, "milp", 0.0)


def test_combine_matches_hand_computation():
    rng = np.random.default_rng(0)
    l1, l2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 7))
    fb = rng.dirichlet(np.ones(3), size=5)
    sel = _sel([Choice(0, 0, 1, 2, .5, .3), Choice(1, 0, 2, 6, .5, .3), None], [1, 2])
    out = combine(sel, {1: l1, 2: l2}, fb)
    p1 = np.exp(l1) / np.exp(l1).sum(1, keepdims=True)
    p2 = np.exp(l2) / np.exp(l2).sum(1, keepdims=True)
    want = np.log(np.stack([p1[:, 2], p2[:, 6], fb[:, 2]], 1))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_uncovered_class_without_fallback_is_named():
    sel = _sel([Choice(0, 0, 1, 0, .5, .3), None, None], [1])
    with pytest.raises(AnyclassError, match=r"no head in the hub covers 2 class\(es\).*b, c"):
        combine(sel, {1: np.zeros((2, 3))}, None)
