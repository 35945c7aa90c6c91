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


# ------------------------------------------------------------------ calibration on node images

def test_calibrated_combine_is_a_z_plus_b_plus_g_log_q():
    from anyclass.hub.reuse import Calibration
    rng = np.random.default_rng(1)
    l1 = rng.normal(size=(6, 4))
    fb = rng.dirichlet(np.ones(3), size=6)
    sel = _sel([Choice(0, 0, 1, 2, .5, .3), Choice(1, 0, 1, 0, .5, .3), None], [1])
    cal = Calibration(np.array([2.0, 0.5, 1.0]), np.array([0.1, -0.3, 0.0]), 0.7,
                      np.ones(3, bool), 0, 0.0, 0.0)
    out = combine(sel, {1: l1}, fb, cal)
    logp = l1 - np.log(np.exp(l1).sum(1, keepdims=True))
    z = np.stack([logp[:, 2], logp[:, 0], np.log(fb[:, 2])], 1)
    want = cal.a * z + cal.b + 0.7 * np.log(fb)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def _penalised_ce(theta, z, y, lq, reg):
    K = z.shape[1]
    a, b, g = 1 + theta[:K], theta[K:2 * K], theta[2 * K]
    s = a * z + b + g * lq
    s = s - s.max(1, keepdims=True)
    ll = s[np.arange(len(y)), y] - np.log(np.exp(s).sum(1))
    return -ll.mean() + reg / len(y) * (theta ** 2).sum()


def test_fit_calibration_matches_an_independent_optimiser():
    from scipy.optimize import minimize

    from anyclass.hub.reuse import fit_calibration
    rng = np.random.default_rng(2)
    n, K = 120, 4
    y = rng.integers(0, K, n)
    z = rng.normal(size=(n, K)) + 2.0 * np.eye(K)[y] * np.array([1.0, 0.3, 3.0, 1.0])
    lq = np.log(rng.dirichlet(np.ones(K), size=n))
    a, b, g = fit_calibration(z, y, lq, reg=1.0)
    ref = minimize(_penalised_ce, np.zeros(2 * K + 1), args=(z, y, lq, 1.0), method="BFGS",
                   options={"gtol": 1e-9}).x
    np.testing.assert_allclose(np.r_[a - 1, b, g], ref, atol=2e-3)
    # a head whose score separates its class well (×3) is weighted above a weak one (×0.3)
    assert a[2] > 1 > a[1]


def test_fit_calibration_recovers_the_generating_parameters():
    from anyclass.hub.reuse import fit_calibration
    rng = np.random.default_rng(3)
    n, K = 20_000, 3
    a0, b0 = np.array([0.5, 2.0, 1.0]), np.array([0.4, -0.6, 0.0])
    z = rng.normal(size=(n, K)) * 2
    s = a0 * z + b0
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    a, b, g = fit_calibration(z, y, None, reg=0.0)
    # softmax is shift-invariant: compare b up to a constant, a exactly; no VLM -> g = 0
    np.testing.assert_allclose(a, a0, atol=0.06)
    np.testing.assert_allclose(b - b.mean(), b0 - b0.mean(), atol=0.06)
    assert g == 0.0


def test_classes_without_node_images_keep_the_identity():
    from anyclass.hub.reuse import fit_calibration
    rng = np.random.default_rng(4)
    z = rng.normal(size=(40, 3))
    y = rng.integers(0, 2, 40)                      # class 2 has no images
    a, b, _ = fit_calibration(z, y, None, fitted=np.array([True, True, False]))
    assert a[2] == 1.0 and b[2] == 0.0
    assert not np.allclose(a[:2], 1.0)


class _Graph:
    images = {"cat.n.01": ["c1.png", "c2.png"], "dog.n.01": ["d1.png"],
              "clock.n.01": ["k1.png"]}


def test_node_image_set_labels_by_task_class():
    from anyclass.hub.reuse import node_image_set
    ds, has = node_image_set(_Graph(), ["dog.n.01", "clock.n.01", "cat.n.01", None,
                                        "clock.n.01", "cow.n.01"], list("abcdef"))
    # a node shared by two classes (b, e) gives its images to both; no node / no images: none
    assert ds.paths == ["d1.png", "k1.png", "c1.png", "c2.png", "k1.png"]
    assert ds.labels == [0, 1, 2, 2, 4]
    assert has.tolist() == [True, True, True, False, True, False]


def test_calibrate_needs_two_classes_with_images():
    from anyclass.hub.reuse import calibrate
    sel = _sel([Choice(0, 0, 1, 0, .5, .3), None, None], [1])
    assert calibrate(sel, {1: "x"}, _Graph(), ["cat.n.01", None, "cow.n.01"]) is None
