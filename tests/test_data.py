"""Dataset specs, class names, CoOp split files, few-shot sampling, base/new splits."""
from __future__ import annotations

import json
import os
import random
import warnings

import pytest
from PIL import Image

from anyclass.data.base import LabeledImages
from anyclass.data.classnames import parse_classes, read_classes_file
from anyclass.data.coop import (SplitFileError, classnames_of, read_split, split_to_dataset,
                                write_split)
from anyclass.data.fewshot import base_new_split, sample_few_shot, subset_classes
from anyclass.data.sources import COOP, SOURCES, load_dataset
from anyclass.errors import ClassNamesError, SpecError


def touch(path, data: bytes = b"x") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


# ---------------------------------------------------------------- class names

def test_parse_classes_forms(tmp_path):
    assert parse_classes(" cat , dog,  hot dog ") == ["cat", "dog", "hot dog"]
    assert parse_classes("poodle, standard\ncat\n\n") == ["poodle, standard", "cat"]
    assert parse_classes(["a ", " b"]) == ["a", "b"]
    p = tmp_path / "c.txt"
    p.write_bytes("\ufeffcafé\nthé\n".encode())
    assert read_classes_file(p) == ["café", "thé"]
    with pytest.raises(ClassNamesError, match="cannot read class file"):
        read_classes_file(tmp_path / "nope.txt")


# ---------------------------------------------------------------- folder

def test_folder_source(tmp_path):
    root = tmp_path / "pics"
    touch(root / "golden_retriever" / "b.jpg")
    touch(root / "golden_retriever" / "sub" / "a.jpg")
    touch(root / "cat" / "x.png")
    touch(root / "cat" / ".DS_Store")
    touch(root / ".hidden" / "y.png")
    ds = load_dataset(f"folder:{root}")
    assert ds.classnames == ["cat", "golden retriever"]
    assert [os.path.relpath(p, root) for p in ds.paths] == [
        "cat/x.png", "golden_retriever/b.jpg", "golden_retriever/sub/a.jpg"]
    assert ds.labels == [0, 1, 1] and ds.meta["class_folders"] == ["cat", "golden_retriever"]
    with pytest.raises(SpecError, match="only split is 'test'"):
        load_dataset(f"folder:{root}", "train")
    touch(root / "loose.jpg")
    with pytest.warns(UserWarning, match="outside class folders"):
        load_dataset(f"folder:{root}")


def test_folder_with_splits_and_errors(tmp_path):
    root = tmp_path / "d"
    touch(root / "train" / "b" / "1.png")
    touch(root / "train" / "a" / "1.png")
    touch(root / "test" / "c" / "1.png")
    touch(root / "test" / "a" / "2.png")
    tr, te = load_dataset(f"folder:{root}", "train"), load_dataset(f"folder:{root}", "test")
    assert tr.classnames == te.classnames == ["a", "b", "c"]  # labels agree across splits
    assert tr.labels == [0, 1] and te.labels == [0, 2]
    with pytest.raises(SpecError, match="no 'val' sub-folder"):
        load_dataset(f"folder:{root}", "val")
    with pytest.raises(SpecError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    touch(tmp_path / "one" / "only" / "1.png")
    with pytest.raises(ClassNamesError, match="need at least two classes"):
        load_dataset(f"folder:{tmp_path / 'one'}")


# ---------------------------------------------------------------- csv

def test_csv_names_and_relative_paths(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "l.csv").write_text("path,label\nimg/1.png,dog\n/abs/2.png,cat\nimg/3.png,\n")
    ds = load_dataset(f"csv:{tmp_path / 'l.csv'}")
    assert ds.classnames == ["cat", "dog"]
    assert ds.paths == [str(tmp_path / "img/1.png"), "/abs/2.png", str(tmp_path / "img/3.png")]
    assert ds.labels == [1, 0, -1]


def test_csv_integer_labels_classname_column_and_split(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("path,label,classname,split\na.png,1,dog,train\nb.png,0,cat,test\n"
                 "c.png,1,dog,test\n")
    te = load_dataset(f"csv:{f}", "test")
    assert te.classnames == ["cat", "dog"] and te.labels == [0, 1]
    assert load_dataset(f"csv:{f}", "train").labels == [1]
    g = tmp_path / "ints.csv"
    g.write_text("path,label\na.png,0\nb.png,1\n")
    with pytest.raises(SpecError, match="integer labels need class names"):
        load_dataset(f"csv:{g}")
    (tmp_path / "ints.classes.txt").write_text("zero\none\n")
    assert load_dataset(f"csv:{g}").classnames == ["zero", "one"]
    h = tmp_path / "bad.csv"
    h.write_text("file,target\nx.png,a\ny.png,b\n")
    with pytest.raises(SpecError, match="only split is 'test'"):
        load_dataset(f"csv:{h}", "train")
    (tmp_path / "nohdr.csv").write_text("x.png,a\n")
    with pytest.raises(SpecError, match="header must name a path and a label"):
        load_dataset(f"csv:{tmp_path / 'nohdr.csv'}")


def test_spec_errors_are_one_line():
    for spec, msg in [("nowhere", "needs a scheme"), ("ftp:x", "unknown dataset spec 'ftp:x'"),
                      ("coop:caltech101", "give the data root"),
                      ("coop:mnist@/tmp", "unknown CoOp dataset 'mnist'")]:
        with pytest.raises(SpecError) as e:
            load_dataset(spec)
        assert msg in str(e.value) and "\n" not in str(e.value)
    assert {"world", "folder", "csv", "coop"} <= set(SOURCES.names())
    assert len(COOP.names()) == 15


# ---------------------------------------------------------------- CoOp split files

SPLITS = {"train": [["a/1.jpg", 0, "apple_pie"], ["b/1.jpg", 1, "Bee"]],
          "val": [["a/2.jpg", 0, "apple_pie"]],
          "test": [["b/2.jpg", 1, "Bee"], ["c/1.jpg", 2, "cat"]]}


def test_coop_split_round_trip(tmp_path):
    p = tmp_path / "split.json"
    write_split(p, SPLITS)
    back = read_split(p)
    assert {k: [list(e) for e in v] for k, v in back.items()} == SPLITS
    assert classnames_of(back) == ["apple_pie", "Bee", "cat"]
    ds = split_to_dataset(back, "test", str(tmp_path / "img"), "x")
    assert ds.classnames == ["apple pie", "Bee", "cat"] and ds.labels == [1, 2]
    assert ds.paths[0] == str(tmp_path / "img" / "b/2.jpg")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.parametrize("bad, msg", [
    ({"train": [["a.jpg", 0, "a"], ["b.jpg", 0, "b"]]}, r"train\[1\].*label 0 is 'a'"),
    ({"train": [["a.jpg", 0, "a"]], "test": [["b.jpg", 1, "a"]]},
     r"test\[0\].*class 'a' has label 0"),
    ({"train": [["a.jpg", 0, "a"], ["b.jpg", 2, "b"]]}, "no entry has label 1"),
    ({"train": [["a.jpg", "0", "a"]]}, r"train\[0\].*label must be an integer"),
    ({"train": [["a.jpg", 0]]}, r"train\[0\].*expected \[relpath, label, classname\]"),
])
def test_coop_split_validation_names_entry(tmp_path, bad, msg):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(SplitFileError, match=msg):
        read_split(p)


def test_coop_split_json_dataset(tmp_path):
    d = tmp_path / "data" / "caltech-101"
    (d / "101_ObjectCategories").mkdir(parents=True)
    write_split(d / "split_zhou_Caltech101.json", SPLITS)
    for root in (tmp_path / "data", d):  # CoOp's DATA root, or the dataset folder itself
        ds = load_dataset(f"coop:caltech-101@{root}", "train")
        assert ds.paths[0] == str(d / "101_ObjectCategories" / "a/1.jpg")
        assert ds.classnames == ["apple pie", "Bee", "cat"] and ds.meta["coop"] == "caltech101"
    with pytest.raises(SpecError, match="CoOp DATASETS.md layout"):
        load_dataset(f"coop:dtd@{tmp_path}")


def test_coop_fgvc_aircraft(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    d.mkdir()
    (d / "variants.txt").write_text("707-320\nA300B4\nF-16A/B\n")
    (d / "images_variant_test.txt").write_text("1025794 F-16A/B\n0034309 707-320\n")
    ds = load_dataset(f"coop:fgvc_aircraft@{tmp_path}")
    assert ds.classnames == ["707-320", "A300B4", "F-16A/B"] and ds.labels == [2, 0]
    assert ds.paths[0] == str(d / "images" / "1025794.jpg")


def _imagenet_names(path, wnids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} name of {w}\n" for w in wnids))


def test_coop_imagenet_and_variants(tmp_path):
    wnids = [f"n{i:08d}" for i in range(6)]
    _imagenet_names(tmp_path / "imagenet" / "classnames.txt", wnids)
    for w in wnids[::-1]:
        touch(tmp_path / "imagenet" / "images" / "train" / w / "1.JPEG")
        touch(tmp_path / "imagenet" / "images" / "val" / w / "v.JPEG")
    tr = load_dataset(f"coop:imagenet@{tmp_path}", "train")
    assert tr.labels == list(range(6)) and tr.classnames[2] == "name of n00000002"
    assert len(load_dataset(f"coop:imagenet@{tmp_path}", "val")) == 6
    # ImageNet-V2: folders are label numbers; classnames.txt from imagenet/ as fallback
    touch(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "3" / "a.jpeg")
    v2 = load_dataset(f"coop:imagenet-v2@{tmp_path}")
    assert v2.labels == [3] and len(v2.classnames) == 6
    # ImageNet-A: the class subset is what is on disk, in sorted wnid order
    _imagenet_names(tmp_path / "imagenet-adversarial" / "classnames.txt", wnids)
    for w in (wnids[4], wnids[1]):
        touch(tmp_path / "imagenet-adversarial" / "imagenet-a" / w / "0.jpg")
    touch(tmp_path / "imagenet-adversarial" / "imagenet-a" / "README.txt")
    with pytest.warns(UserWarning, match="found 2 class folders.*expected 200"):
        a = load_dataset(f"coop:imagenet_a@{tmp_path}")
    assert a.classnames == ["name of n00000001", "name of n00000004"]
    assert a.labels == [0, 1] and a.meta["imagenet_indices"] == [1, 4]
    with pytest.raises(SpecError, match="only split 'test'"):
        load_dataset(f"coop:imagenet_a@{tmp_path}", "train")


# ---------------------------------------------------------------- few-shot

def _pool(n_per=(10, 7, 2), root="/data/x", shuffle_seed=None) -> LabeledImages:
    items = [(f"{root}/c{c}/{i:03d}.jpg", c) for c, n in enumerate(n_per) for i in range(n)]
    items.append((f"{root}/unlabelled.jpg", -1))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    return LabeledImages("pool", [p for p, _ in items], [y for _, y in items],
                         ["c0", "c1", "c2"], meta={"root": root})


def _rel(ds):
    return [os.path.relpath(p, ds.meta["root"]) for p in ds.paths]


def test_few_shot_deterministic_order_and_location_independent():
    with pytest.warns(UserWarning, match="class 'c2' has only 2 image"):
        a = sample_few_shot(_pool(), 4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = sample_few_shot(_pool(shuffle_seed=5), 4, seed=1)
        c = sample_few_shot(_pool(root="/elsewhere/x", shuffle_seed=9), 4, seed=1)
        d = sample_few_shot(_pool(), 4, seed=2)
        e = sample_few_shot(_pool(), 6, seed=1)
    assert _rel(a) == _rel(b) == _rel(c) and a.paths == b.paths
    assert a.labels == [0] * 4 + [1] * 4 + [2] * 2
    assert _rel(a) != _rel(d)
    assert set(_rel(a)) < set(_rel(e))  # nested in shots
    assert "unlabelled.jpg" not in _rel(e)
    src = _pool()
    assert [src.paths[i] for i in a.meta["source_indices"]] == a.paths
    assert a.meta["few_shot"] == {"shots": 4, "seed": 1}
    with pytest.raises(ValueError):
        sample_few_shot(src, 0, 1)


def test_base_new_split_and_subset_classes():
    assert base_new_split(["a", "b", "c", "d", "e"]) == ([0, 1, 2], [3, 4])
    assert base_new_split(4) == ([0, 1], [2, 3])
    ds = _pool()
    base, new = base_new_split(ds.classnames)
    nb = subset_classes(ds, new)
    assert nb.classnames == ["c2"] and set(nb.labels) == {0} and len(nb) == 2
    sub = subset_classes(ds, [2, 0])
    assert sub.classnames == ["c2", "c0"] and sorted(set(sub.labels)) == [0, 1]
    assert all(ds.labels[i] == [2, 0][y] for i, y in zip(sub.meta["source_indices"],
                                                             sub.labels))
    keep = subset_classes(ds, [1], relabel=False)
    assert set(keep.labels) == {1} and keep.classnames == ds.classnames


# ---------------------------------------------------------------- world (needs mini world)

@pytest.mark.slow
def test_world_spec(mini_world):
    task = next(iter(mini_world.tasks))
    ds = load_dataset(f"world:{task}")
    assert ds.domain == "colour" and len(ds) > 0 and os.path.isfile(ds.paths[0])
    assert ds.classnames == [c.replace("_", " ") for c in mini_world.tasks[task].classnames]
    tr = load_dataset(f"world:{task}@sketch", "train")
    assert tr.domain == "sketch" and tr.classnames == ds.classnames
    assert Image.open(tr.paths[0]).size[0] > 0
    with pytest.raises(SpecError, match="unknown world task"):
        load_dataset("world:no-such-task")
    with pytest.raises(SpecError, match="unknown domain"):
        load_dataset(f"world:{task}@infrared")
