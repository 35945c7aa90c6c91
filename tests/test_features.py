"""Feature extraction and its cache, with a tiny toy backbone (no dependency on real
backbones): cache hits, resume after interruption, checksum repair, concurrency."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from anyclass.data.base import LabeledImages
from anyclass.features.cache import CacheRebuildWarning
from anyclass.features.extract import Features, extract_features
from toys import ToyBackbone


def make_images(root, n: int, classes: int = 2, seed: int = 0) -> LabeledImages:
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for i in range(n):
        c = i % classes
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
        labels.append(c)
    return LabeledImages("toy", paths, labels, [f"class {c}" for c in range(classes)],
                         meta={"root": str(root)})


def direct(bb: ToyBackbone, paths) -> np.ndarray:
    x = torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return bb.encode_images(x).numpy()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("ANYCLASS_HOME", str(h))
    return h


def test_extract_matches_direct_forward_and_is_normalised(tmp_path, home):
    ds = make_images(tmp_path / "img", 10)
    bb = ToyBackbone()
    f = extract_features(bb, ds, batch_size=4, num_workers=0, progress=False)
    assert isinstance(f, Features) and f.features.shape == (10, 16)
    assert f.features.dtype == np.float32 and f.valid.all()
    np.testing.assert_allclose(np.linalg.norm(f.features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(f.features, direct(ToyBackbone(), ds.paths), atol=1e-5)
    assert f.labels.tolist() == ds.labels and f.paths == ds.paths
    assert (home / "features" / f.key / "features.npy").exists()


def test_cache_hit_identical_without_forward(tmp_path, home):
    ds = make_images(tmp_path / "img", 12)
    f1 = extract_features(ToyBackbone(), ds, batch_size=4, num_workers=2, progress=False)
    bb = ToyBackbone()
    f2 = extract_features(bb, ds, batch_size=5, num_workers=0, progress=False)
    assert bb.calls == 0 and f2.key == f1.key
    assert np.array_equal(np.asarray(f1.features), np.asarray(f2.features))
    nocache = extract_features(ToyBackbone(), ds, batch_size=3, cache=False, progress=False)
    np.testing.assert_allclose(nocache.features, f1.features, atol=1e-6)


def test_key_tracks_files_model_and_augmentation(tmp_path, home):
    ds = make_images(tmp_path / "img", 6)
    k0 = extract_features(ToyBackbone(), ds, num_workers=0, progress=False).key
    os.utime(ds.paths[0], ns=(1, 1))  # same content, new mtime -> new entry
    bb = ToyBackbone()
    assert extract_features(bb, ds, num_workers=0, progress=False).key != k0
    assert bb.calls == 1
    other = ToyBackbone()
    other.weights_hash = "fedcba9876543210"
    assert extract_features(other, ds, num_workers=0, progress=False).key != k0


def test_flip_crop_augmentation_is_seeded_per_pass(tmp_path, home):
    ds = make_images(tmp_path / "img", 6)
    plain = extract_features(ToyBackbone(), ds, num_workers=0, progress=False)
    a0 = extract_features(ToyBackbone(), ds, augment="flip_crop", aug_pass=0,
                          num_workers=0, progress=False)
    a0b = extract_features(ToyBackbone(), ds, augment="flip_crop", aug_pass=0,
                           num_workers=2, cache=False, progress=False)
    a1 = extract_features(ToyBackbone(), ds, augment="flip_crop", aug_pass=1,
                          num_workers=0, progress=False)
    assert len({plain.key, a0.key, a1.key}) == 3
    np.testing.assert_allclose(a0.features, a0b.features, atol=1e-6)  # workers don't matter
    assert not np.allclose(a0.features, a1.features)
    assert not np.allclose(a0.features, plain.features)


def test_interrupted_run_resumes_from_finished_chunks(tmp_path, home):
    ds = make_images(tmp_path / "img", 20)
    full = extract_features(ToyBackbone(), ds, batch_size=4, chunk_size=4, num_workers=0,
                            cache=False, progress=False)
    with pytest.raises(KeyboardInterrupt):
        extract_features(ToyBackbone(fail_after=3), ds, batch_size=4, chunk_size=4,
                         num_workers=0, progress=False)
    bb = ToyBackbone()
    f = extract_features(bb, ds, batch_size=4, chunk_size=4, num_workers=0, progress=False)
    assert bb.calls == 2  # 5 chunks of 4, 3 were finished before the interruption
    np.testing.assert_allclose(f.features, full.features, atol=1e-6)


def test_corrupted_chunk_detected_and_only_it_recomputed(tmp_path, home):
    ds = make_images(tmp_path / "img", 16)
    f1 = extract_features(ToyBackbone(), ds, batch_size=4, chunk_size=4, num_workers=0,
                          progress=False)
    ref = np.array(f1.features)
    path = home / "features" / f1.key / "features.npy"
    del f1
    with open(path, "r+b") as fh:  # flip bytes inside chunk 2 (rows 8..11)
        hdr = os.path.getsize(path) - 16 * 16 * 4
        fh.seek(hdr + 9 * 16 * 4 + 8)
        fh.write(b"\xff\xff\xff\x7f")
    bb = ToyBackbone()
    with pytest.warns(CacheRebuildWarning, match="1 chunk"):
        f2 = extract_features(bb, ds, batch_size=4, chunk_size=4, num_workers=0,
                              progress=False)
    assert bb.calls == 1
    assert np.array_equal(np.asarray(f2.features), ref)


def test_subset_and_valid_only(tmp_path, home):
    ds = make_images(tmp_path / "img", 6)
    f = extract_features(ToyBackbone(), ds, num_workers=0, progress=False)
    s = f.subset([4, 1])
    assert s.paths == [ds.paths[4], ds.paths[1]] and s.labels.tolist() == [0, 1]
    np.testing.assert_array_equal(s.features, np.asarray(f.features)[[4, 1]])
    assert len(f.valid_only()) == 6


def test_empty_dataset(home):
    f = extract_features(ToyBackbone(), LabeledImages("e", [], [], ["a", "b"]),
                         progress=False)
    assert f.features.shape == (0, 16)


def _extract_in_child(root: str, home: str, q) -> None:
    os.environ["ANYCLASS_HOME"] = home
    torch.set_num_threads(1)
    ds = make_images_listing(root)
    bb = ToyBackbone(sleep=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = extract_features(bb, ds, batch_size=4, chunk_size=4, num_workers=0,
                             progress=False)
    q.put((bb.calls, np.asarray(f.features).copy()))


def make_images_listing(root: str) -> LabeledImages:
    paths = sorted(os.path.join(dp, fn) for dp, _, fns in os.walk(root) for fn in fns)
    return LabeledImages("toy", paths, [0] * len(paths), ["a", "b"])


def test_concurrent_runs_share_one_entry(tmp_path, home):
    make_images(tmp_path / "img", 24)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_extract_in_child, args=(str(tmp_path / "img"), str(home), q))
             for _ in range(2)]
    for p in procs:
        p.start()
    res = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    calls = sorted(r[0] for r in res)
    assert calls == [0, 6]  # one computed all 6 batches, the other waited and hit the cache
    assert np.array_equal(res[0][1], res[1][1])
    ds = make_images_listing(str(tmp_path / "img"))
    np.testing.assert_allclose(res[0][1], direct(ToyBackbone(), ds.paths), atol=1e-5)
    key_dirs = list((home / "features").iterdir())
    assert len(key_dirs) == 1
    assert not [p for p in key_dirs[0].rglob("*.tmp")]
