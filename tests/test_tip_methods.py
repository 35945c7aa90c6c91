"""Tip-Adapter, Tip-Adapter-F, TIP-X and SuS-X against independent computations
(explicit loops / numpy / per-pair KL) on small random tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anyclass.errors import AnyclassError
from anyclass.methods import METHODS, FeatureSet, create_method
from anyclass.methods import search as S
from anyclass.methods.tipx import holdout_split

D, K = 12, 5


def _unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, dim=dim)


def make_task(seed: int = 0, n_train: int = 4, n_val: int = 30, n_test: int = 40,
              dtype=torch.float64):
    """Features with class structure: class centre + noise; W = noisy centres."""
    g = torch.Generator().manual_seed(seed)
    centres = _unit(torch.randn(K, D, generator=g, dtype=dtype))

    def draw(n_per: int) -> FeatureSet:
        y = torch.arange(K).repeat_interleave(n_per)
        x = _unit(centres[y] + 0.9 * torch.randn(len(y), D, generator=g, dtype=dtype))
        return FeatureSet(x, y, classnames=[f"c{k}" for k in range(K)])
    W = _unit(centres.T + 0.7 * torch.randn(D, K, generator=g, dtype=dtype), dim=0)
    return W, draw(n_train), draw(n_val // K), draw(n_test // K)


# ------------------------------------------------------------------ formulas

def naive_kl(s: np.ndarray, S_: np.ndarray) -> np.ndarray:
    out = np.zeros((len(s), len(S_)))
    for i in range(len(s)):
        for j in range(len(S_)):
            out[i, j] = sum(s[i, k] * (np.log(s[i, k]) - np.log(S_[j, k]))
                            for k in range(s.shape[1]))
    return out


def softmax_np(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_kl_matrix_matches_per_pair_kl_and_torch():
    W, tr, _, te = make_task()
    s_log = S.log_signatures(te.features, W, 0.5)
    S_log = S.log_signatures(tr.features, W, 0.5)
    M = S.kl_matrix(s_log, S_log)
    s = softmax_np(te.features.numpy() @ W.numpy() / 0.5)
    Sn = softmax_np(tr.features.numpy() @ W.numpy() / 0.5)
    np.testing.assert_allclose(M.numpy(), naive_kl(s, Sn), rtol=1e-9, atol=1e-12)
    # and torch's own KL on one pair: kl_div(input=log q, target=p) = KL(p || q)
    kl01 = F.kl_div(S_log[3], s_log[7], log_target=True, reduction="sum")
    assert float(M[7, 3]) == pytest.approx(float(kl01), rel=1e-9)


@pytest.mark.parametrize("max_bytes", [1, 8 * 20, 8 * 20 * 7, 10**9])
def test_chunked_kl_equals_unchunked(max_bytes):
    W, tr, _, te = make_task(1)
    s_log = S.log_signatures(te.features, W, 0.5)
    S_log = S.log_signatures(tr.features, W, 0.5)
    full = S.kl_matrix(s_log, S_log, max_bytes=10**12)
    assert torch.allclose(S.kl_matrix(s_log, S_log, max_bytes=max_bytes), full, atol=1e-12)
    L = S.one_hot(tr.labels, K, torch.float64)
    ML, lo, hi = S.kl_label_term(s_log, S_log, L, max_bytes=max_bytes)
    assert torch.allclose(ML, full @ L, atol=1e-10)
    assert (lo, hi) == pytest.approx((float(full.min()), float(full.max())), rel=1e-12)


def test_psi_rescales_into_affinity_range_of_same_split():
    rng = np.random.default_rng(0)
    Mx, aff = rng.random((6, 9)) * 3 + 1, rng.random((6, 9)) - 0.3
    want = np.empty_like(Mx)
    for i in range(6):
        for j in range(9):
            want[i, j] = ((Mx[i, j] - Mx.min()) / (Mx.max() - Mx.min())
                          * (aff.max() - aff.min()) + aff.min())
    got = S.psi(torch.from_numpy(Mx), torch.from_numpy(aff)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.min() == pytest.approx(aff.min()) and got.max() == pytest.approx(aff.max())
    # constant M carries no information: maps to a constant, no NaN
    assert torch.isfinite(S.psi(torch.ones(2, 3), torch.from_numpy(aff))).all()


def naive_tip_logits(f, Fk, y_sup, W, scale, alpha, beta):
    f, Fk, W = f.numpy(), Fk.numpy(), W.numpy()
    out = np.zeros((len(f), W.shape[1]))
    for i in range(len(f)):
        for k in range(W.shape[1]):
            out[i, k] = scale * f[i] @ W[:, k]
            for j in range(len(Fk)):
                if int(y_sup[j]) == k:
                    out[i, k] += alpha * np.exp(-beta * (1 - f[i] @ Fk[j]))
    return out


def naive_tipx_logits(f, Fk, y_sup, W, scale, alpha, beta, gamma, tau, range_f):
    """ψ's min/max taken on the split `range_f` (the fit's), applied to f's divergences."""
    base = naive_tip_logits(f, Fk, y_sup, W, scale, alpha, beta)
    fn, Fn, Wn, rn = f.numpy(), Fk.numpy(), W.numpy(), range_f.numpy()
    Mx = naive_kl(softmax_np(fn @ Wn / tau), softmax_np(Fn @ Wn / tau))
    Mr = naive_kl(softmax_np(rn @ Wn / tau), softmax_np(Fn @ Wn / tau))
    aff = rn @ Fn.T
    psi = (Mx - Mr.min()) / (Mr.max() - Mr.min()) * (aff.max() - aff.min()) + aff.min()
    for i in range(len(fn)):
        for k in range(Wn.shape[1]):
            base[i, k] += gamma * sum(-psi[i, j] for j in range(len(Fn)) if int(y_sup[j]) == k)
    return base


def test_tip_adapter_logits_match_loops():
    W, tr, _, te = make_task(2)
    m = create_method("tip-adapter", logit_scale=30.0, alpha=2.5, beta=4.0).fit(W, tr)
    want = naive_tip_logits(te.features, tr.features, tr.labels, W, 30.0, 2.5, 4.0)
    np.testing.assert_allclose(m.predict_logits(te.features).double().numpy(), want,
                               rtol=1e-5, atol=1e-4)


def test_tipx_logits_match_loops():
    """ψ ranged on val when one is given, else on the support itself — never on the batch."""
    W, tr, va, te = make_task(3)
    for val, range_f in ((None, tr.features), (va, va.features)):
        m = create_method("tip-x", logit_scale=50.0, alpha=1.5, beta=3.0, gamma=2.0).fit(
            W, tr, val)
        want = naive_tipx_logits(te.features, tr.features, tr.labels, W, 50.0, 1.5, 3.0, 2.0,
                                 0.5, range_f)
        np.testing.assert_allclose(m.predict_logits(te.features).double().numpy(), want,
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["tip-x", "sus-x"])
def test_one_image_alone_gets_the_logits_it_gets_inside_a_batch(name):
    """ψ's range is learned state: a prediction does not depend on its batch-mates (float32
    logits: equal up to the rounding of batched products, far below the shift per-batch
    ranging caused)."""
    W, tr, va, te = make_task(11, n_train=6)
    m = _fit(_make(name), W, tr, va)
    assert isinstance(m.psi_, tuple) and len(m.psi_) == 2
    batch = m.predict_logits(te.features)
    for i in (0, 7, len(te) - 1):
        alone = m.predict_logits(te.features[i:i + 1])
        np.testing.assert_allclose(alone.numpy(), batch[i:i + 1].numpy(), rtol=0, atol=1e-4)
    # and the same image among other batch-mates (a different min/max of the batch)
    other = torch.cat([te.features[:1], -te.features[1:5]])
    np.testing.assert_allclose(m.predict_logits(other)[0].numpy(), batch[0].numpy(),
                               rtol=0, atol=1e-4)


def test_searched_tipx_ranges_psi_on_its_search_split():
    W, tr, va, te = make_task(12, n_val=40)
    m = create_method("tip-x", logit_scale=20.0, alpha_grid=A_G, beta_grid=B_G,
                      gamma_grid=G_G).fit(W, tr, va)
    want = naive_tipx_logits(te.features, tr.features, tr.labels, W, 20.0, m.alpha_, m.beta_,
                             m.gamma_, 0.5, va.features)
    np.testing.assert_allclose(m.predict_logits(te.features).double().numpy(), want,
                               rtol=1e-5, atol=1e-4)
    assert m.chosen_["psi_range"] == "val"


# ------------------------------------------------------------------ search

A_G, B_G, G_G = (0.1, 8.0, 6), (0.5, 12.0, 7), (0.1, 6.0, 5)


def loop_search(W, tr, va, scale, alphas, betas, gammas, tipx: bool):
    """The references' loop nests, with a strict > (first best wins)."""
    f, Fk, L = va.features, tr.features, S.one_hot(tr.labels, K, torch.float64)
    Z = scale * f @ W
    T = S.kl_term(f, Fk, W, L) if tipx else None
    best, pick = -1, None
    if tipx:
        nest = [(a, b, g) for a in alphas for b in betas for g in gammas]
    else:
        nest = [(a, b, 0.0) for b in betas for a in alphas]
    for a, b, g in nest:
        logits = Z + a * torch.exp(-b * (1 - f @ Fk.T)) @ L + (g * T if tipx else 0)
        acc = int((logits.argmax(1) == va.labels).sum())
        if acc > best:
            best, pick = acc, (float(a), float(b), float(g))
    return pick, best


def _search_equals_loop(W, tr, va):
    """The vectorised TIP-X search picks what the reference loop picks, with the same count."""
    f, L = va.features, S.one_hot(tr.labels, K, torch.float64)
    res = S.search_grid(20 * f @ W, f, tr.features, L, va.labels, A_G, B_G, G_G,
                        T=S.kl_term(f, tr.features, W, L), order="abg")
    pick, best = loop_search(W, tr, va, 20.0, S.grid(A_G, torch.float64),
                             S.grid(B_G, torch.float64), S.grid(G_G, torch.float64), True)
    assert (res.alpha, res.beta, res.gamma) == pytest.approx(pick)
    assert res.acc * len(va) == best
    return res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_tipx_search_equals_loop_search(seed):
    W, tr, va, _ = make_task(seed, n_val=60)
    res = _search_equals_loop(W, tr, va)
    f, L = va.features, S.one_hot(tr.labels, K, torch.float64)
    # every grid point, not just the winner
    for ia, a in enumerate(res.alphas[:3]):
        for ib, b in enumerate(res.betas[:3]):
            for ig, g in enumerate(res.gammas):
                logits = (20 * f @ W + a * torch.exp(-b * (1 - f @ tr.features.T)) @ L
                          + g * S.kl_term(f, tr.features, W, L))
                assert int(res.correct[ia, ib, ig]) == int((logits.argmax(1) == va.labels).sum())


@pytest.mark.parametrize("max_bytes", [64, 4096, 10**9])
def test_vectorised_tip_search_equals_loop_search_any_memory_bound(max_bytes):
    W, tr, va, _ = make_task(4, n_val=60)
    f, L = va.features, S.one_hot(tr.labels, K, torch.float64)
    res = S.search_grid(20 * f @ W, f, tr.features, L, va.labels, A_G, B_G,
                        max_bytes=max_bytes, order="bag")
    pick, best = loop_search(W, tr, va, 20.0, S.grid(A_G, torch.float64),
                             S.grid(B_G, torch.float64), [0.0], False)
    assert (res.alpha, res.beta) == pytest.approx(pick[:2]) and res.acc * len(va) == best


def test_reference_grids():
    a, b, g = (S.grid(x, torch.float64) for x in (S.TIPX_ALPHA, S.TIPX_BETA, S.TIPX_GAMMA))
    assert (len(a), len(b), len(g)) == (20, 200, 50)
    assert a[0] == pytest.approx(0.1) and a[-1] == pytest.approx(47.505)
    assert b[0] == pytest.approx(1.0) and b[-1] == pytest.approx(49.755)
    assert g[0] == pytest.approx(0.1) and g[-1] == pytest.approx(29.402)
    with pytest.raises(ValueError, match="lo, hi, n"):
        S.grid((1, 2))


def test_method_search_records_choice_and_uses_it():
    W, tr, va, te = make_task(5, n_val=40)
    m = create_method("tip-x", logit_scale=20.0, alpha_grid=A_G, beta_grid=B_G,
                      gamma_grid=G_G).fit(W, tr, va)
    pick, best = loop_search(W, tr, va, 20.0, S.grid(A_G, torch.float64),
                             S.grid(B_G, torch.float64), S.grid(G_G, torch.float64), True)
    assert (m.alpha_, m.beta_, m.gamma_) == pytest.approx(pick)
    assert m.chosen_["val_acc"] == pytest.approx(best / len(va))
    fixed = create_method("tip-x", logit_scale=20.0, alpha=m.alpha_, beta=m.beta_,
                          gamma=m.gamma_).fit(W, tr, va)             # ψ ranged on val too
    assert torch.allclose(fixed.predict_logits(te.features), m.predict_logits(te.features))
    # a fixed axis is not searched
    m2 = create_method("tip-adapter", logit_scale=20.0, beta=3.0, alpha_grid=A_G).fit(W, tr, va)
    assert m2.beta_ == 3.0 and m2.chosen_["grid"] == [6, 1]


# ------------------------------------------------------------------ contract, order, errors

ALL = ["tip-adapter", "tip-adapter-f", "tip-x", "sus-x"]
SMALL = dict(alpha_grid=(0.1, 8.0, 4), beta_grid=(0.5, 12.0, 5))


def _make(name: str, **kw):
    extra = dict(SMALL)
    if name in ("tip-x", "sus-x"):
        extra["gamma_grid"] = (0.1, 6.0, 4)
    if name == "tip-adapter-f":
        extra["epochs"] = kw.pop("epochs", 3)
    return create_method(name, logit_scale=20.0, **extra, **kw)


def _fit(m, W, tr, va):
    return m.fit(W, tr, None) if m.needs_support else m.fit(W, tr, va)


@pytest.mark.parametrize("name", ALL)
def test_sklearn_contract(name):
    W, tr, va, te = make_task(6, n_train=6)
    m = _make(name)
    params = m.get_params()
    assert m.set_params(**params) is m and m.get_params() == params
    before = set(vars(m))
    assert _fit(m, W, tr, va) is m
    learned = set(vars(m)) - before
    assert learned and all(a.endswith("_") for a in learned)
    assert m.get_params() == params                      # hyperparameters untouched by fit
    assert m.predict_logits(te.features).shape == (len(te), K)
    with pytest.raises(ValueError, match="no hyperparameter"):
        m.set_params(nope=1)


@pytest.mark.parametrize("name", ALL)
def test_class_order_does_not_change_predicted_names(name):
    W, tr, va, te = make_task(7, n_train=6)
    names = [f"c{k}" for k in range(K)]
    perm = torch.tensor([3, 0, 4, 1, 2])                 # new class j = old class perm[j]
    inv = torch.argsort(perm)

    def relabel(fs: FeatureSet) -> FeatureSet:
        return FeatureSet(fs.features, inv[fs.labels], None, [names[p] for p in perm])
    a = _fit(_make(name), W, tr, va).predict_logits(te.features).argmax(1)
    b = _fit(_make(name), W[:, perm], relabel(tr), relabel(va)).predict_logits(te.features)
    assert [names[i] for i in a] == [names[perm[i]] for i in b.argmax(1)]


def test_tip_f_deterministic_and_epoch_chosen_on_val():
    W, tr, va, te = make_task(8, n_train=6)
    views = torch.stack([_unit(tr.features + 0.05 * torch.randn_like(tr.features))
                         for _ in range(3)]).float()
    trv = FeatureSet(tr.features, tr.labels, views, tr.classnames)
    runs = [_make("tip-adapter-f", epochs=6, seed=s).fit(W, trv, va) for s in (1, 1, 2)]
    assert torch.equal(runs[0].keys_, runs[1].keys_)
    assert torch.equal(runs[0].predict_logits(te.features), runs[1].predict_logits(te.features))
    assert not torch.equal(runs[0].keys_, runs[2].keys_)   # the seed drives the batch order
    c = runs[0].chosen_
    assert c["epoch"] == 1 + int(np.argmax(c["val_acc_per_epoch"]))
    assert not torch.equal(runs[0].keys_, tr.features.float())   # keys were trained


def test_missing_val_is_a_clear_error_unless_fixed():
    W, tr, va, te = make_task(9)
    for name in ("tip-adapter", "tip-adapter-f", "tip-x"):
        with pytest.raises(AnyclassError, match=f"{name}: no val images"):
            _make(name).fit(W, tr, None)
        with pytest.raises(AnyclassError, match="no val images"):
            _make(name).fit(W, tr, FeatureSet(tr.features[:0], tr.labels[:0]))
    create_method("tip-adapter", alpha=1.0, beta=5.5).fit(W, tr, None)   # fixed: fine


def test_support_missing_class_is_named():
    W, tr, va, _ = make_task(10)
    keep = tr.labels != 2
    short = FeatureSet(tr.features[keep], tr.labels[keep], None, tr.classnames)
    for name in ALL:
        with pytest.raises(AnyclassError, match="class 'c2'"):
            _fit(_make(name), W, short, va)


def test_sus_x_never_takes_labelled_val_and_holds_out_support():
    W, tr, va, te = make_task(11, n_train=8)
    with pytest.raises(AnyclassError, match="no labelled val"):
        _make("sus-x").fit(W, tr, va)
    cache, held = holdout_split(tr, K, 0.25, seed=1)
    assert len(cache) + len(held) == len(tr)
    assert torch.bincount(held.labels, minlength=K).tolist() == [2] * K
    rows = {tuple(r) for r in cache.features.tolist()}
    assert not rows & {tuple(r) for r in held.features.tolist()}
    m = _make("sus-x").fit(W, tr)
    assert m.chosen_["held_out"] == 2 * K and m.chosen_["cache"] == 6 * K
    assert len(m.keys_) == 6 * K
    # a class with one support image: kept in the cache, named in a warning
    one = torch.cat([torch.nonzero(tr.labels != 0).flatten(), torch.tensor([0])])
    lonely = FeatureSet(tr.features[one], tr.labels[one], None, tr.classnames)
    with pytest.warns(UserWarning, match="class 'c0'"):
        _make("sus-x").fit(W, lonely)


def test_registered():
    for name in ALL:
        assert name in METHODS
    assert METHODS.get("sus-x").needs_support and not METHODS.get("tip-x").needs_support


def test_search_with_unequal_class_counts_in_support():
    """Support with 1..4 images per class (the matmul path, not the reshape-sum one)."""
    W, tr, va, _ = make_task(12, n_val=50)
    keep = torch.tensor([i for i in range(len(tr)) if i % 4 < 1 + int(tr.labels[i]) % 4])
    tr = FeatureSet(tr.features[keep], tr.labels[keep], None, tr.classnames)
    assert len(set(torch.bincount(tr.labels).tolist())) > 1
    _search_equals_loop(W, tr, va)
