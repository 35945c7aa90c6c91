"""`anyclass support build|index` end to end on the mini world's pool (built-in model)."""
from __future__ import annotations

import json

from anyclass.cli.main import main


def test_support_build_cli_on_the_world_pool(mini_world, tmp_path, capsys):
    out = tmp_path / "sus"
    argv = ["support", "build", "--classes", "dog, cat ,car", "--pool", "world:pool",
            "--per-class", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "dog" in text and "built 12 images in 3 classes" in text and str(out) in text
    m = json.loads((out / "manifest.json").read_text())
    assert m["classnames"] == ["dog", "cat", "car"] and m["pool"] == "world:pool"
    assert m["backbone"].startswith("builtin") and len(m["items"]) == 12
    assert len(set(m["sources"])) == 12                      # de-duplicated
    assert all("/pool/colour/" in s for s in m["sources"])    # unlabelled pool only
    assert main(argv) == 0
    assert "reused 12 images" in capsys.readouterr().out
    assert main(["support", "index", "--pool", "world:pool", "--quiet"]) == 0
    assert "readable" in capsys.readouterr().out


def test_support_build_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["support", "build", "--classes", "a,b", "--quiet"]) == 2
    assert "retrieval needs a pool" in capsys.readouterr().err
    assert main(["support", "build", "--classes", "a,b", "--strategy", "generation",
                 "--quiet"]) == 2
    assert "--generator DIR" in capsys.readouterr().err


def test_world_pool_is_unlabelled_and_disjoint_from_task_images(mini_world):
    import re
    from anyclass.world.build import task_image_seeds
    from anyclass.world.pool import PER_CONCEPT, _plan, ensure_pool
    paths = ensure_pool(mini_world, progress=False)
    assert len(paths) == PER_CONCEPT["mini"] * len(mini_world.concepts)
    assert all(re.fullmatch(r"\d{6}\.png", p.rsplit("/", 1)[1]) for p in paths)
    plan = _plan(mini_world, PER_CONCEPT["mini"])
    assert not {(c.id, s) for c, s, _ in plan} & task_image_seeds(mini_world.cfg)
    assert len({s for _, s, _ in plan}) == len(plan)
    assert [c.id for c, _, _ in plan[:20]] != sorted(c.id for c, _, _ in plan[:20])  # shuffled
