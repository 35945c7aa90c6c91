"""World v2: the no-leak rule of pretraining, the shifted domains, the source task, shipped
artefacts and builds that survive being killed in any phase."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anyclass.errors import SpecError
from anyclass.world import adversarial, artefacts
from anyclass.world.build import image_seed, task_image_seeds
from anyclass.world.concepts import concept_map, load_concepts
from anyclass.world.config import CONFIGS
from anyclass.world.render import DOMAINS, TASK_SEED_BASE, render
from anyclass.world.tasks import SOURCE_TASK, TASKS, downstream_tasks, get_tasks, task_concept_ids
from anyclass.world.train import model_key

REPO = Path(__file__).resolve().parents[1]


# --- the no-leak rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["full", "mini"])
def test_pretraining_never_sees_a_task_image_or_a_shifted_task_concept(name):
    from anyclass.world.train import pretrain_plan
    cfg = CONFIGS[name]
    plan = pretrain_plan(cfg, load_concepts(cfg))
    assert set(plan) == {"colour", "sketch"}
    used = set(task_concept_ids(cfg))
    # no task concept in a non-colour render; the free concepts are drawn as sketches
    sketched = {c.id for c, _ in plan["sketch"]}
    assert sketched and not sketched & used
    assert sketched == {c.id for c in load_concepts(cfg)} - used
    # no task image seed (any task, split, domain) among the pretraining seeds
    pre = {(c.id, s) for items in plan.values() for c, s in items}
    assert max(s for _, s in pre) < TASK_SEED_BASE
    assert not pre & task_image_seeds(cfg)
    # the source task's concepts count as task concepts
    assert set(get_tasks(cfg)[SOURCE_TASK].concept_ids) <= used


def test_training_renders_exactly_the_plan(monkeypatch, tmp_path):
    """What train_builtin_model renders is pretrain_plan: colour (with masks) and sketches of
    free concepts only (the renderer is stopped after the last render call)."""
    from anyclass.world import render as render_mod
    from anyclass.world import train
    cfg = CONFIGS["mini"]
    calls = []

    class Stop(Exception):
        pass

    def fake_render_batch(items, domain, size, workers=None, progress=False, with_mask=False):
        calls.append((domain, [(c.id, s) for c, s in items], with_mask))
        if len(calls) == 2:
            raise Stop
        return np.zeros((len(items), size, size, 4 if with_mask else 3), np.uint8)

    monkeypatch.setattr(render_mod, "render_batch", fake_render_batch)
    with pytest.raises(Stop):
        train.train_builtin_model(cfg, load_concepts(cfg), tmp_path / "m", progress=False)
    plan = train.pretrain_plan(cfg, load_concepts(cfg))
    assert [(d, m) for d, _, m in calls] == [("colour", True), ("sketch", False)]
    assert calls[0][1] == [(c.id, s) for c, s in plan["colour"]]
    assert calls[1][1] == [(c.id, s) for c, s in plan["sketch"]]
    assert not {cid for cid, _ in calls[1][1]} & set(task_concept_ids(cfg))


# --- domains and the source task ----------------------------------------------------------------

def test_domains_render_differently_and_deterministically():
    dog = concept_map()["u1f415"]
    imgs = {d: np.asarray(render(dog, d, TASK_SEED_BASE + 5, 64)) for d in DOMAINS}
    assert set(DOMAINS) == {"colour", "sketch", "rendition", "v2", "adversarial"}
    for d in DOMAINS:
        assert np.array_equal(imgs[d], np.asarray(render(dog, d, TASK_SEED_BASE + 5, 64)))
        for e in DOMAINS:
            if e != d:
                assert not np.array_equal(imgs[d], imgs[e]), (d, e)
    img, mask = render(dog, "colour", 3, 64, with_mask=True)
    assert np.array_equal(np.asarray(img), np.asarray(render(dog, "colour", 3, 64)))
    m = np.asarray(mask)
    assert m.shape == (64, 64) and 0.1 < (m > 128).mean() < 0.9


def test_v2_resamples_and_rendition_pairs_with_colour():
    cfg = CONFIGS["full"]
    c = image_seed(cfg, "objects", "test", "u1f415", 3)
    assert image_seed(cfg, "objects", "test", "u1f415", 3, "rendition") == c
    assert image_seed(cfg, "objects", "test", "u1f415", 3, "sketch") == c
    assert image_seed(cfg, "objects", "test", "u1f415", 3, "v2") != c


def test_source_task_is_imagenet_like():
    full = get_tasks(CONFIGS["full"])
    src = full[SOURCE_TASK]
    assert len(src.classes) >= 300
    assert len(set(src.classnames)) == len(src.classnames)
    others = {cid for n in downstream_tasks(full) for cid in full[n].concept_ids}
    shared = set(src.concept_ids) & others
    assert 100 <= len(shared) < len(src.concept_ids)          # overlaps, as ImageNet does
    assert CONFIGS["full"].train_per_class == 16 and CONFIGS["full"].val_per_class > 0
    assert downstream_tasks(full) == [t.name for t in TASKS]
    assert list(full)[-1] == SOURCE_TASK


@pytest.mark.parametrize("spec,message", [
    ("world:objects@photo", "unknown domain 'photo' (known: colour, sketch, rendition, v2, adversarial)"),
    ("world:nope@sketch", "unknown world task 'nope' (known: objects, animals,"),
])
def test_bad_world_specs_fail_before_any_build(spec, message, monkeypatch):
    from anyclass.data import sources
    from anyclass.world import build

    def no_build(*a, **k):
        raise AssertionError("the world was built for a bad spec")
    monkeypatch.setattr(build, "ensure_world", no_build)
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sources.load_dataset(spec, "test")


@pytest.mark.slow
def test_mini_world_shifted_domains(mini_world):
    """rendition and v2 are rendered on first use; adversarial keeps, per class, candidates
    the filter expert misclassifies."""
    task = "objects"
    for d in ("rendition", "v2", "adversarial"):
        split = json.loads(mini_world.split_file(task, d, progress=False).read_text())
        info = mini_world.tasks[task]
        for s, rows in split.items():
            assert len(rows) == info.counts[s]
            assert all((mini_world.image_root / r[0]).is_file() for r in rows)
            assert all(r[0].startswith(f"{d}/{task}/{s}/") for r in rows)
    # the adversarial selection is the hardest third of the candidates, class by class
    spec = get_tasks(mini_world.cfg)[task]
    per = {"test": mini_world.cfg.test_per_class}
    chosen = adversarial.select(mini_world, spec, per)["test"]
    from anyclass.world.concepts import concept_map as cmap
    from anyclass.world.render import render_batch
    by_id = cmap(mini_world.concepts)
    n = per["test"] * adversarial.CANDIDATES_PER_IMAGE
    cid = spec.concept_ids[0]
    plan = [(by_id[cid], adversarial.candidate_seed(mini_world.cfg, task, "test", cid, k))
            for k in range(n)]
    imgs = render_batch(plan, "adversarial", mini_world.cfg.image_size)
    score, right = adversarial.true_class_prob(mini_world, imgs, [cid] * n)
    kept = [r[1] for r in chosen if r[0] == cid]
    assert len(kept) == per["test"]
    # ImageNet-A's rule: images the expert gets wrong (in seed order), then the least
    # confident right ones if too few fool it
    seeds = [s for _, s in plan]
    wrong = sorted(s for s, ok in zip(seeds, right) if not ok)
    fill = [s for _, s in sorted((score[i], seeds[i]) for i in range(n) if right[i])]
    assert kept == (wrong + fill)[:per["test"]]
    assert all(not r[4] for r in chosen[:len(wrong)] if r[0] == cid)
    # the stored test split shows the same images
    split = json.loads(mini_world.split_file(task, "adversarial").read_text())["test"]
    first = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(
        mini_world.image_root / split[0][0]).convert("RGB"))
    assert np.array_equal(first, chosen[0][2])
    filt = json.loads((mini_world.root / "tasks" / task / "adversarial_filter.json").read_text())
    assert 0.0 <= filt["fooled_share"] <= 1.0


# --- shipped artefacts --------------------------------------------------------------------------

def test_shipped_artefacts_match_the_code_recipe():
    """The committed weights were built from the code's recipes (else a fresh machine would
    silently retrain, and the docs' numbers would not be the user's)."""
    from types import SimpleNamespace

    from anyclass.world.experts import hub_key
    m = artefacts.read_manifest()
    assert m is not None, "resources/world/manifest.json missing: run anyclass world artefacts"
    full = CONFIGS["full"]
    assert m["model"]["key"] == model_key(full)
    assert m["experts"]["key"] == hub_key(SimpleNamespace(cfg=full))
    total = sum(p.stat().st_size for p in artefacts.ARTEFACT_ROOT.rglob("*") if p.is_file())
    assert total < 50 * 2 ** 20
    for name in m["model"]["files"]:
        assert (artefacts.ARTEFACT_ROOT / "model" / name).is_file()


def _fake_artefacts(root: Path, cfg) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.safetensors").write_bytes(b"weights")
    (root / "model" / "config.json").write_text("{}")
    files = {n: artefacts._sha256(root / "model" / n) for n in ("model.safetensors", "config.json")}
    (root / artefacts.MANIFEST).write_text(json.dumps(
        {"format": artefacts.FORMAT, "model": {"key": model_key(cfg), "files": files},
         "experts": {"key": "x", "experts": {}}}))
    return root


def test_artefact_install_checks_key_and_checksum(tmp_path):
    cfg = CONFIGS["mini"]
    root = _fake_artefacts(tmp_path / "art", cfg)
    assert artefacts.install_model(cfg, tmp_path / "a", root)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == b"weights"
    # another recipe: not shipped, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not artefacts.install_model(replace(cfg, seed=9), tmp_path / "b", root)
    # a corrupted file: refused with a warning naming it, nothing installed
    (root / "model" / "model.safetensors").write_bytes(b"weightz")
    with pytest.warns(UserWarning, match=r"model\.safetensors fails its checksum: refused"):
        assert not artefacts.install_model(cfg, tmp_path / "c", root)
    assert not (tmp_path / "c").exists()


# --- killed builds ------------------------------------------------------------------------------

#: a smaller mini world (the mini recipes, fewer concepts and images): built three times
_KILL_CFG = replace(CONFIGS["mini"], seed=7, max_concepts=150, max_classes_per_task=4,
                    train_per_class=4, val_per_class=1, test_per_class=2)
_BUILD = textwrap.dedent("""
    import sys
    from dataclasses import replace
    from anyclass.world.config import CONFIGS
    from anyclass.world.build import ensure_world
    from anyclass.world.experts import ensure_world_experts
    cfg = replace(CONFIGS["mini"], seed=int(sys.argv[1]), max_concepts=150,
                  max_classes_per_task=4, train_per_class=4, val_per_class=1, test_per_class=2)
    w = ensure_world(cfg, progress=False)
    ensure_world_experts(w, progress=False)
    print("BUILT", w.root, flush=True)
""")


def _kill_when(cmd: list[str], env: dict, ready, timeout: float = 600) -> bool:
    """Start cmd, SIGKILL it once ready() holds; True if it was killed (not finished)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if ready():
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.05)
    p.wait()
    return False


@pytest.mark.slow
def test_build_killed_in_each_phase_resumes(tmp_path):
    """Kill the build while it renders, while it trains the model and while it trains the
    experts; each rerun resumes and the finished world is complete and consistent."""
    env = {**os.environ, "ANYCLASS_HOME": str(tmp_path), "ANYCLASS_WORLD": "mini",
           "OMP_NUM_THREADS": "1"}
    script = tmp_path / "build.py"
    script.write_text(_BUILD)
    cmd = [sys.executable, str(script), "7"]
    cfg = _KILL_CFG
    root = tmp_path / "world" / cfg.key()

    def n_images():
        return sum(1 for _ in (root / "images").rglob("*.png")) if root.exists() else 0

    def training():       # every eager split file written, no model yet
        return (root / "tasks").exists() and \
            len(list((root / "tasks").rglob("split_sketch.json"))) == len(get_tasks(cfg)) \
            and not (root / "model.json").exists()

    def experts():
        return any((root / "experts").glob("*/*/expert.json")) if root.exists() else False

    assert _kill_when(cmd, env, lambda: n_images() > 200)
    assert not (root / "DONE").exists()
    assert _kill_when(cmd, env, lambda: training() and time.sleep(3) is None)
    assert not (root / "model.json").exists()
    assert _kill_when(cmd, env, experts)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "BUILT" in out.stdout, out.stderr[-2000:]
    done = json.loads((root / "DONE").read_text())
    assert done["key"] == cfg.key()
    for name in get_tasks(cfg):
        for d in ("colour", "sketch"):
            split = json.loads((root / "tasks" / name / f"split_{d}.json").read_text())
            assert all((root / "images" / r[0]).stat().st_size > 0
                       for rows in split.values() for r in rows)
    assert not list((root / "images").rglob("*.tmp*"))    # a killed render's leftovers go
    from anyclass.world.model import BuiltinModel
    BuiltinModel.load(root / "model")                      # loads: not half-written
    hub = next((root / "experts").iterdir())
    assert json.loads((hub / "hub.json").read_text())["experts"]


@pytest.mark.slow
def test_adversarial_split_follows_its_filter_expert(mini_world):
    """A split chosen by another filter expert (other weights) is re-selected, not reused."""
    from anyclass.world.build import _filter_sha256
    task = "zodiac"
    split = mini_world.split_file(task, "adversarial", progress=False)
    rec_path = mini_world.root / "tasks" / task / "adversarial_filter.json"
    rec = json.loads(rec_path.read_text())
    assert rec["expert_sha256"] == _filter_sha256(mini_world, False)
    rec_path.write_text(json.dumps({**rec, "expert_sha256": "0" * 64}))
    before = split.stat().st_mtime_ns
    mini_world.split_file(task, "adversarial", progress=False)
    assert json.loads(rec_path.read_text())["expert_sha256"] == rec["expert_sha256"]
    assert split.stat().st_mtime_ns > before
