"""run_eval with the adaptation methods: augmented cache passes, the support-set path,
bad input (empty val, short classes), class-order invariance, recorded choices."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import anyclass.support as support_pkg
from anyclass.data.sources import load_dataset
from anyclass.errors import AnyclassError
from anyclass.eval import featuresets, runner
from anyclass.eval.runner import EvalConfig, run_eval, write_json
from anyclass.features.extract import extract_features

from toys import ToyBackbone

FAST = {"alpha_grid": [0.1, 20.0, 10], "beta_grid": [0.5, 20.0, 20]}


class ToyVL(ToyBackbone):
    """ToyBackbone plus a text tower: a fixed random unit vector per string (CRC seed)."""

    def encode_texts(self, texts):
        return F.normalize(torch.stack([
            torch.randn(self.embed_dim, generator=torch.Generator().manual_seed(
                zlib.crc32(t.encode()))) for t in texts]), dim=-1)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 220),
           "yellow": (230, 220, 20)}


def _folder_dataset(root, order: list[str], per_split=None, missing_val=False):
    """<root>/{train,val,test}/<class>/<i>.png, noisy solid colours; manifest.json fixes
    the class order (so two roots can hold the same images in different class orders)."""
    per_split = per_split or {"train": 4, "val": 2, "test": 5}
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        if missing_val and split == "val":
            continue
        for c in sorted(COLOURS):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n if not callable(n) else n(c)):
                a = np.clip(np.array(COLOURS[c]) + rng.normal(0, 60, (16, 16, 3)), 0, 255)
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i}.png")
    (root / "manifest.json").write_text(json.dumps({"classnames": order, "folders": order}))
    return f"folder:{root}"


def test_class_order_of_folders_does_not_change_results(tmp_path):
    bb = ToyVL()
    a = _folder_dataset(tmp_path / "a", ["red", "green", "blue", "yellow"])
    b = _folder_dataset(tmp_path / "b", ["yellow", "blue", "red", "green"])
    for method in ("tip-adapter", "tip-x"):
        hp = dict(FAST, augment_passes=2)
        if method == "tip-x":
            hp["gamma_grid"] = [0.1, 10.0, 5]
        ra, rb = (run_eval(EvalConfig(d, method=method, shots=3, hparams=hp), backbone=bb,
                           progress=False) for d in (a, b))
        assert ra["metrics"] == pytest.approx(rb["metrics"])
        for k in ("alpha", "beta", "gamma", "val_acc"):
            assert ra["chosen"].get(k) == pytest.approx(rb["chosen"].get(k))
    assert load_dataset(b, "test").classnames[0] == "yellow"


def test_augmented_cache_is_the_renormalised_mean_of_the_passes(tmp_path):
    bb = ToyVL()
    spec = _folder_dataset(tmp_path / "d", ["red", "green", "blue", "yellow"])
    full = load_dataset(spec, "train")
    idx = [0, 5, 9, 14]
    fs = featuresets.augmented_train(bb, full, idx, 3, "flip_crop",
                                 {"batch_size": 8, "progress": False})
    sample = full.subset(idx)
    # independently: extract each image's passes from a dataset in sorted-path order
    order = sorted(range(len(full)), key=lambda i: full.paths[i])
    canon = full.subset(order)
    rows = [order.index(i) for i in idx]
    per = [np.asarray(extract_features(bb, canon, augment="flip_crop", aug_pass=p,
                                       progress=False).features)[rows] for p in range(3)]
    mean = np.mean(per, axis=0)
    want = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(fs.features.numpy(), want, rtol=1e-5, atol=1e-6)
    assert fs.views.shape == (3, 4, bb.embed_dim)
    assert fs.labels.tolist() == sample.labels
    assert not np.allclose(per[0], per[1])                       # passes differ


def test_empty_or_missing_val_is_a_clear_error(tmp_path):
    bb = ToyVL()
    spec = _folder_dataset(tmp_path / "nv", ["red", "green", "blue", "yellow"],
                           missing_val=True)
    for method in ("tip-adapter", "tip-x", "tip-adapter-f"):
        with pytest.raises(AnyclassError, match="no val images"):
            run_eval(EvalConfig(spec, method=method, shots=2, hparams={"augment_passes": 1}),
                     backbone=bb, progress=False)
    # fixed alpha, beta: no search, runs without val
    r = run_eval(EvalConfig(spec, method="tip-adapter", shots=2,
                            hparams={"alpha": 1.0, "beta": 5.5, "augment_passes": 1}),
                 backbone=bb, progress=False)
    assert r["chosen"] == {"alpha": 1.0, "beta": 5.5, "searched": False}
    assert r["val_images"] == 0


def test_more_shots_than_a_class_has_warns_naming_it(tmp_path):
    bb = ToyVL()
    spec = _folder_dataset(tmp_path / "s", ["red", "green", "blue", "yellow"],
                           per_split={"train": lambda c: 1 if c == "blue" else 4,
                                      "val": 2, "test": 3})
    with pytest.warns(UserWarning, match="class 'blue' has only 1 image"):
        r = run_eval(EvalConfig(spec, method="tip-adapter", shots=3,
                                hparams=dict(FAST, augment_passes=1)),
                     backbone=bb, progress=False)
    assert r["train_images"] == 3 * 3 + 1


def test_sus_x_uses_support_only(tmp_path, monkeypatch):
    """The runner's support path with a hand-made support set (B's builder stubbed): no
    train or val split of the task is read, and the support info lands in the result."""
    bb = ToyVL()
    task = _folder_dataset(tmp_path / "task", ["red", "green", "blue", "yellow"])
    sup = _folder_dataset(tmp_path / "sup", ["red", "green", "blue", "yellow"],
                          per_split={"test": 8})
    calls = {}

    def fake_build(backbone, classnames, *, pool, **kw):
        calls.update(kw, pool=pool, classnames=list(classnames))
        ds = load_dataset(sup, "test")
        return support_pkg.SupportSet(tmp_path / "sup", ds, {c: 8 for c in ds.classnames}, {})
    monkeypatch.setattr(support_pkg, "build_support", fake_build)
    monkeypatch.setattr(support_pkg, "default_pool", lambda spec: "folder:/somewhere")
    seen = []
    real = runner.load_dataset
    monkeypatch.setattr(runner, "load_dataset", lambda s, split="test": seen.append(split)
                        or real(s, split))
    r = run_eval(EvalConfig(task, method="sus-x", seed=2,
                            hparams=dict(FAST, gamma_grid=[0.1, 10.0, 5])),
                 backbone=bb, progress=False)
    assert seen == ["test"]
    assert calls["classnames"] == ["red", "green", "blue", "yellow"]
    assert calls["pool"] == "folder:/somewhere" and calls["seed"] == 2
    assert r["support"]["images"] == 32 and r["val_images"] == 0
    assert r["chosen"]["held_out"] == 8 and r["chosen"]["cache"] == 24
    assert r["hparams"]["seed"] == 2


def test_sus_x_without_pool_is_a_clear_error(tmp_path):
    spec = _folder_dataset(tmp_path / "np", ["red", "green", "blue", "yellow"])
    with pytest.raises(AnyclassError, match="needs an image pool"):
        run_eval(EvalConfig(spec, method="sus-x"), backbone=ToyVL(), progress=False)


@pytest.mark.parametrize("method", ["tip-adapter", "tip-adapter-f", "tip-x"])
def test_mini_world_end_to_end(mini_world, method, tmp_path):
    hp = {"augment_passes": 2}
    if method == "tip-adapter-f":
        hp["epochs"] = 5
    r = run_eval(EvalConfig("world:objects", method=method, shots=2, seed=1, hparams=hp),
                 progress=False)
    zs = run_eval(EvalConfig("world:objects"), progress=False)
    assert 0 <= r["metrics"]["acc1"] <= 1
    assert r["train_images"] == 2 * r["num_classes"] and r["val_images"] > 0
    c = r["chosen"]
    assert c["searched"] and {"alpha", "beta", "val_acc"} <= set(c)
    if method == "tip-x":
        assert "gamma" in c and c["grid"] == [20, 200, 50]
    if method == "tip-adapter-f":
        assert 1 <= c["epoch"] <= 5
    assert r["metrics"]["acc1"] >= zs["metrics"]["acc1"] - 0.1   # adapts, doesn't collapse
    json.loads(write_json(r, tmp_path / "r.json").read_text())
