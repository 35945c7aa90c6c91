"""Issue 2, "Bad input": each case gets a test. Unreadable files are skipped with a warning
naming them and a count; bad class lists and oversized images are refused with a clear
message; unusual image modes are converted (pixels checked against hand-computed values)
and classified; a truncated cache file is rebuilt."""
from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from anyclass.data.base import LabeledImages
from anyclass.data.classnames import parse_classes, read_classes_file
from anyclass.data.images import BadImageError, BadImageWarning, load_image
from anyclass.data.sources import load_dataset
from anyclass.errors import ClassNamesError, ImageTooLargeError
from anyclass.features.cache import CacheRebuildWarning
from anyclass.features.extract import extract_features
from toys import ToyBackbone


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYCLASS_HOME", str(tmp_path / "home"))


def _messages(rec) -> list[str]:
    return [str(w.message) for w in rec if issubclass(w.category, BadImageWarning)]


# ---------------------------------------------------------------- unreadable files

def _folder_with_bad_files(tmp_path):
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                root / c / f"{i}.jpg", quality=95)
    good = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "corrupt.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "readme.txt").write_text("not an image\n")
    return root


def test_bad_files_in_folder_skipped_with_warning_and_count(tmp_path):
    ds = load_dataset(f"folder:{_folder_with_bad_files(tmp_path)}")
    assert len(ds) == 9
    with pytest.warns(BadImageWarning) as rec:
        f = extract_features(ToyBackbone(), ds, batch_size=4, num_workers=0, progress=False)
    msgs = _messages(rec)
    for name, why in [("corrupt.jpg", "corrupt image"), ("empty.png", "empty file"),
                      ("readme.txt", "not an image")]:
        assert any(name in m and why in m for m in msgs), (name, msgs)
    assert msgs[-1] == "skipped 3 unreadable images of 9 (see warnings)"
    assert f.valid.sum() == 6 and len(f.skipped) == 3  # the run went on
    bad = {p.rsplit("/", 1)[1] for p, _ in f.skipped}
    assert bad == {"corrupt.jpg", "empty.png", "readme.txt"}
    assert not np.asarray(f.features)[~f.valid].any()
    # a cache hit repeats the warnings: the user still learns which files were skipped
    bb = ToyBackbone()
    with pytest.warns(BadImageWarning) as rec:
        extract_features(bb, ds, num_workers=0, progress=False)
    assert _messages(rec)[-1] == msgs[-1] and len(_messages(rec)) == 4
    assert bb.calls == 0


def test_bad_files_skipped_in_dataloader_workers(tmp_path):
    """Warnings raised in worker processes would be lost: the reason travels back."""
    ds = load_dataset(f"folder:{_folder_with_bad_files(tmp_path)}")
    with pytest.warns(BadImageWarning) as rec:
        f = extract_features(ToyBackbone(), ds, batch_size=2, num_workers=2, progress=False)
    assert sum("empty.png" in m for m in _messages(rec)) == 1
    assert f.valid.sum() == 6


def test_load_image_reasons(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    (tmp_path / "t.jpg").write_bytes(b"hello, not a jpeg")
    with pytest.raises(BadImageError, match=r"z\.png: empty file \(0 bytes\)"):
        load_image(tmp_path / "z.png")
    with pytest.raises(BadImageError, match=r"t\.jpg: not an image"):
        load_image(tmp_path / "t.jpg")
    with pytest.raises(BadImageError, match="cannot read"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(BadImageError, match="not a regular file"):
        load_image(tmp_path)


# ---------------------------------------------------------------- class names

@pytest.mark.parametrize("given, message", [
    ("", "empty class list"),
    ([], "empty class list"),
    (" , ,\n", "empty class list"),
    ("cat", "need at least two classes"),
    (["dog"], "need at least two classes"),
    ("cat, dog, Cat", "duplicate class names: 'cat' at positions 1, 3"),
    ("dog\nhot dog\ndog\n", "duplicate class names: 'dog' at positions 1, 3"),
])
def test_bad_class_lists(given, message):
    with pytest.raises(ClassNamesError) as e:
        parse_classes(given)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_non_utf8_class_file(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_bytes("chat\ncaf".encode() + b"\xe9\nchien\n")  # latin-1 'é'
    with pytest.raises(ClassNamesError) as e:
        read_classes_file(p)
    assert str(p) in str(e.value) and "offset 8" in str(e.value) and "0xe9" in str(e.value)


def test_class_file_duplicates_name_file(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("a\nb\na\n", encoding="utf-8")
    with pytest.raises(ClassNamesError, match=r"c\.txt: duplicate class names: 'a'"):
        read_classes_file(p)


# ---------------------------------------------------------------- too large

def _png_header_only(path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels; the pixel data is junk, so a loader that
    decoded before checking the size would fail differently."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"junk")
                     + chunk(b"IEND", b""))


def test_image_above_pixel_limit_refused_from_header(tmp_path):
    p = tmp_path / "huge.png"
    _png_header_only(p, 9000, 8000)  # 72 MP > default 64 MP, below Pillow's own guard
    with pytest.raises(ImageTooLargeError, match=r"huge\.png: 9000x8000 = 72,000,000 "
                                                 r"pixels exceeds the limit of 64,000,000"):
        load_image(p)


def test_decompression_bomb_refused(tmp_path):
    p = tmp_path / "bomb.png"
    _png_header_only(p, 100_000, 100_000)
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png"):
        load_image(p)


def test_configurable_limit_and_skip_in_run(tmp_path, monkeypatch):
    p = tmp_path / "a.png"
    Image.new("RGB", (20, 10), "red").save(p)
    with pytest.raises(ImageTooLargeError, match="200 pixels exceeds the limit of 199"):
        load_image(p, max_pixels=199)
    assert load_image(p, max_pixels=200).size == (20, 10)
    monkeypatch.setenv("ANYCLASS_MAX_PIXELS", "100")
    with pytest.raises(ImageTooLargeError):
        load_image(p)
    ds = LabeledImages("one", [str(p)], [0], ["a", "b"])
    with pytest.warns(BadImageWarning) as rec:
        f = extract_features(ToyBackbone(), ds, num_workers=0, progress=False)
    assert "a.png: 20x10 = 200 pixels exceeds the limit of 100" in _messages(rec)[0]
    assert not f.valid[0]


# ---------------------------------------------------------------- unusual modes

def _features_of(paths):
    ds = LabeledImages("m", [str(p) for p in paths], [0] * len(paths), ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadImageWarning)  # nothing may be skipped
        f = extract_features(ToyBackbone(), ds, num_workers=0, progress=False, cache=False)
    assert f.valid.all()
    return np.asarray(f.features)


def _check_converted(tmp_path, src, expected: np.ndarray, atol: int = 0):
    img = load_image(src)
    assert img.mode == "RGB"
    got = np.asarray(img).astype(int)
    assert np.abs(got - expected).max() <= atol, (got[0, :3], expected[0, :3])
    ref = tmp_path / "expected.png"
    Image.fromarray(expected.astype(np.uint8), "RGB").save(ref)
    fa, fb = _features_of([src, ref])  # classified exactly like the equivalent RGB image
    if atol == 0:
        np.testing.assert_allclose(fa, fb, atol=1e-6)


def test_cmyk_converted(tmp_path):
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[..., 0] = np.arange(8)[:, None] * 30
    cmyk[..., 1] = 50
    cmyk[..., 2] = np.arange(8)[None, :] * 30
    cmyk[..., 3] = 100
    src = tmp_path / "cmyk.tif"
    Image.fromarray(cmyk, "CMYK").save(src)
    k = cmyk[..., 3:4].astype(float)
    expected = np.rint((255 - cmyk[..., :3]) * (255 - k) / 255.0)  # standard CMYK->RGB
    _check_converted(tmp_path, src, expected, atol=1)
    jpg = tmp_path / "cmyk.jpg"  # Adobe CMYK JPEG (inverted on disk): decoder handles it
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(jpg, quality=100)
    assert np.abs(np.asarray(load_image(jpg)).astype(int) - [255, 0, 0]).max() <= 3


def test_16bit_greyscale_scaled_not_clipped(tmp_path):
    v = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0..65520
    src = tmp_path / "g16.png"
    Image.fromarray(v).save(src)
    assert Image.open(src).mode.startswith("I")
    g = np.rint(v / 257.0)
    _check_converted(tmp_path, src, np.repeat(g[..., None], 3, axis=2))
    src32 = tmp_path / "g32.tif"
    Image.fromarray(v.astype(np.int32), "I").save(src32)
    assert np.array_equal(np.asarray(load_image(src32))[..., 0], g.astype(np.uint8))


def test_palette_with_transparency_composited_on_white(tmp_path):
    idx = np.zeros((8, 8), np.uint8)
    idx[:, 4:] = 1
    idx[2:4, :] = 2
    p = Image.fromarray(idx, "P")
    p.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * (253 * 3))
    src = tmp_path / "pal.png"
    p.save(src, transparency=2)  # palette entry 2 (blue) is transparent
    expected = np.zeros((8, 8, 3), int)
    expected[idx == 0] = [10, 20, 30]
    expected[idx == 1] = [200, 100, 0]
    expected[idx == 2] = [255, 255, 255]
    _check_converted(tmp_path, src, expected)


def test_rgba_and_la_alpha_composited_on_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 255
    a[..., 3] = np.arange(8)[None, :] * 36  # alpha 0..252
    src = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(src)
    al = a[..., 3:4] / 255.0
    expected = np.rint(a[..., :3] * al + 255 * (1 - al))
    _check_converted(tmp_path, src, expected, atol=1)
    la = np.stack([np.full((8, 8), 40, np.uint8), a[..., 3]], axis=-1)
    src2 = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(src2)
    exp2 = np.rint(40 * al + 255 * (1 - al)).repeat(3, axis=2)
    _check_converted(tmp_path, src2, exp2, atol=1)


# ---------------------------------------------------------------- truncated cache file

def test_truncated_cache_file_rebuilt(tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(10):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    ds = LabeledImages("t", paths, [i % 2 for i in range(10)], ["a", "b"])
    f1 = extract_features(ToyBackbone(), ds, batch_size=4, chunk_size=4, num_workers=0,
                          progress=False)
    ref = np.array(f1.features)
    fp = tmp_path / "home" / "features" / f1.key / "features.npy"
    del f1
    with open(fp, "r+b") as fh:
        fh.truncate(fp.stat().st_size - 2 * 8 * 4)  # lose the last chunk (rows 8-9)
    bb = ToyBackbone()
    with pytest.warns(CacheRebuildWarning, match="truncated"):
        f2 = extract_features(bb, ds, batch_size=4, chunk_size=4, num_workers=0,
                              progress=False)
    assert bb.calls == 1  # only the damaged chunk was recomputed
    assert np.array_equal(np.asarray(f2.features), ref)
    with open(fp, "r+b") as fh:  # a mangled header: the whole entry is rebuilt
        fh.write(b"garbage!")
    bb = ToyBackbone()
    with pytest.warns(CacheRebuildWarning, match="rebuilding"):
        f3 = extract_features(bb, ds, batch_size=4, chunk_size=4, num_workers=0,
                              progress=False)
    assert bb.calls == 3 and np.array_equal(np.asarray(f3.features), ref)
