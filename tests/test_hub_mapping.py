"""Class name → synset mapping: exact, head noun, disambiguation with context, overrides,
unmappable names reported."""
from __future__ import annotations

import json

import pytest

from anyclass.hub.mapping import MappingError, load_overrides, map_classnames


def _by_name(ms):
    return {m.name: m for m in ms}


def test_exact_single_sense_and_plural():
    m = _by_name(map_classnames(["golden retriever", "hamster", "T-shirt"]))
    assert (m["golden retriever"].synset, m["golden retriever"].how) == \
        ("golden_retriever.n.01", "exact")
    assert m["golden retriever"].confidence == pytest.approx(0.95)
    assert m["hamster"].synset == "hamster.n.01"
    assert m["T-shirt"].synset == "jersey.n.03"          # WordNet's T-shirt sense


def test_head_noun():
    m = _by_name(map_classnames(["red apple", "bottle of wine", "pear"]))
    assert m["red apple"].synset == "apple.n.01" and m["red apple"].how.startswith("head_noun")
    assert m["bottle of wine"].synset.startswith("bottle.n.")
    assert m["red apple"].confidence < 0.95


def test_context_disambiguates_mouse():
    computer = _by_name(map_classnames(["mouse", "keyboard", "monitor", "printer"]))
    animals = _by_name(map_classnames(["mouse", "cat", "hamster", "rabbit"]))
    assert computer["mouse"].synset == "mouse.n.04"        # the pointing device
    assert animals["mouse"].synset == "mouse.n.01"         # the rodent
    assert computer["mouse"].how == "exact+context"
    for m in (computer["mouse"], animals["mouse"]):
        assert 0 < m.confidence < 0.95
        alts = [a for a, _ in m.alternatives]
        assert m.synset not in alts and len(alts) >= 2
    birds = _by_name(map_classnames(["crane", "heron", "stork"]))
    machines = _by_name(map_classnames(["crane", "bulldozer", "excavator"]))
    assert birds["crane"].synset == "crane.n.05" and machines["crane"].synset == "crane.n.04"


def test_unmappable_reported_not_dropped():
    names = ["xyzzy frob", "dog", "qwzx"]
    with pytest.warns(UserWarning, match=r"2 class name\(s\) map to no WordNet synset.*"
                                         r"'xyzzy frob', 'qwzx'"):
        ms = map_classnames(names)
    assert [m.name for m in ms] == names
    assert [(m.synset, m.how, m.confidence) for m in (ms[0], ms[2])] == \
        [(None, "none", 0.0)] * 2


def test_overrides_dict_and_files(tmp_path):
    ms = map_classnames(["mouse", "xyzzy"], overrides={"mouse": "n02330245",
                                                       "xyzzy": "dog.n.01"})
    assert [(m.synset, m.how, m.confidence) for m in ms] == \
        [("mouse.n.01", "override", 1.0), ("dog.n.01", "override", 1.0)]
    tsv = tmp_path / "map.tsv"
    tsv.write_text("# class\tsynset\nMouse\tmouse.n.04\nthing\t\n")
    ov = load_overrides(tsv)
    assert ov == {"Mouse": "mouse.n.04", "thing": None}
    ms = map_classnames(["mouse", "thing"], overrides=tsv)   # names match case-insensitively
    assert ms[0].synset == "mouse.n.04" and (ms[1].synset, ms[1].how) == (None, "override")
    js = tmp_path / "map.json"
    js.write_text(json.dumps({"cat": "cat.n.01"}))
    assert map_classnames(["cat"], overrides=js)[0].how == "override"


def test_invalid_override_names_it(tmp_path):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("dog\tdog.n.01\nmouse\tmousse.n.99\n")
    with pytest.raises(MappingError, match=r"override for 'mouse' names 'mousse.n.99'.*"
                                           r"bad.tsv:2"):
        load_overrides(tsv)
    with pytest.raises(MappingError, match="'n99999999'"):
        map_classnames(["x"], overrides={"x": "n99999999"})
    (tmp_path / "cols.tsv").write_text("only one column\n")
    with pytest.raises(MappingError, match=r"cols.tsv:1: expected"):
        load_overrides(tmp_path / "cols.tsv")
