"""SuS support sets by retrieval: search, de-duplication, pools, caching, manifest order."""
from __future__ import annotations

import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from anyclass.data.images import BadImageWarning
from anyclass.data.sources import load_dataset
from anyclass.errors import AnyclassError, SpecError
from anyclass.support import SupportWarning, build_support, default_pool, load_pool
from anyclass.support.index import PoolIndex, exact_topk
from anyclass.support.pools import Pool
from anyclass.support.retrieve import greedy_assign, retrieve_dedup
from toys import ToyBackbone

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "black": (10, 10, 10)}


class ColourVLM(ToyBackbone):
    """ToyBackbone plus a text tower: a text naming a colour embeds like a plain square of
    that colour, so the right retrievals are known without any model."""

    identity = "toy:colour-vlm"

    def encode_texts(self, texts):
        imgs = []
        for t in texts:
            name = next(c for c in COLOURS if c in t.lower())
            imgs.append(self.preprocess(Image.new("RGB", (8, 8), COLOURS[name])))
        with torch.no_grad():
            f = torch.tanh(torch.stack(imgs).flatten(1) @ self.W + self.b)
        return f / f.norm(dim=-1, keepdim=True)


def _pool_dir(root, per_colour=6, colours=("red", "green", "blue"), seed=0):
    """Noisy squares of each colour under unlabelled names; returns {path: colour}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    i = 0
    for c in colours:
        for _ in range(per_colour):
            a = np.clip(np.array(COLOURS[c]) + rng.normal(0, 25, (16, 16, 3)), 0, 255)
            p = root / f"img{i:04d}.png"
            Image.fromarray(a.astype(np.uint8)).save(p)
            truth[str(p)] = c
            i += 1
    return truth


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("ANYCLASS_HOME", str(h))
    return h


# ------------------------------------------------------------------------- search

def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_topk_matches_numpy_brute_force():
    rng = np.random.default_rng(1)
    feats, q = _unit(rng, 1000, 16), _unit(rng, 7, 16)
    valid = rng.random(1000) > 0.1
    s, i = exact_topk(q, feats, valid, 25, chunk=128)       # 8 chunks, running merge
    full = q @ feats.T
    full[:, ~valid] = -np.inf
    ref = np.argsort(-full, axis=1, kind="stable")[:, :25]
    assert np.array_equal(i, ref)
    np.testing.assert_allclose(s, np.take_along_axis(full, ref, 1), rtol=1e-5, atol=1e-6)
    assert valid[i].all()


def test_faiss_flat_and_ivf_give_the_exact_top_k(home):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    feats, q = _unit(rng, 4000, 32), _unit(rng, 9, 32)
    valid = np.ones(4000, bool)
    valid[::97] = False
    pool = Pool("test", [f"x{i}" for i in range(4000)])
    exact = PoolIndex(pool, feats, valid, "k1")
    flat = PoolIndex(pool, feats, valid, "k1", faiss_threshold=0)
    ivf = PoolIndex(pool, feats, valid, "k1", faiss_threshold=0, ivf_threshold=0,
                    nprobe=10_000)                        # every list visited: exact
    assert (exact.method_for(), flat.method_for(), ivf.method_for()) == (
        "exact", "faiss-flat", "faiss-ivf")
    s0, i0 = exact.search(q, 50)
    for idx in (flat, ivf):
        s1, i1 = idx.search(q, 50)
        assert np.array_equal(i0, i1)
        np.testing.assert_allclose(s0, s1, atol=1e-5)


# ------------------------------------------------------------------------- de-duplication

def _reference_greedy(S: np.ndarray, M: int) -> list[list[int]]:
    """Global greedy over the FULL score matrix: repeatedly the best (class, image) pair
    whose image is free and whose class has room."""
    S = S.astype(np.float64).copy()
    out = [[] for _ in range(S.shape[0])]
    while True:
        k, x = np.unravel_index(np.argmax(S), S.shape)
        if not np.isfinite(S[k, x]):
            return out
        out[k].append(int(x))
        S[:, x] = -np.inf
        if len(out[k]) == M:
            S[k, :] = -np.inf


def test_dedup_equals_global_greedy_and_no_image_twice():
    rng = np.random.default_rng(3)
    feats = _unit(rng, 300, 8)
    q = _unit(rng, 2, 8)
    q = np.concatenate([q, q + 0.05 * _unit(rng, 2, 8), _unit(rng, 6, 8)])  # near-duplicates
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = PoolIndex(Pool("t", [str(i) for i in range(300)]), feats, np.ones(300, bool), "k")
    rows, scores = retrieve_dedup(index, q, per_class=20, expand=1)  # forces widening
    ref = _reference_greedy(q @ feats.T, 20)
    assert [r.tolist() for r in rows] == ref
    allrows = np.concatenate(rows)
    assert len(allrows) == len(set(allrows.tolist())) == 200
    for k in range(len(q)):  # scores are the cosines, best first
        np.testing.assert_allclose(scores[k], (q[k] @ feats[rows[k]].T), atol=1e-5)
        assert np.all(np.diff(scores[k]) <= 1e-7)


def test_shared_image_goes_to_the_higher_scoring_class_and_the_other_refills():
    # image 5 is the top candidate of both classes; class 1 scores it higher
    scores = np.array([[0.9, 0.8, 0.7], [0.95, 0.6, 0.5]], np.float32)
    ids = np.array([[5, 1, 2], [5, 3, 4]])
    rows, sc = greedy_assign(scores, ids, per_class=2)
    assert rows[0].tolist() == [1, 2] and rows[1].tolist() == [5, 3]
    assert sc[0].tolist() == pytest.approx([0.8, 0.7])


# ------------------------------------------------------------------------- build

def test_build_retrieves_the_right_images_in_the_given_class_order(tmp_path, home):
    truth = _pool_dir(tmp_path / "pool")
    names = ["red", "blue", "green"]                    # not sorted
    s = build_support(ColourVLM(), names, pool=f"folder:{tmp_path / 'pool'}", per_class=5,
                      progress=False)
    assert s.counts == {"red": 5, "blue": 5, "green": 5} and not s.reused
    m = json.loads((s.root / "manifest.json").read_text())
    assert m["format"] == "anyclass-support/1" and m["classnames"] == names
    assert m["folders"] == names and m["per_class"] == 5 and m["strategy"] == "retrieval"
    assert m["pool"] == f"folder:{tmp_path / 'pool'}" and m["backbone"] == "toy:colour-vlm"
    for (rel, lab), src in zip(m["items"], m["sources"]):
        assert truth[src] == names[lab] and rel.startswith(m["folders"][lab] + "/")
        assert (s.root / rel).read_bytes() == open(src, "rb").read()
    assert s.dataset.classnames == names
    by_label = {}
    for p, y in zip(s.dataset.paths, s.dataset.labels):
        by_label.setdefault(y, set()).add(os.path.relpath(p, s.root))
    assert by_label == {k: {r for r, lab in m["items"] if lab == k} for k in range(3)}
    assert str(s.root).startswith(str(home / "support"))


def test_index_is_cached_and_identical_build_is_reused(tmp_path, home):
    _pool_dir(tmp_path / "pool")
    bb = ColourVLM()
    spec = f"folder:{tmp_path / 'pool'}"
    a = build_support(bb, ["red", "green"], pool=spec, per_class=3, progress=False)
    calls = bb.calls
    assert calls > 0
    b = build_support(bb, ["green", "blue"], pool=spec, per_class=4, progress=False)
    assert bb.calls == calls            # other task, same pool: no image re-embedded
    assert b.root != a.root and b.counts == {"green": 4, "blue": 4}
    c = build_support(bb, ["red", "green"], pool=spec, per_class=3, progress=False)
    assert c.reused and c.root == a.root and bb.calls == calls
    os.utime(tmp_path / "pool" / "img0000.png", ns=(1, 1))  # pool changed: re-embedded
    build_support(bb, ["red", "green"], pool=spec, per_class=3, progress=False)
    assert bb.calls > calls


def test_corrupt_pool_files_are_warned_by_name_and_skipped(tmp_path, home):
    truth = _pool_dir(tmp_path / "pool", per_colour=4)
    (tmp_path / "pool" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "pool" / "empty.jpg").write_bytes(b"")
    with pytest.warns(BadImageWarning) as rec:
        s = build_support(ColourVLM(), ["red", "green", "blue"],
                          pool=f"folder:{tmp_path / 'pool'}", per_class=4, progress=False)
    text = " ".join(str(w.message) for w in rec)
    assert "broken.png" in text and "empty.jpg" in text
    assert s.counts == {"red": 4, "green": 4, "blue": 4}
    assert all(src in truth for src in s.manifest["sources"])


def test_short_class_warns_and_empty_class_errors_by_name(tmp_path, home):
    _pool_dir(tmp_path / "pool", per_colour=2)          # 6 images
    spec = f"folder:{tmp_path / 'pool'}"
    with pytest.warns(SupportWarning) as rec:
        s = build_support(ColourVLM(), ["red", "green", "blue"], pool=spec, per_class=3,
                          progress=False)
    assert sum(s.counts.values()) == 6                   # every pool image used once
    msgs = sorted(str(w.message) for w in rec if issubclass(w.category, SupportWarning))
    assert len(msgs) == 3
    for c, m in zip(["blue", "green", "red"], msgs):
        assert f"class {c!r} got only 2 of 3 images" in m
    names = ["red", "green", "blue", "yellow"]           # 4 classes x 2 > 6 images
    with pytest.raises(AnyclassError, match="no usable image for class.*'yellow'"):
        build_support(ColourVLM(), names, pool=spec, per_class=2, progress=False)
    with pytest.warns(SupportWarning, match="'yellow' got no images"):
        s = build_support(ColourVLM(), names, pool=spec, per_class=2, progress=False,
                          allow_partial=True)
    assert s.counts["yellow"] == 0 and s.dataset.classnames == names
    assert len(s.dataset) == 6


def test_out_dir_holding_something_else_is_refused(tmp_path, home):
    _pool_dir(tmp_path / "pool", per_colour=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    kw = dict(pool=f"folder:{tmp_path / 'pool'}", per_class=1, progress=False)
    with pytest.raises(AnyclassError, match="holds something else"):
        build_support(ColourVLM(), ["red", "green"], out_dir=out, **kw)
    s = build_support(ColourVLM(), ["red", "green"], out_dir=out, force=True, **kw)
    assert s.root == out.resolve() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")
                and not p.name.endswith(".lock")]   # no temporary debris left


# ------------------------------------------------------------------------- pools

def test_list_and_webdataset_pools(tmp_path, home):
    truth = _pool_dir(tmp_path / "imgs", per_colour=3)
    lst = tmp_path / "pool.txt"
    lst.write_text("# my pool\n" + "\n".join(os.path.relpath(p, tmp_path) for p in truth)
                   + "\n\n")
    assert load_pool(f"list:{lst}").paths == list(truth)
    shards = tmp_path / "shards"
    shards.mkdir()
    items = list(truth)
    for sh in range(2):
        with tarfile.open(shards / f"pool-{sh:03d}.tar", "w") as tf:
            for j, p in enumerate(items[sh::2]):
                for name, data in ((f"s{sh}_{j}.png", open(p, "rb").read()),
                                   (f"s{sh}_{j}.cls", b"3"),
                                   (f"../evil{j}.png", open(p, "rb").read())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    pool = load_pool(f"wds:{shards}")
    assert len(pool) == 2 * len(items)                  # images only, .cls skipped
    assert all(p.startswith(str(home / "pools")) for p in pool.paths)
    assert not list(tmp_path.glob("evil*"))             # member names never used as paths
    assert load_pool(f"wds:{shards}/pool-*.tar").paths == pool.paths  # glob, cached unpack
    s = build_support(ColourVLM(), ["green", "red"], pool=f"wds:{shards}", per_class=3,
                      progress=False)
    assert s.counts == {"green": 3, "red": 3}
    with pytest.raises(SpecError, match="no .tar shards"):
        load_pool(f"wds:{tmp_path / 'nothing'}")
    with pytest.raises(SpecError, match="unknown pool spec"):
        load_pool("s3:bucket")


def test_default_pool():
    assert default_pool("world:animals@sketch") == "world:pool"
    assert default_pool("folder:/x") is None and default_pool("coop:dtd@/d") is None


# ------------------------------------------------------------------------- folder source

def test_folder_source_takes_the_manifest_class_order(tmp_path):
    d = tmp_path / "ds"
    for c in ("apple", "banana", "cherry"):
        (d / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4)).save(d / c / f"{i}.png")
    plain = load_dataset(f"folder:{d}")
    assert plain.classnames == ["apple", "banana", "cherry"]
    names = ["cherry", "banana", "apple"]                # reverse-sorted
    (d / "manifest.json").write_text(json.dumps({"classnames": names, "folders": names}))
    ds = load_dataset(f"folder:{d}")
    assert ds.classnames == names
    assert all(ds.classnames[y] == os.path.basename(os.path.dirname(p))
               for p, y in zip(ds.paths, ds.labels))
    assert sorted(set(ds.labels)) == [0, 1, 2]
    (d / "manifest.json").write_text(json.dumps({"classnames": ["cherry", "date"],
                                                 "folders": ["cherry", "date"]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SpecError, match="class 'date' of manifest.json has no folder"):
            load_dataset(f"folder:{d}")


def test_cupl_queries_average_the_sentences(tmp_path, home):
    from anyclass.support.retrieve import class_queries
    bb = ColourVLM()
    q = class_queries(bb, [["a red apple.", "red paint."], ["green grass."]])
    e = bb.encode_texts(["a red apple.", "red paint.", "green grass."]).numpy()
    ref = np.stack([e[0] + e[1], e[2]])
    np.testing.assert_allclose(q, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    _pool_dir(tmp_path / "pool", per_colour=3)
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({"Red": ["a red apple."], "green": ["green grass.", "x green"]}))
    s = build_support(bb, ["red", "green"], pool=f"folder:{tmp_path / 'pool'}", per_class=3,
                      prompts="cupl", descriptions=str(desc), progress=False)
    assert s.counts == {"red": 3, "green": 3} and s.manifest["prompts"] == "cupl"
    with pytest.raises(AnyclassError, match="'blue'"):
        build_support(bb, ["red", "blue"], pool=f"folder:{tmp_path / 'pool'}",
                      prompts="cupl", descriptions=str(desc), progress=False)
