"""SDAG: WordNet closure, two parents, descendants to a depth, images from folders and from
the offline world, JSON round-trip."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anyclass.hub.graph import GraphError, SemanticGraph, build_graph


def _wn():
    from anyclass.world.wordnet import get_wordnet
    return get_wordnet()


def _up(s):
    return s.hypernyms() + s.instance_hypernyms()


def _down(s):
    return s.hyponyms() + s.instance_hyponyms()


@pytest.fixture(scope="module")
def graph():
    return build_graph(["dog.n.01", "apple.n.01", "mouse.n.04", "n10954498"],  # einstein (wnid)
                       descendant_depth=1)


def test_ancestors_match_nltk_closure(graph):
    wn = _wn()
    for name in graph.order:                      # every node, seeds and descendants alike
        want = {s.name() for s in wn.synset(name).closure(_up)}
        assert graph.ancestors(name) == want, name
    assert graph.roots == ["entity.n.01"]
    assert "physicist.n.01" in graph.ancestors("einstein.n.01")   # instance hypernym edge


def test_two_parents_is_a_dag(graph):
    dog = graph.nodes["dog.n.01"]
    assert sorted(dog.parents) == ["canine.n.02", "domestic_animal.n.01"]
    assert dog.wnid == "n02084071" and "dog" in dog.lemmas and "Canis" in dog.definition
    assert sorted(graph.nodes["apple.n.01"].parents) == ["edible_fruit.n.01", "pome.n.01"]
    for p in dog.parents:
        assert "dog.n.01" in graph.nodes[p].children
    pos = graph.index
    for parent, child in graph.edges():           # topological order
        assert pos[parent] < pos[child]
    assert graph.node("n02084071") is dog


def test_descendants_to_depth(graph):
    wn = _wn()
    dog = wn.synset("dog.n.01")
    kids = {s.name() for s in _down(dog)}
    assert graph.descendants("dog.n.01") == kids   # depth 1: children only
    assert not graph.descendants("mouse.n.04")
    g2 = build_graph(["dog.n.01"], descendant_depth=2)
    grandkids = {g.name() for k in _down(dog) for g in _down(k)}
    assert g2.descendants("dog.n.01") == kids | grandkids
    full = {s.name() for s in dog.closure(_down)}
    assert g2.descendants("dog.n.01") < full       # depth-limited, not the whole subtree
    # descendants of depth-1 nodes are in the graph with all their ancestors
    for k in kids:
        assert g2.ancestors(k) == {s.name() for s in wn.synset(k).closure(_up)}


def test_unknown_synsets_named():
    with pytest.raises(GraphError, match=r"2 name\(s\) are not WordNet noun synsets: "
                                         r"'dgo.n.01', 'n99999999'"):
        build_graph(["dog.n.01", "dgo.n.01", "n99999999"])


def _img(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return str(path)


def test_folder_images_by_wnid_and_name(graph, tmp_path):
    g = SemanticGraph.from_json(graph.to_json())
    puppy = _img(tmp_path / "puppy.n.01" / "a.png", 0)         # by synset name
    pugs = [_img(tmp_path / "n02110958" / "sub" / f"{i}.jpg", i) for i in range(3)]   # pug wnid
    dogs = [_img(tmp_path / "dog.n.01" / f"{i}.png", 10 + i) for i in range(2)]
    _img(tmp_path / "not_a_synset" / "x.png", 20)
    _img(tmp_path / "n99999999" / "x.png", 21)
    _img(tmp_path / "cat.n.01" / "x.png", 22)                    # a synset outside the graph
    (tmp_path / "dog.n.01" / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning) as rec:
        counts = g.attach_folder_images(tmp_path, per_node=4)
    msgs = " | ".join(str(w.message) for w in rec)
    assert "not_a_synset" in msgs and "n99999999" in msgs and "cat.n.01" in msgs
    assert counts == {"puppy.n.01": 1, "pug.n.01": 3, "dog.n.01": 2}
    assert g.images["puppy.n.01"] == [puppy]
    assert g.images["pug.n.01"] == pugs
    # dog: its own images first in each round, then its descendants', capped at per_node
    assert g.images["dog.n.01"][0] == dogs[0] and len(g.images["dog.n.01"]) == 4
    assert set(g.images["dog.n.01"]) <= set(dogs + pugs + [puppy])
    # an ancestor without images of its own is represented by its descendants
    animal = g.images["animal.n.01"]
    assert len(animal) == 4 and set(animal) <= set(dogs + pugs + [puppy])
    assert "mouse.n.04" not in g.images
    with pytest.raises(GraphError, match="does not exist"):
        g.attach_folder_images(tmp_path / "nope")


def test_json_roundtrip(graph, tmp_path):
    g = SemanticGraph.from_json(graph.to_json())
    g.images = {"dog.n.01": ["/a.png"]}
    p = tmp_path / "g.json"
    g.save(p)
    g2 = SemanticGraph.load(p)
    assert g2.order == g.order and g2.images == g.images and g2.hash() == g.hash()
    assert g2.nodes["dog.n.01"] == g.nodes["dog.n.01"]
    assert g2.hash() != graph.hash()              # images are part of the hash
    with pytest.raises(GraphError, match="not an anyclass graph"):
        SemanticGraph.from_json('{"format": "other"}')
    with pytest.raises(GraphError, match="malformed graph JSON"):
        SemanticGraph.from_json("{not json")


@pytest.mark.slow
def test_world_images(mini_world):
    synsets = sorted({c.synset for c in mini_world.concepts if c.synset})[:40]
    g = build_graph(synsets, descendant_depth=0)
    g.attach_world_images(mini_world, per_node=3, per_concept=1, domains=("colour",))
    concepts = [c for c in mini_world.concepts if c.synset in set(synsets)]
    for c in concepts:
        imgs = g.images[c.synset]
        assert imgs and all(Path(p).exists() for p in imgs)
    own = {c.synset: [] for c in concepts}
    for c in concepts:
        own[c.synset].append(f"{c.id}_000.png")
    # an ancestor with no concept of its own gets its images from its descendants
    # (descendants include ancestors of the 40 that are other world concepts' synsets)
    in_graph = {c.synset: [] for c in mini_world.concepts if c.synset in set(g.order)}
    for c in mini_world.concepts:
        if c.synset in in_graph:
            in_graph[c.synset].append(f"{c.id}_000.png")
    anc = next(n for n in g.order if n not in in_graph and g.descendants(n) & own.keys())
    names = {Path(p).name for p in g.images[anc]}
    below = {f for d in g.descendants(anc) & in_graph.keys() for f in in_graph[d]}
    assert names and names <= below
    # the renders are not task images (seeds of their own, their own folder)
    assert all("hub-images" in p for ps in g.images.values() for p in ps)
    # same concept and index as a task test image, other pixels (disjoint seeds)
    a = np.asarray(Image.open(g.images[concepts[0].synset][0]))
    for t in mini_world.tasks:
        for r in mini_world.read_split(t)["test"]:
            if Path(r[0]).name == f"{concepts[0].id}_000.png":
                b = np.asarray(Image.open(mini_world.image_root / r[0]))
                assert not np.array_equal(a, b)
