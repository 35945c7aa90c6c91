"""The hub end to end on the mini world: CLI commands and `eval --method hub`."""
import json

import pytest

from anyclass.cli.main import main

pytestmark = pytest.mark.slow


def test_world_hub_list_select_and_eval(mini_world, capsys, tmp_path):
    assert main(["hub", "list", "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines()[1:] if "world-expert:" in l]
    assert len(rows) >= 6 and all(" yes " in r for r in rows)

    assert main(["hub", "select", "--classes", "cat,pizza,qwxzvy", "--json", "--quiet"]) == 0
    sel = json.loads(capsys.readouterr().out)
    assert "qwxzvy" in sel["fallback"]
    assert len(sel["models"]) <= 8 and sel["solver"] in ("milp", "greedy")

    res = tmp_path / "hub.json"
    assert main(["eval", "--dataset", "world:animals", "--method", "hub", "--out", str(res)]) == 0
    r = json.loads(res.read_text())
    assert r["metrics"]["acc1"] > 2 * r["chance_acc1"]
    assert r["hub"]["models_run"] <= r["hub"]["models_in_hub"]
    chosen = {c["model"] for c in r["hub"]["selection"]["choices"].values()}
    assert chosen == set(r["hub"]["selection"]["models"])
    cal = r["hub"]["calibration"]             # fitted on the hub's node images of the classes
    assert cal["images"] > 0 and cal["classes_fitted"] >= 2

    res2 = tmp_path / "hub_uncal.json"
    assert main(["eval", "--dataset", "world:animals", "--method", "hub", "--hparam",
                 "calibrate=false", "--out", str(res2)]) == 0
    r2 = json.loads(res2.read_text())
    assert r2["hub"]["calibration"] is None and r2["hparams"]["calibrate"] is False
    assert r2["hub"]["selection"]["choices"] == r["hub"]["selection"]["choices"]


def test_new_hub_add_show(mini_world, capsys, tmp_path):
    hub = str(tmp_path / "h.sqlite")
    assert main(["hub", "init", "--hub", hub]) == 0
    assert "0 model(s)" in capsys.readouterr().out
    assert main(["hub", "add", "world-expert:clocks-cnn-both", "--hub", hub, "--quiet"]) == 0
    assert "added world-expert:clocks-cnn-both as model 1" in capsys.readouterr().out
    assert main(["hub", "show", "1", "--hub", hub]) == 0
    assert "clock" in capsys.readouterr().out
    assert main(["hub", "show", "99", "--hub", hub]) == 2
    assert "no model '99'" in capsys.readouterr().err


def test_classify_with_hub(mini_world, capsys):
    import glob
    imgs = sorted(glob.glob(str(mini_world.root / "images" / "colour" / "animals" / "test" / "*.png")))[:3]
    assert main(["classify", *imgs, "--classes", "rat,leopard,snail,qwxzvy", "--method", "hub",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    for r in rows:
        assert abs(sum(t["score"] for t in r["top"]) - 1) < 1e-3     # all 4 classes, top-5
        assert {t["class"] for t in r["top"]} == {"rat", "leopard", "snail", "qwxzvy"}
