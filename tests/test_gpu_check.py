"""benchmarks/gpu_check.py runs end to end in its dry-run size on the CPU, so the one script
a lent GPU machine runs is known to work before the minutes are spent."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run",
                        "--device", "cpu", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(out.read_text())
    assert json.loads(p.stdout) == d and d["dry_run"] is True and d["device"] == "cpu"
    ex = d["extraction"]
    assert "error" not in ex, ex
    assert ex["images"] == 8 and ex["image_size"] == 224 and ex["amp"] == "off"
    assert ex["bare_img_s"] > 0 and ex["end_to_end_img_s"] > 0 and ex["ratio_median_of_pairs"] > 0
    tx = d["tipx_search"]
    assert "error" not in tx, tx
    assert tx["grid"] == [20, 200, 50] and tx["points"] == 200_000
    assert 0.0 < tx["acc1"] <= 100.0 and len(tx["pick"]) == 3
    tt = d["tta_batched_ratio"]
    assert "error" not in tt, tt
    assert set(tt["methods"]) == {"tpt", "promptalign", "promptsync"} and tt["views"] == 10
    for name, r in tt["methods"].items():
        assert r["same_predictions"] and r["ratio"] > 0 and r["batched_s_per_image"] > 0, (name, r)
    assert tt["min_ratio"] == min(r["ratio"] for r in tt["methods"].values())
    pm = d["prompt_methods"]
    assert set(pm["methods"]) == {"coop", "cocoop", "vpt", "maple", "apex"}
    for name, r in pm["methods"].items():
        assert "error" not in r and r["ratio"] > 0, (name, r)
    assert pm["min_ratio"] == min(r["ratio"] for r in pm["methods"].values())


def test_gpu_check_refuses_a_full_run_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "error: no CUDA device; run with --dry-run" in p.stderr
