"""The offline world: concepts, WordNet, rendering, tasks and the build orchestration.

Core tests need neither the built-in model nor a built world; the build tests use a tiny
configuration with a stand-in trainer, so they run in seconds.
"""
from __future__ import annotations

import json
import sys
import threading
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anyclass.world import build as world_build
from anyclass.world.concepts import all_concepts, concept_map, load_concepts
from anyclass.world.config import CONFIGS, WorldConfig
from anyclass.world.render import DOMAINS, TASK_SEED_BASE, render, render_batch
from anyclass.world.tasks import TASKS, get_tasks, task_concept_ids, validate_tasks


@pytest.fixture(scope="module")
def concepts():
    return all_concepts()


@pytest.fixture(scope="module")
def by_id(concepts):
    return concept_map(concepts)


# --- concepts and WordNet ----------------------------------------------------------------------

def test_concepts_exist_in_both_fonts(concepts):
    from fontTools.ttLib import TTFont

    from anyclass.world.concepts import noto_font_path, symbola_font_path
    cmaps = [TTFont(str(p), lazy=True).getBestCmap()
             for p in (noto_font_path(), symbola_font_path())]
    assert 1000 <= len(concepts) <= 1400
    assert len({c.id for c in concepts}) == len(concepts)
    assert [c.codepoint for c in concepts] == sorted(c.codepoint for c in concepts)
    for c in concepts:
        assert all(c.codepoint in cm for cm in cmaps), c
        assert c.name and c.label and c.label in c.keywords


def test_concept_names(by_id):
    dog_face = by_id["u1f436"]
    assert dog_face.char == "🐶" and dog_face.name == "dog face" and dog_face.label == "dog"
    assert "dog" in dog_face.keywords


@pytest.mark.parametrize("cid,synset", [
    ("u1f436", "dog.n.01"),      # dog face → dog (animal faces are the animal)
    ("u1f415", "dog.n.01"),
    ("u1f34e", "apple.n.01"),    # red apple → apple (head noun)
    ("u1f34f", "apple.n.01"),
    ("u1f697", "car.n.01"),
    ("u1f48d", "ring.n.08"),     # the jewellery, not the sound
    ("u1f600", "smile.n.01"),    # grinning face: its alias "grinning" is a smile
    ("u1f610", "face.n.01"),     # other smileys are faces
    ("u1f552", "clock.n.01"),    # clock faces are clocks
    ("u2b06", "arrow.n.01"),     # arrows are the directional mark
])
def test_synset_mapping_examples(by_id, cid, synset):
    assert by_id[cid].synset == synset


def test_synset_coverage(concepts):
    how = [c.synset_how for c in concepts]
    assert how.count("direct") >= 400
    assert sum(c.synset is not None for c in concepts) >= 0.8 * len(concepts)


def test_wordnet_reads_debian_files():
    from anyclass.world.wordnet import get_wordnet, nltk_data_dir
    wn = get_wordnet()
    dog = wn.synset("dog.n.01")
    assert "dog" in dog.lemma_names()
    assert any(h.name() == "canine.n.02" for h in dog.hypernyms())
    assert dog.lexname() == "noun.animal"          # needs our lexnames file
    assert (nltk_data_dir() / "corpora" / "wordnet" / "lexnames").read_text().count("\n") == 45


# --- rendering ----------------------------------------------------------------------------------

def test_render_is_deterministic(by_id):
    dog = by_id["u1f436"]
    for domain in DOMAINS:
        a, b = render(dog, domain, 7, 64), render(dog, domain, 7, 64)
        assert a.mode == "RGB" and a.size == (64, 64)
        assert a.tobytes() == b.tobytes()
        assert a.tobytes() != render(dog, domain, 8, 64).tobytes()


def test_domains_and_concepts_differ(by_id):
    dog, cat = by_id["u1f436"], by_id["u1f431"]
    colour, sketch = render(dog, "colour", 1, 64), render(dog, "sketch", 1, 64)
    assert colour.tobytes() != sketch.tobytes()
    assert colour.tobytes() != render(cat, "colour", 1, 64).tobytes()
    # sketches are dark ink on light paper: nearly grey; colour renders are not
    s = np.asarray(sketch, np.float32)
    c = np.asarray(colour, np.float32)
    assert np.abs(s - s.mean(-1, keepdims=True)).mean() < np.abs(c - c.mean(-1, keepdims=True)).mean()


def test_render_batch_matches_render(concepts):
    items = [(concepts[i * 7 % len(concepts)], i) for i in range(70)]   # ≥64: uses 2 workers
    arr = render_batch(items, "colour", 32)
    assert arr.shape == (70, 32, 32, 3) and arr.dtype == np.uint8
    for j in (0, 33, 69):
        assert np.array_equal(arr[j], np.asarray(render(items[j][0], "colour", items[j][1], 32)))
    assert np.array_equal(render_batch(items[:5], "sketch", 32, workers=1)[2],
                          np.asarray(render(items[2][0], "sketch", items[2][1], 32)))


def test_unknown_domain_is_refused(by_id):
    from anyclass.errors import SpecError
    with pytest.raises(SpecError):
        render(by_id["u1f436"], "photo", 0, 32)


# --- tasks --------------------------------------------------------------------------------------

def test_task_suite(concepts):
    assert len(TASKS) >= 10
    assert len({t.name for t in TASKS}) == len(TASKS)
    assert {t.difficulty for t in TASKS} == {1, 2, 3, 4}
    validate_tasks({c.id for c in concepts})          # every class exists in both fonts
    for t in TASKS:
        assert 10 <= len(t.classes) <= 45, t.name
        assert len(set(t.classnames)) == len(t.classnames), t.name
        assert all(n == n.strip() and n for n in t.classnames)
    names = {t.name: t for t in TASKS}
    assert len(names["clocks"].classes) == 24
    assert "three o'clock" in names["clocks"].classnames
    assert "waxing crescent moon" in names["moon_phases"].classnames
    assert "thumbs up" in names["hand_gestures"].classnames


def test_mini_world_keeps_task_concepts():
    mini = CONFIGS["mini"]
    tasks = get_tasks(mini)
    assert len(tasks) >= 10
    assert all(3 <= len(t.classes) <= mini.max_classes_per_task
               for n, t in tasks.items() if n != "source")
    assert len(tasks["source"].classes) == 30
    ids = {c.id for c in load_concepts(mini)}
    assert len(ids) <= mini.max_concepts
    assert set(task_concept_ids(mini)) <= ids
    assert load_concepts(mini) == load_concepts(mini)     # deterministic


# --- build --------------------------------------------------------------------------------------

TINY = WorldConfig("tiny", image_size=32, max_concepts=120, pretrain_per_concept=1,
                   train_per_class=2, val_per_class=1, test_per_class=2,
                   max_classes_per_task=3)


@pytest.fixture
def tiny_home(tmp_path, monkeypatch):
    """World builds go to tmp_path; a stand-in trainer records its calls."""
    monkeypatch.setattr(world_build, "home", lambda: tmp_path)
    calls: list[Path] = []
    fake = types.ModuleType("anyclass.world.train")

    def train_builtin_model(cfg, concepts, out_dir, progress=True):
        calls.append(out_dir)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "weights.txt").write_text(f"{len(concepts)}")
        return out_dir

    fake.train_builtin_model = train_builtin_model
    fake.TRAIN_VERSION = "test"
    fake.model_key = lambda cfg: f"{cfg.name}-fake-{cfg.seed}"
    monkeypatch.setitem(sys.modules, "anyclass.world.train", fake)
    return tmp_path, calls


def _fake_train():
    return sys.modules["anyclass.world.train"]


def test_build_writes_coop_splits(tiny_home):
    home, calls = tiny_home
    world = world_build.ensure_world(TINY, progress=False)
    assert world.root == home / "world" / TINY.key() and len(calls) == 1
    assert len(world.tasks) >= 10 and (world.root / "DONE").exists()
    for name, info in world.tasks.items():
        relpaths = {}
        for domain in ("colour", "sketch", "rendition", "v2"):   # adversarial: test_world_v2
            split = json.loads(world.split_file(name, domain, progress=False).read_text())
            assert set(split) == {"train", "val", "test"}
            for s, rows in split.items():
                assert len(rows) == info.counts[s]
                for rel, label, cname in rows:
                    assert info.classnames[label] == cname
                    assert (world.image_root / rel).is_file()
                    assert rel.startswith(f"{domain}/{name}/{s}/")
                relpaths.setdefault(domain, []).append({r[0] for r in rows})
            tr, va, te = relpaths[domain]
            assert not (tr & va or tr & te or va & te)
    # seeds: disjoint between splits and tasks, and above every pretraining seed
    seeds = [world_build.image_seed(TINY, t, s, "u1f436", k)
             for t in ("animal_faces", "objects") for s in ("train", "val", "test")
             for k in range(4)]
    assert len(set(seeds)) == len(seeds) and min(seeds) >= TASK_SEED_BASE
    lines = world_build.describe_tasks(world)
    assert len(lines) == len(world.tasks) + 1 and lines[1].split()[0] == "objects"


def test_build_is_idempotent_and_resumes(tiny_home):
    home, calls = tiny_home
    world = world_build.ensure_world(TINY, progress=False)
    split = world.split_file("clocks", "sketch")
    first = json.loads(split.read_text())["test"][0][0]
    png = world.image_root / first
    original = png.read_bytes()
    again = world_build.ensure_world(TINY, progress=False)
    assert again.info == world.info and len(calls) == 1          # a no-op the second time
    # an interrupted build: DONE, one split file and one image are gone
    (world.root / "DONE").unlink()
    split.unlink()
    png.unlink()
    resumed = world_build.ensure_world(TINY, progress=False)
    assert len(calls) == 1                                         # model step kept
    assert png.read_bytes() == original                            # same pixels again
    assert resumed.info["timings"]["rendered_images"] == 1


def test_concurrent_builds_build_once(tiny_home):
    home, calls = tiny_home
    cfg = replace(TINY, seed=1)
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(
        world_build.ensure_world(cfg, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and len(calls) == 1
    assert out[0].info == out[1].info


@pytest.mark.slow
def test_mini_world(request):
    """The real mini world (with the built-in model) built by the session fixture."""
    pytest.importorskip("anyclass.world.train")
    mini_world = request.getfixturevalue("mini_world")
    assert mini_world.cfg.name == "mini" and len(mini_world.tasks) >= 10
    assert mini_world.model_dir.exists()
    for name in mini_world.tasks:
        for domain in ("colour", "sketch"):                # built with the world
            assert (mini_world.root / "tasks" / name / f"split_{domain}.json").exists()


def test_corrupt_shipped_model_is_refused_and_retrained(tiny_home, monkeypatch):
    """A shipped model whose checksum fails is never used: a warning names it and the build
    trains instead; an intact one is installed and nothing is trained."""
    from anyclass.world import artefacts
    home, calls = tiny_home
    root = home / "art"
    (root / "model").mkdir(parents=True)
    (root / "model" / "weights.txt").write_text("shipped")
    files = {"weights.txt": artefacts._sha256(root / "model" / "weights.txt")}
    (root / artefacts.MANIFEST).write_text(json.dumps(
        {"format": artefacts.FORMAT, "model": {"key": _fake_train().model_key(TINY), "files": files}}))
    monkeypatch.setattr(artefacts, "ARTEFACT_ROOT", root)
    world = world_build.ensure_world(TINY, progress=False)
    assert calls == [] and (world.model_dir / "weights.txt").read_text() == "shipped"
    assert json.loads((world.root / "model.json").read_text())["shipped"] is True
    cfg = replace(TINY, seed=3)
    files = {"weights.txt": artefacts._sha256(root / "model" / "weights.txt")}
    (root / artefacts.MANIFEST).write_text(json.dumps(
        {"format": artefacts.FORMAT, "model": {"key": _fake_train().model_key(cfg), "files": files}}))
    (root / "model" / "weights.txt").write_text("tampered")
    with pytest.warns(UserWarning, match="weights.txt fails its checksum: refused"):
        world = world_build.ensure_world(cfg, progress=False)
    assert len(calls) == 1 and (world.model_dir / "weights.txt").read_text() != "tampered"
