"""The `anyclass` command end to end on the mini world: output, result files, errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anyclass.cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(mini_world):
    return mini_world


def _task(world) -> str:
    return next(iter(world.tasks))


def test_world_tasks_lists_every_task(world, capsys):
    assert main(["world", "tasks"]) == 0
    out = capsys.readouterr().out
    assert len(world.tasks) >= 10
    for name in world.tasks:
        assert name in out


def test_eval_writes_result_matching_independent_computation(world, tmp_path):
    from anyclass.backbones.factory import create_backbone
    from anyclass.data.images import load_image
    from anyclass.data.sources import load_dataset

    task = _task(world)
    out = tmp_path / "r.json"
    assert main(["eval", "--dataset", f"world:{task}@sketch", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"dataset", "backbone", "method", "shots", "seed", "metrics"} <= set(res)
    assert set(res["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert res["backbone"] == "builtin" and res["method"] == "zeroshot"
    # independent: encode every test image and every prompt directly, argmax
    bb = create_backbone("builtin")
    ds = load_dataset(f"world:{task}@sketch", "test")
    with torch.no_grad():
        x = torch.stack([bb.preprocess(load_image(p)) for p in ds.paths])
        f = bb.encode_images(x)
        t = bb.encode_texts([f"a photo of a {c}." for c in ds.classnames])
    acc = (f @ t.T).argmax(1).eq(torch.tensor(ds.labels)).float().mean().item()
    assert res["metrics"]["acc1"] == pytest.approx(acc, abs=1e-6)
    assert res["num_images"] == len(ds)


def test_report_table(world, tmp_path, capsys):
    task = _task(world)
    files = []
    for dom in ("colour", "sketch"):
        f = tmp_path / f"{dom}.json"
        main(["eval", "--dataset", f"world:{task}@{dom}", "--templates", "ensemble7",
              "--out", str(f)])
        files.append(str(f))
    capsys.readouterr()
    assert main(["report", *files, "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert f"world:{task}@colour" in out and f"world:{task}@sketch" in out
    assert (tmp_path / "p.png").stat().st_size > 1000


def _images(world, n=3):
    from anyclass.data.sources import load_dataset
    ds = load_dataset(f"world:{_task(world)}", "test")
    return ds, ds.paths[:n]


def test_classify_folder_with_bad_files(world, tmp_path, capsys):
    ds, paths = _images(world)
    d = tmp_path / "imgs"
    d.mkdir()
    for i, p in enumerate(paths):
        (d / f"ok{i}.png").write_bytes(Path(p).read_bytes())
    (d / "zero.png").write_bytes(b"")
    (d / "notes.txt").write_text("hello")
    (d / "broken.png").write_bytes(Path(paths[0]).read_bytes()[:40])
    classes = ",".join(ds.classnames[:5])
    assert main(["classify", str(d), "--classes", classes, "--top-k", "2", "--json"]) == 0
    cap = capsys.readouterr()
    rows = json.loads(cap.out)
    assert sorted(Path(r["image"]).name for r in rows) == ["ok0.png", "ok1.png", "ok2.png"]
    assert all(len(r["top"]) == 2 and r["top"][0]["score"] >= r["top"][1]["score"] for r in rows)
    for name in ("zero.png", "notes.txt", "broken.png"):
        assert name in cap.err
    assert "skipped 3" in cap.err


def test_classify_unusual_modes(world, tmp_path, capsys):
    _, paths = _images(world, 1)
    rgb = Image.open(paths[0]).convert("RGB")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).save(tmp_path / "g16.png")
    pal = rgb.convert("RGBA").convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert main(["classify", str(tmp_path), "--classes", "cat,dog,car"]) == 0
    out = capsys.readouterr().out
    for name in ("cmyk.jpg", "g16.png", "pal.png"):
        assert name in out


@pytest.mark.parametrize("args, message", [
    (["--classes", ""], "empty class list"),
    (["--classes", "cat"], "at least two classes"),
    (["--classes", "cat,dog,Cat"], "duplicate class names"),
])
def test_classify_bad_class_lists(world, args, message, capsys):
    _, paths = _images(world, 1)
    assert main(["classify", paths[0], *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_classify_non_utf8_class_file(world, tmp_path, capsys):
    _, paths = _images(world, 1)
    f = tmp_path / "classes.txt"
    f.write_bytes("cat\ncaf\xe9\n".encode("latin-1"))
    assert main(["classify", paths[0], "--classes-file", str(f)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_eval_unknown_specs(tmp_path, capsys):
    assert main(["eval", "--dataset", "nowhere:x"]) == 2
    assert "nowhere:x" in capsys.readouterr().err
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "a.png")
    assert main(["eval", "--dataset", f"folder:{tmp_path}", "--backbone", "bogus:x"]) == 2
    assert "unknown backbone spec 'bogus:x'" in capsys.readouterr().err


def test_pickle_checkpoint_refused_by_cli(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    ckpt = tmp_path / "evil.pt"
    ckpt.write_bytes(pickle.dumps({"state_dict": Evil()}))
    code = main(["classify", str(ckpt), "--classes", "a,b",
                 "--backbone", f"openclip:ViT-B-32@{ckpt}"])
    cap = capsys.readouterr()
    assert code == 2 and "refusing to load" in cap.err and "evil.pt" in cap.err
    assert "pwned" not in cap.out + cap.err


def test_console_script_runs():
    exe = Path(sys.executable).parent / "anyclass"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "classify" in out.stdout and "eval" in out.stdout


def test_demo_writes_report_with_table_and_chart(world, tmp_path, capsys):
    from anyclass.eval.demo import run_demo
    report = run_demo(tmp_path / "demo")
    text = report.read_text()
    assert "## Free-form classification" in text and "| dataset |" in text
    for name in world.tasks:
        assert f"world:{name}@colour" in text and f"world:{name}@sketch" in text
    assert (tmp_path / "demo" / "zeroshot_acc1.png").stat().st_size > 5000
    assert len(list((tmp_path / "demo" / "results").glob("*.json"))) == 2 * len(world.tasks)


def test_eval_support_method_without_pool_or_generator(tmp_path, capsys):
    from anyclass.cli.main import main
    (tmp_path / "cat").mkdir()
    assert main(["eval", "--dataset", f"folder:{tmp_path}", "--method", "sus-x"]) == 2
    assert "needs an image pool" in capsys.readouterr().err
    assert main(["eval", "--dataset", f"folder:{tmp_path}", "--method", "sus-x",
                 "--support-strategy", "generation"]) == 2
    assert "pass --generator DIR" in capsys.readouterr().err
