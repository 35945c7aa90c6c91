"""Linear probe (methods/linear_probe.py): scikit-learn parity at fixed C, CLIP's C search on
val, label/val errors, determinism. Toy tensors only."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from anyclass.errors import AnyclassError
from anyclass.methods import METHODS, FeatureSet, create_method
from anyclass.methods.linear_probe import LinearProbe

sklearn_lm = pytest.importorskip("sklearn.linear_model")


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def blobs(n_per: int, k: int = 3, d: int = 32, seed: int = 0, noise: float = 0.0,
          scale: float = 1.0, names: list[str] | None = None) -> FeatureSet:
    """Isotropic Gaussian classes around fixed means (the same for every split), an offset
    so normalising keeps the geometry; `noise`: fraction of labels moved to another class."""
    mu = torch.randn(k, d, generator=torch.Generator().manual_seed(0)) * scale
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per)
    x = mu[y] + torch.randn(len(y), d, generator=g)
    x[:, 0] += 3.0
    if noise:
        flip = torch.rand(len(y), generator=g) < noise
        y = torch.where(flip, (y + 1 + torch.randint(0, k - 1, (len(y),), generator=g)) % k, y)
    return FeatureSet(_norm(x), y, classnames=names)


def tw(d: int, k: int) -> torch.Tensor:
    return _norm(torch.randn(d, k, generator=torch.Generator().manual_seed(7)).T).T


def test_registered_and_contract():
    m = create_method("linear-probe")
    assert isinstance(m, LinearProbe) and METHODS.get("linear-probe") is LinearProbe
    assert m.needs_train and not m.transfers
    assert m.get_params()["C"] is None
    assert m.set_params(C=2.0).C == 2.0


@pytest.mark.parametrize("C", [0.1, 1.0, 100.0])
def test_matches_sklearn_at_fixed_c(C):
    tr = blobs(30, k=4, d=10, seed=1, scale=0.4)          # overlapping: finite optimum
    te = blobs(20, k=4, d=10, seed=2, scale=0.4)
    m = LinearProbe(C=C).fit(tw(10, 4), tr)
    assert m.chosen_["converged"] and not m.chosen_["searched"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # deprecations across versions
        ref = sklearn_lm.LogisticRegression(C=C, tol=1e-10, max_iter=100_000).fit(
            tr.features.double().numpy(), tr.labels.numpy())
    p = torch.softmax(m.predict_logits(te.features).double(), 1).numpy()
    p_ref = ref.predict_proba(te.features.double().numpy())
    assert np.abs(p - p_ref).max() < 1e-4
    # the weights themselves (sklearn: coef_ [K, D]); the bias only up to a constant shift
    assert np.abs(m.W_.T.numpy() - ref.coef_).max() < 1e-3 * max(1.0, np.abs(ref.coef_).max())


def test_logits_follow_text_weights_class_order():
    tr, te = blobs(10, k=4, d=8, seed=1), blobs(5, k=4, d=8, seed=2)
    perm = torch.tensor([2, 0, 3, 1])                      # class c becomes perm[c]
    a = LinearProbe(C=1.0).fit(tw(8, 4), tr).predict_logits(te.features)
    tr2 = FeatureSet(tr.features, perm[tr.labels])
    b = LinearProbe(C=1.0).fit(tw(8, 4), tr2).predict_logits(te.features)
    assert a.shape == (len(te), 4)
    torch.testing.assert_close(b[:, perm], a, atol=1e-5, rtol=1e-5)


def test_search_picks_best_val_on_clip_grid():
    tr, va = blobs(16, seed=1, noise=0.3), blobs(50, seed=101)
    m = LinearProbe().fit(tw(32, 3), tr, va)
    ch = m.chosen_
    ev = dict((round(math.log10(c), 6), a) for c, a in ch["evaluated"])
    assert ch["searched"] and ch["C"] == m.C_
    # CLIP's protocol: every 2 decades over 1e-6..1e6, then 4 halvings (2 new C each)
    assert {-6, -4, -2, 0, 2, 4, 6} <= set(ev) and len(ev) <= 7 + 2 * 4
    lc = round(math.log10(ch["C"]), 6)
    # the halvings refine around the peak down to 1/8 decade (the paper's 96 steps / 12)
    assert all(float(l * 8).is_integer() for l in ev)
    assert min(abs(l - lc) for l in ev if l != lc) == 0.125
    # the chosen C is the best of the evaluated ones, and its score is what the model does
    assert ch["val_acc1"] == max(ev.values()) == ev[lc]
    acc = (m.predict_logits(va.features).argmax(1) == va.labels).double().mean().item()
    assert acc == pytest.approx(ch["val_acc1"], abs=1e-12)
    assert ch["val_acc1"] > ev[6] and ch["val_acc1"] > ev[-6]   # an interior peak


def test_search_c_grows_when_clean_shrinks_with_label_noise():
    """Same geometry, separable classes: clean labels → weak regularisation (large C, val
    accuracy ties broken by val CE); 30% train label noise → strong regularisation."""
    va = blobs(50, seed=101)
    for seed in (1, 3):
        clean = LinearProbe().fit(tw(32, 3), blobs(16, seed=seed), va).chosen_
        noisy = LinearProbe().fit(tw(32, 3), blobs(16, seed=seed, noise=0.3), va).chosen_
        assert clean["val_acc1"] == 1.0 and clean["C"] >= 1e3
        assert noisy["C"] <= 10 and noisy["C"] * 1e3 <= clean["C"]


def test_search_range_and_steps_are_hyperparameters():
    tr, va = blobs(16, seed=1, noise=0.3), blobs(50, seed=101)
    m = LinearProbe(c_min=1e-2, c_max=1e2, grid_points=5, halvings=1).fit(tw(32, 3), tr, va)
    cs = [c for c, _ in m.chosen_["evaluated"]]
    assert min(cs) >= 1e-2 * (1 - 1e-12) and max(cs) <= 1e2 * (1 + 1e-12)
    assert len(cs) <= 5 + 2
    assert [round(math.log10(c), 6) for c in cs][:1] == [-2.0]


def test_fixed_c_needs_no_val_and_reports_val_when_given():
    tr, va = blobs(8, seed=1), blobs(8, seed=2)
    m = LinearProbe(C=1.0).fit(tw(32, 3), tr)
    assert m.chosen_["C"] == 1.0 and m.chosen_["val_acc1"] is None
    m = LinearProbe(C=1.0).fit(tw(32, 3), tr, va)
    assert 0.0 <= m.chosen_["val_acc1"] <= 1.0


@pytest.mark.parametrize("val", [None, FeatureSet(torch.zeros(0, 32), torch.zeros(0).long())])
def test_search_without_val_is_an_error(val):
    with pytest.raises(AnyclassError, match=r"^linear-probe: no val images to choose C on; "
                       r"pass a val split or a fixed C"):
        LinearProbe().fit(tw(32, 3), blobs(4, seed=1), val)


def test_class_without_train_sample_is_named():
    tr = blobs(4, k=3, seed=1, names=["cat", "dog", "eel"])
    keep = tr.labels != 2
    tr = FeatureSet(tr.features[keep], tr.labels[keep], classnames=tr.classnames)
    with pytest.raises(AnyclassError, match=r"linear-probe: class 'eel' has no image in the "
                       r"train set"):
        LinearProbe(C=1.0).fit(tw(32, 3), tr)
    with pytest.raises(AnyclassError, match=r"class #2 has no image"):
        LinearProbe(C=1.0).fit(tw(32, 3), FeatureSet(tr.features, tr.labels))
    with pytest.raises(AnyclassError, match=r"needs a non-empty labelled train set"):
        LinearProbe(C=1.0).fit(tw(32, 3), None)


def test_bad_inputs():
    tr = blobs(4, seed=1)
    with pytest.raises(AnyclassError, match=r"bad hyperparameter C=-1"):
        LinearProbe(C=-1).fit(tw(32, 3), tr)
    with pytest.raises(AnyclassError, match=r"val label outside 0\.\.2"):
        LinearProbe().fit(tw(32, 3), tr, FeatureSet(tr.features, tr.labels + 1))
    bad = tr.features.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AnyclassError, match=r"train features contain NaN"):
        LinearProbe(C=1.0).fit(tw(32, 3), FeatureSet(bad, tr.labels))


def test_deterministic():
    tr, va, te = blobs(16, seed=1, noise=0.3), blobs(20, seed=101), blobs(10, seed=5)
    a = LinearProbe().fit(tw(32, 3), tr, va)
    b = LinearProbe().fit(tw(32, 3), tr, va)
    assert a.chosen_ == b.chosen_
    assert torch.equal(a.predict_logits(te.features), b.predict_logits(te.features))
    assert a.predict_logits(te.features).dtype == torch.float32
