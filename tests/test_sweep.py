"""`anyclass sweep` and `anyclass report`: grids, checks before anything runs, cells, resume
(also after SIGKILL), failures, worker processes and Ray, and the protocol tables.

Most tests inject a fake fit (module-level functions, so spawned workers can import them);
fits are logged to the file named by $FAKE_SWEEP_LOG so calls are counted across processes.
The real path (zeroshot, tip-adapter on the mini world) is checked against an independent
computation and across executors."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from anyclass.errors import AnyclassError, SpecError
from anyclass.eval import protocols, sweep
from anyclass.eval.protocols import Cell, Grid, MethodRules, expand, make_grid
from anyclass.eval.sweep import Engine, run_sweep

TESTS = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- fakes
# zs: no training, transfers; cache: trains, cannot transfer; prompt: trains, transfers
# (saves a state file); flaky: like prompt, but fails on world:animals; slow: prompt + sleep


def fake_check(method: str, hparams: dict | None = None) -> None:
    if method not in ("zs", "cache", "prompt", "flaky", "slow"):
        raise SpecError(f"unknown method {method!r} (known: cache, flaky, prompt, slow, zs)")
    bad = sorted(set(hparams or {}) - {"epochs", "lr"})
    if bad:
        raise SpecError(f"method {method!r} has no hyperparameter {bad[0]!r}")


def fake_transfers(method: str) -> bool:
    return method != "cache"


def fake_needs_train(method: str) -> bool:
    return method != "zs"


RULES = MethodRules(fake_check, fake_transfers, fake_needs_train)


def _log(line: str) -> None:
    path = os.environ.get("FAKE_SWEEP_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def _score(*parts) -> float:
    import hashlib
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
    return 0.2 + 0.7 * int.from_bytes(h[:4], "big") / 2 ** 32


class FakeFitted:
    def __init__(self, method, dataset, shots, seed, classes, hparams):
        self.method, self.dataset, self.shots, self.seed = method, dataset, shots, seed
        self.classes, self.hparams = classes, hparams
        self.info = {"train_images": 10 * shots, "state_file": None}

    def evaluate(self, dataset, split="test", classes=None, progress=True):
        if self.method == "flaky" and "animals" in dataset:
            raise RuntimeError("flaky cannot do animals")
        acc = _score(self.method, self.dataset, dataset, self.shots, self.seed, self.classes,
                     classes, self.hparams)
        return {"metrics": {"acc1": acc, "acc5": min(1.0, acc + 0.1),
                            "mean_per_class_recall": acc},
                "num_images": 60 if classes is None else 6 * len(classes),
                "num_classes": 10 if classes is None else len(classes)}


def fake_fit(method, backbone, dataset, *, shots, seed, hparams=None, classes=None,
             templates="single", state_path=None, protocol=None, progress=True):
    assert backbone == "fake-backbone"
    if method == "slow":
        time.sleep(float(os.environ.get("FAKE_SWEEP_SLEEP", "0.4")))
    if state_path is not None and fake_needs_train(method):
        if Path(state_path).exists():
            _log(f"load {method} {dataset} {shots} {seed}")
        else:
            time.sleep(0.2)   # long enough for a second worker to hit the lock
            _log(f"train {method} {dataset} {shots} {seed}")
            Path(state_path).parent.mkdir(parents=True, exist_ok=True)
            Path(state_path).write_bytes(b"state")
    else:
        _log(f"fit {method} {dataset} {shots} {seed} {classes}")
    return FakeFitted(method, dataset, shots, seed, classes, hparams)


def fake_backbone(spec, device=None):
    _log(f"backbone {spec}")
    return "fake-backbone"


def fake_classnames(spec):
    return [f"class {i}" for i in range(10)]


FAKE = Engine(fit_on=fake_fit, create_backbone=fake_backbone, test_classnames=fake_classnames)


@pytest.fixture
def calls(tmp_path, monkeypatch):
    """The fake's log lines so far (fits, trainings, backbone builds)."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_SWEEP_LOG", str(log))

    def read() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []
    return read


def _fits(lines: list[str]) -> list[str]:
    return [x for x in lines if x.split()[0] in ("fit", "train")]


def _grid(**kw) -> Grid:
    kw.setdefault("seeds", [1])
    return Grid(**kw)


def _quiet(lines: list[str]):
    return lines.append


# --------------------------------------------------------------------------- grids

def test_grid_expansion_counts():
    two = ["world:fruit_veg", "world:animals"]
    cells = expand(_grid(protocol="fewshot", methods=["zs", "prompt"], datasets=two,
                         seeds=[1, 2, 3], shots=[1, 2, 4]), RULES)
    # zs needs no training: one shots=0 cell per (dataset, seed); prompt: every shots
    assert len(cells) == 2 * 3 + 2 * 3 * 3
    assert {c.shots for c in cells if c.method == "zs"} == {0}
    assert len(expand(_grid(protocol="fewshot", methods=["prompt"], datasets=two,
                            seeds=[1, 2, 3]), RULES)) == 2 * 3 * 5     # 1,2,4,8,16
    b2n = expand(_grid(protocol="base2new", methods=["zs", "prompt"], datasets=two,
                       seeds=[1, 2, 3]), RULES)
    assert len(b2n) == 2 * 3 * 2 and {c.shots for c in b2n if c.method == "prompt"} == {16}
    from anyclass.world.config import get_config
    from anyclass.world.tasks import get_tasks
    ntasks = len(get_tasks(get_config()))          # the source task included
    xd = expand(_grid(protocol="xd", methods=["prompt"], seeds=[1, 2]), RULES)
    assert len(xd) == 2 * ntasks and {c.source for c in xd} == {"world:source"}
    assert sum(c.dataset == "world:source" for c in xd) == 2      # the source column
    dg = expand(_grid(protocol="dg", methods=["zs", "cache"], seeds=[1]), RULES)
    assert sorted({c.dataset for c in dg}) == sorted(
        ["world:source"] + [f"world:source@{d}" for d in ("sketch", "rendition", "v2",
                                                           "adversarial")])
    assert len(dg) == 2 * 5
    # every cell has its own file and key; the xd targets of one training share a train key
    for cs in (cells, b2n, xd, dg):
        assert len({c.relpath() for c in cs}) == len({c.key for c in cs}) == len(cs)
    assert len({c.train_key for c in xd}) == 2


def test_grid_from_yaml_with_flags_on_top(tmp_path):
    f = tmp_path / "grid.yaml"
    f.write_text("protocol: fewshot\nmethods: [prompt, zs]\ndatasets: [world:fruit_veg]\n"
                 "seeds: [1]\nshots: [2, 4]\nhparams:\n  prompt: {epochs: 5, lr: 0.01}\n")
    g = make_grid(protocols.load_grid_file(f), seeds="2,3",
                  hparams=protocols.parse_hparam_flags(["prompt.lr=0.5"]))
    assert g.protocol == "fewshot" and g.methods == ["prompt", "zs"]
    assert g.seeds == [2, 3] and g.shots == [2, 4]
    assert g.hparams == {"prompt": {"epochs": 5, "lr": 0.5}}
    cells = expand(g, RULES)
    assert len(cells) == 2 * 2 + 2
    assert next(c for c in cells if c.method == "prompt").hparams_dict == {"epochs": 5,
                                                                           "lr": 0.5}
    f.write_text("protocol: fewshot\nseed: [1]\n")
    with pytest.raises(SpecError, match="unknown key 'seed'"):
        protocols.load_grid_file(f)
    with pytest.raises(SpecError, match="METHOD.NAME=VALUE"):
        protocols.parse_hparam_flags(["epochs=5"])


@pytest.mark.parametrize("grid, message", [
    (dict(protocol="fewshot", methods=["zs", "nope"], datasets=["world:fruit_veg"]),
     "unknown method 'nope'"),
    (dict(protocol="fewshot", methods=["prompt"], datasets=["world:fruit_veg"],
          hparams={"prompt": {"epoch": 3}}), "no hyperparameter 'epoch'"),
    (dict(protocol="fewshot", methods=["zs"], datasets=["world:fruit_veg", "world:nosuch"]),
     "unknown world task 'nosuch'"),
    (dict(protocol="fewshot", methods=["zs"], datasets=["world:fruit_veg@watercolour"]),
     "unknown domain 'watercolour'"),
    (dict(protocol="fewshot", methods=["zs"], datasets=["imagenet"]), "needs a scheme"),
    (dict(protocol="base2new", methods=["zs", "cache"], datasets=["world:fruit_veg"]),
     "method 'cache' cannot score classes it was not trained on, so it has no base2new "
     "result"),
    (dict(protocol="xd", methods=["cache"]), "method 'cache' cannot score classes"),
    (dict(protocol="fewshot", methods=["prompt"], datasets=["world:fruit_veg"], shots=[0, 1]),
     "method 'prompt' needs labelled shots"),
    (dict(protocol="fewshots", methods=["zs"], datasets=["world:fruit_veg"]),
     "unknown protocol 'fewshots'"),
    (dict(protocol="fewshot", methods=[], datasets=["world:fruit_veg"]), "empty grid"),
    (dict(protocol="base2new", methods=["zs"]), "empty grid: no datasets"),
    (dict(protocol="fewshot", methods=["zs"], datasets=["world:fruit_veg"],
          hparams={"coop": {"epochs": 1}}), "hparams given for method 'coop'"),
    (dict(protocol="dg", methods=["zs"], source="world:source@sketch"),
     "not a colour-domain world task"),
])
def test_grid_errors_name_the_problem(grid, message):
    with pytest.raises(AnyclassError, match=message.replace("(", r"\(")):
        expand(_grid(**grid), RULES)


def test_cli_checks_the_whole_grid_before_running_anything(tmp_path, capsys, monkeypatch,
                                                           calls):
    from anyclass.cli.main import main
    monkeypatch.setattr(protocols, "fitting_rules", lambda: RULES)
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("sweep ran"))
    out = tmp_path / "out"
    for argv, message in [
        (["--protocol", "fewshot", "--methods", "zs,nope", "--datasets", "world:fruit_veg"],
         "unknown method 'nope'"),
        (["--protocol", "fewshot", "--methods", "zs", "--datasets",
          "world:fruit_veg,world:nosuch"], "unknown world task 'nosuch'"),
        (["--protocol", "base2new", "--methods", "zs,cache", "--datasets", "world:fruit_veg"],
         "method 'cache' cannot score classes it was not trained on, so it has no base2new"),
        (["--protocol", "b2n", "--methods", "zs", "--datasets", "world:fruit_veg"],
         "unknown protocol 'b2n'"),
    ]:
        assert main(["sweep", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists() and calls() == []


# --------------------------------------------------------------------------- cells

def test_cell_records_and_base2new_metrics(tmp_path, calls):
    cells = expand(_grid(protocol="base2new", methods=["prompt"], datasets=["world:fruit_veg"],
                         hparams={"prompt": {"epochs": 2}}), RULES)
    s = run_sweep(cells, tmp_path, engine=FAKE, log=_quiet([]))
    assert (s.total, s.computed, s.skipped, s.failed) == (1, 1, 0, [])
    c = cells[0]
    rec = json.loads((tmp_path / c.relpath()).read_text())
    assert str(c.relpath()).startswith("base2new/prompt/world-fruit_veg/shots16-seed1-")
    base, new = list(range(5)), list(range(5, 10))
    fitted = FakeFitted("prompt", "world:fruit_veg", 16, 1, base, {"epochs": 2})
    b = fitted.evaluate("world:fruit_veg", classes=base)["metrics"]["acc1"]
    n = fitted.evaluate("world:fruit_veg", classes=new)["metrics"]["acc1"]
    m = rec["metrics"]
    assert m["base_acc1"] == pytest.approx(b) and m["new_acc1"] == pytest.approx(n)
    assert m["hm"] == pytest.approx(2 * b * n / (b + n))
    assert {"base_acc5", "new_acc5", "base_mean_per_class_recall"} <= set(m)
    assert rec["evaluation"]["base"]["classes"] == [f"class {i}" for i in base]
    # base2new keeps the learned state (states/...), which analyses reuse
    assert _fits(calls()) == ["train prompt world:fruit_veg 16 1"]
    assert (tmp_path / c.state_relpath()).read_bytes() == b"state"
    for k in ("protocol", "method", "dataset", "backbone", "seed", "shots", "hparams",
              "train", "timings_s", "anyclass_version", "cell_key"):
        assert k in rec
    assert rec["hparams"] == {"epochs": 2} and rec["cell_key"] == c.key
    assert sweep.harmonic_mean(0.0, 0.5) == 0.0


def test_xd_trains_once_per_source_and_seed(tmp_path, calls):
    cells = expand(_grid(protocol="xd", methods=["prompt", "zs"], seeds=[1, 2],
                         datasets=["world:fruit_veg", "world:animals"]), RULES)
    assert len(cells) == 2 * 2 * 3
    s = run_sweep(cells, tmp_path, engine=FAKE, log=_quiet([]))
    assert s.computed == 12
    trains = [x for x in calls() if x.startswith("train")]
    assert sorted(trains) == ["train prompt world:source 16 1", "train prompt world:source 16 2"]
    assert len(list((tmp_path / "states").rglob("*.safetensors"))) == 2
    rec = json.loads((tmp_path / cells[0].relpath()).read_text())
    assert rec["source"] == "world:source" and rec["target"] == "world:source"
    assert "dataset" not in rec
    assert str(cells[1].relpath()) == "xd/prompt/world-source--world-fruit_veg/shots16-seed1.json"
    # a later sweep (another process, say) loads the saved states instead of training
    for f in tmp_path.glob("xd/**/*.json"):
        f.unlink()
    run_sweep(cells, tmp_path, engine=FAKE, log=_quiet([]))
    assert len([x for x in calls() if x.startswith("train")]) == 2


def test_resume_recomputes_only_missing_or_broken_cells(tmp_path, calls):
    cells = expand(_grid(protocol="fewshot", methods=["zs", "prompt"], shots=[1, 2],
                         datasets=["world:fruit_veg", "world:animals"]), RULES)
    assert len(cells) == 2 + 4
    run_sweep(cells, tmp_path, engine=FAKE, log=_quiet([]))
    assert len(_fits(calls())) == 6
    files = {c: tmp_path / c.relpath() for c in cells}
    before = {c: f.read_text() for c, f in files.items()}
    lines: list[str] = []
    s = run_sweep(cells, tmp_path, engine=FAKE, log=lines.append)
    assert (s.computed, s.skipped) == (0, 6) and len(_fits(calls())) == 6
    assert "6 already done (skipped), 0 to run" in lines[0]
    # delete one, truncate one (a partial file), one written for another configuration
    gone, broken, other = cells[1], cells[3], cells[4]
    files[gone].unlink()
    files[broken].write_text(before[broken][: len(before[broken]) // 2])
    files[other].write_text(before[other].replace(other.key, "0" * 16))
    n = len(_fits(calls()))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = run_sweep(cells, tmp_path, engine=FAKE, log=_quiet([]))
    assert (s.computed, s.skipped) == (3, 3)
    msgs = [str(x.message) for x in w]
    assert any(str(files[broken]) in m and "unreadable" in m for m in msgs)
    assert any(str(files[other]) in m and "another configuration" in m for m in msgs)
    assert len(_fits(calls())) == n + 3
    for c in cells:   # the same numbers again
        assert json.loads(files[c].read_text())["metrics"] == json.loads(before[c])["metrics"]


def kill_target(out: str) -> None:
    """Entry point of the SIGKILL test's subprocess: a slow fake sweep."""
    cells = expand(_grid(protocol="fewshot", methods=["slow"], shots=[1, 2, 4],
                         datasets=["world:fruit_veg", "world:animals"]), RULES)
    run_sweep(cells, out, engine=FAKE)


def test_sweep_killed_halfway_resumes_with_the_missing_cells(tmp_path, calls, monkeypatch):
    out = tmp_path / "out"
    env = {**os.environ, "FAKE_SWEEP_SLEEP": "0.5"}
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_sweep as t; " \
           f"t.kill_target({str(out)!r})"
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(out.rglob("*.json")):
            assert p.poll() is None, p.stderr.read().decode()
            assert time.time() < deadline, "no cell finished"
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    kept = {f: f.stat().st_mtime_ns for f in out.rglob("*.json")}
    assert 1 <= len(kept) < 6
    n = len(_fits(calls()))
    monkeypatch.setenv("FAKE_SWEEP_SLEEP", "0")
    cells = expand(_grid(protocol="fewshot", methods=["slow"], shots=[1, 2, 4],
                         datasets=["world:fruit_veg", "world:animals"]), RULES)
    lines: list[str] = []
    s = run_sweep(cells, out, engine=FAKE, log=lines.append)
    assert (s.computed, s.skipped) == (6 - len(kept), len(kept))
    assert len(_fits(calls())) == n + 6 - len(kept)
    assert all(f.stat().st_mtime_ns == t for f, t in kept.items())
    assert len(list(out.rglob("*.json"))) == 6


def test_a_failing_cell_does_not_stop_the_others(tmp_path, calls):
    cells = expand(_grid(protocol="fewshot", methods=["flaky"], shots=[1],
                         datasets=["world:fruit_veg", "world:animals", "world:objects"]), RULES)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = run_sweep(cells, tmp_path, engine=FAKE, log=_quiet([]))
    assert s.computed == 2 and len(s.failed) == 1
    assert "world:animals" in s.failed[0][0] and "flaky cannot do animals" in s.failed[0][1]
    msg = [str(x.message) for x in w if "failed" in str(x.message)]
    assert len(msg) == 1 and "world:animals" in msg[0] and "RuntimeError" in msg[0]
    assert not (tmp_path / cells[1].relpath()).exists()
    assert (tmp_path / cells[0].relpath()).exists() and (tmp_path / cells[2].relpath()).exists()


def test_worker_processes_give_the_in_process_numbers(tmp_path, calls):
    cells = expand(_grid(protocol="xd", methods=["prompt", "zs"], seeds=[1],
                         datasets=["world:fruit_veg", "world:animals"]), RULES)
    run_sweep(cells, tmp_path / "one", engine=FAKE, log=_quiet([]))
    lines: list[str] = []
    s = run_sweep(cells, tmp_path / "two", workers=2, engine=FAKE, log=lines.append)
    assert s.computed == len(cells) and not s.failed
    assert "2 worker processes" in lines[0] and len(lines) == len(cells) + 2
    for c in cells:
        a = json.loads((tmp_path / "one" / c.relpath()).read_text())
        b = json.loads((tmp_path / "two" / c.relpath()).read_text())
        assert a["metrics"] == b["metrics"]
    log = calls()
    # one backbone per worker process (+1 for the in-process run); one training under the
    # lock even though both workers started on cells of that training at once
    assert sum(x.startswith("backbone") for x in log) <= 3
    assert sum(x.startswith("train prompt world:source") for x in log) == 2   # one per sweep


# --------------------------------------------------------------------------- reports

def _rec(protocol, method, seed, metrics, shots=16, **where):
    return {"protocol": protocol, "method": method, "seed": seed, "shots": shots,
            "backbone": "builtin", "hparams": {}, "templates": "single", "metrics": metrics,
            **where}


def _write(d: Path, recs: list[dict]) -> None:
    for i, r in enumerate(recs):
        (d / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (d / f"sub{i % 3}" / f"r{i}.json").write_text(json.dumps(r))


def _hm(a, b):
    return 2 * a * b / (a + b)


def test_report_base2new_means_and_harmonic_means(tmp_path, capsys):
    from anyclass.cli.main import main
    from anyclass.eval.report import base2new_table, load_results
    vals = {  # (dataset, method) -> [(base, new) per seed]
        ("world:a", "zs"): [(0.80, 0.60), (0.70, 0.50)],
        ("world:b", "zs"): [(0.90, 0.30), (0.50, 0.30)],
        ("world:a", "coop"): [(0.95, 0.40), (0.85, 0.40)],
        ("world:b", "coop"): [(0.99, 0.20), (0.97, 0.10)],
    }
    recs = [_rec("base2new", m, s + 1, {"base_acc1": b, "new_acc1": n, "hm": _hm(b, n)},
                 dataset=d) for (d, m), pairs in vals.items() for s, (b, n) in enumerate(pairs)]
    _write(tmp_path / "res", recs)
    (tmp_path / "res" / ".r9.json.tmp123").write_text("{half")       # a write in progress
    results = load_results([tmp_path / "res"])
    assert len(results) == 8
    t = base2new_table(results)
    assert t.columns == ["zs Base", "zs New", "zs HM", "coop Base", "coop New", "coop HM"]
    rows = {lab[0]: v for lab, v in t.rows}
    assert list(rows) == ["a", "b", "Average"]
    zb, zn = (0.80 + 0.70) / 2, (0.60 + 0.50) / 2
    assert rows["a"][0].mean == pytest.approx(zb) and rows["a"][1].mean == pytest.approx(zn)
    assert rows["a"][0].std == pytest.approx(0.05)      # population std of 0.8, 0.7
    assert rows["a"][2].mean == pytest.approx(_hm(zb, zn))
    # Average: mean Base and mean New over datasets, HM of those (not the mean of HMs)
    cb = ((0.95 + 0.85) / 2 + (0.99 + 0.97) / 2) / 2
    cn = ((0.40 + 0.40) / 2 + (0.20 + 0.10) / 2) / 2
    avg = rows["Average"]
    assert avg[3].mean == pytest.approx(cb) and avg[4].mean == pytest.approx(cn)
    assert avg[5].mean == pytest.approx(_hm(cb, cn))
    md = t.to_markdown()
    assert f"{100 * zb:.2f} ± 5.00" in md and f"{100 * _hm(cb, cn):.2f} |" in md
    # the CLI: markdown printed, table_base2new.md/.csv written, CSV parses to the numbers
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "rep")]) == 0
    assert "Average" in capsys.readouterr().out
    rows_csv = list(csv.DictReader(io.StringIO((tmp_path / "rep" / "table_base2new.csv")
                                               .read_text())))
    last = rows_csv[-1]
    assert last["dataset"] == "Average"
    assert float(last["coop HM"]) == pytest.approx(100 * _hm(cb, cn), abs=1e-3)
    assert float(rows_csv[0]["zs Base std"]) == pytest.approx(5.0, abs=1e-3)
    assert (tmp_path / "rep" / "table_base2new.md").read_text().startswith("## Base-to-new")


def test_report_fewshot_table_and_plot(tmp_path):
    from anyclass.eval.report import fewshot_table, write_report
    recs = [_rec("fewshot", "zs", 1, {"acc1": 0.5}, shots=0, dataset="world:a"),
            _rec("fewshot", "zs", 1, {"acc1": 0.3}, shots=0, dataset="world:b")]
    acc = {("world:a", 1): [0.40, 0.50], ("world:a", 4): [0.70, 0.72],
           ("world:b", 1): [0.20, 0.30], ("world:b", 4): [0.60, 0.60]}
    for (d, k), xs in acc.items():
        recs += [_rec("fewshot", "coop", s + 1, {"acc1": x}, shots=k, dataset=d)
                 for s, x in enumerate(xs)]
    t = fewshot_table(recs)
    assert t.columns == ["0-shot", "1-shot", "4-shot"]
    rows = {tuple(lab): v for lab, v in t.rows}
    assert rows[("a", "coop")][1].mean == pytest.approx(0.45)
    assert rows[("a", "coop")][0] is None and rows[("a", "zs")][1] is None
    assert rows[("Average", "coop")][1].mean == pytest.approx((0.45 + 0.25) / 2)
    assert rows[("Average", "coop")][2].mean == pytest.approx((0.71 + 0.60) / 2)
    assert rows[("Average", "zs")][0].mean == pytest.approx(0.4)
    written = write_report(recs, tmp_path / "rep")
    png = tmp_path / "rep" / "plot_fewshot.png"
    assert png in written and png.stat().st_size > 5000
    parsed = list(csv.reader(io.StringIO((tmp_path / "rep" / "table_fewshot.csv").read_text())))
    assert parsed[0] == ["dataset", "method", "0-shot", "0-shot std", "1-shot", "1-shot std",
                         "4-shot", "4-shot std"]
    assert len(parsed) == 1 + 4 + 2
    # an unfinished sweep: world:c has coop at 1 shot only -> averages over a and b, and say so
    part = fewshot_table(recs + [_rec("fewshot", "coop", 1, {"acc1": 0.9}, shots=1,
                                      dataset="world:c")])
    rows = {tuple(lab): v for lab, v in part.rows}
    avg = "Average (2 of 3 datasets with every cell)"
    assert rows[(avg, "coop")][1].mean == pytest.approx((0.45 + 0.25) / 2)
    assert rows[(avg, "zs")][0].mean == pytest.approx(0.4)
    assert ("Average", "coop") not in rows


@pytest.mark.parametrize("protocol", ["xd", "dg"])
def test_report_transfer_tables_average_over_targets(protocol):
    from anyclass.eval.report import transfer_table
    targets = (["world:a", "world:b"] if protocol == "xd"
               else ["world:source@sketch", "world:source@v2"])
    acc = {"world:source": [0.8, 0.9], targets[0]: [0.4, 0.5], targets[1]: [0.2, 0.2]}
    recs = [_rec(protocol, m, s + 1, {"acc1": x - (0.1 if m == "zs" else 0)},
                 source="world:source", target=t)
            for m in ("coop", "zs") for t, xs in acc.items() for s, x in enumerate(xs)]
    t = transfer_table(recs, protocol)
    assert t.columns == ["source"] + [x.removeprefix("world:") for x in targets] + ["Average"]
    rows = {tuple(lab): v for lab, v in t.rows}
    coop = rows[("source", "coop")]
    assert coop[0].mean == pytest.approx(0.85) and coop[1].mean == pytest.approx(0.45)
    assert coop[3].mean == pytest.approx((0.45 + 0.2) / 2)       # the source excluded
    assert rows[("source", "zs")][3].mean == pytest.approx((0.35 + 0.1) / 2)


def test_report_keeps_single_run_files_working(tmp_path, capsys):
    from anyclass.cli.main import main
    single = {"dataset": "world:a@sketch", "backbone": "builtin", "method": "zeroshot",
              "shots": 0, "seed": 1, "metrics": {"acc1": 0.5, "acc5": 0.9,
                                                  "mean_per_class_recall": 0.5},
              "num_classes": 10, "chance_acc1": 0.1}
    f = tmp_path / "one.json"
    f.write_text(json.dumps(single))
    assert main(["report", str(f), "--plot", str(tmp_path / "bars.png")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| dataset | classes | chance | zeroshot |") and "50.0" in out
    assert (tmp_path / "bars.png").stat().st_size > 1000
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    assert "not a result file" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real path
# zeroshot and tip-adapter on the mini world through anyclass.eval.fitting

@pytest.fixture(scope="module")
def world(mini_world):
    return mini_world


def _real_cells() -> list[Cell]:
    return expand(_grid(protocol="fewshot", methods=["zeroshot", "tip-adapter"], shots=[2],
                        datasets=["world:fruit_veg", "world:animals"]))


def _metrics(out: Path, cells: list[Cell]) -> dict:
    return {c.key: json.loads((out / c.relpath()).read_text())["metrics"] for c in cells}


@pytest.fixture(scope="module")
def in_process(world, tmp_path_factory):
    """The real cells computed in this process: the numbers other executors must give."""
    out = tmp_path_factory.mktemp("in-process")
    cells = _real_cells()
    s = run_sweep(cells, out, log=_quiet([]))
    assert s.computed == len(cells) == 4 and not s.failed
    return _metrics(out, cells)


def test_base2new_zeroshot_matches_independent_computation(world, tmp_path):
    import torch
    from anyclass.backbones.factory import create_backbone
    from anyclass.data.images import load_image
    from anyclass.data.sources import load_dataset
    cells = expand(_grid(protocol="base2new", methods=["zeroshot"],
                         datasets=["world:fruit_veg"]))
    assert run_sweep(cells, tmp_path, log=_quiet([])).computed == 1
    rec = json.loads((tmp_path / cells[0].relpath()).read_text())
    # independent: encode the test images and the prompts of each half of the classes
    bb = create_backbone("builtin")
    ds = load_dataset("world:fruit_veg", "test")
    k = len(ds.classnames)
    labels = torch.tensor(ds.labels)
    with torch.no_grad():
        f = bb.encode_images(torch.stack([bb.preprocess(load_image(p)) for p in ds.paths]))
        acc = {}
        for part, cls in (("base", list(range((k + 1) // 2))),
                          ("new", list(range((k + 1) // 2, k)))):
            t = bb.encode_texts([f"a photo of a {ds.classnames[c]}." for c in cls])
            keep = torch.isin(labels, torch.tensor(cls))
            pred = torch.tensor(cls)[(f[keep] @ t.T).argmax(1)]
            acc[part] = pred.eq(labels[keep]).float().mean().item()
    m = rec["metrics"]
    assert m["base_acc1"] == pytest.approx(acc["base"], abs=1e-6)
    assert m["new_acc1"] == pytest.approx(acc["new"], abs=1e-6)
    assert m["hm"] == pytest.approx(2 * acc["base"] * acc["new"] / (acc["base"] + acc["new"]))
    assert rec["evaluation"]["base"]["classes"] == ds.classnames[: (k + 1) // 2]


def test_worker_processes_real_numbers(in_process, tmp_path):
    cells = _real_cells()
    s = run_sweep(cells, tmp_path, workers=2, log=_quiet([]))
    assert s.computed == 4 and not s.failed
    assert _metrics(tmp_path, cells) == in_process


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 ** 2,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_gives_the_in_process_numbers(in_process, local_ray, tmp_path):
    cells = _real_cells()
    lines: list[str] = []
    s = run_sweep(cells, tmp_path, ray="auto", log=lines.append)
    assert s.computed == 4 and not s.failed, s.failed
    assert "Ray (auto)" in lines[0]
    assert _metrics(tmp_path, cells) == in_process


def test_cli_sweep_report_and_failures(world, tmp_path, capsys, monkeypatch):
    from anyclass.cli.main import main
    from anyclass.eval import fitting
    out = tmp_path / "out"
    assert main(["sweep", "--protocol", "base2new", "--methods", "zeroshot,tip-adapter",
                 "--datasets", "world:fruit_veg", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: method 'tip-adapter' cannot score classes it was not trained on, so it has "
        "no base2new result")
    assert not out.exists()
    real = fitting.fit_on

    def failing(method, backbone, dataset, **kw):
        if dataset == "world:animals":
            raise AnyclassError("no animals today")
        return real(method, backbone, dataset, **kw)
    monkeypatch.setattr(fitting, "fit_on", failing)
    argv = ["sweep", "--protocol", "fewshot", "--methods", "zeroshot", "--seeds", "1",
            "--datasets", "world:fruit_veg,world:animals", "--out", str(out)]
    assert main(argv) == 1
    cap = capsys.readouterr()
    assert "error: 1 cells failed" in cap.err
    assert "cell fewshot zeroshot world:animals shots=0 seed=1 failed: AnyclassError: no " \
           "animals today" in cap.err
    assert "[1/2] fewshot zeroshot world:fruit_veg shots=0 seed=1: acc1" in cap.out
    monkeypatch.setattr(fitting, "fit_on", real)
    assert main(argv) == 0
    assert "2 cells, 1 already done (skipped), 1 to run" in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert "## Few-shot (acc1, %)" in text and "| Average | zeroshot |" in text
    assert (tmp_path / "rep" / "plot_fewshot.png").exists()
