"""benchmarks/prompt_cost.py in its quick mode on the mini world: one table row per method,
parameter counts equal to counts made here from the method definitions and the backbone's
widths, and timings that are positive numbers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("prompt_cost", REPO / "benchmarks" / "prompt_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def expected_counts(bb, k: int) -> dict[str, int]:
    """Learned parameters from each method's definition (its default hyperparameters)."""
    w, vw, d = bb.text_width, bb.vision_width, bb.embed_dim
    lv, lt = bb.vision_layers, bb.text_layers
    j = min(9, lv, lt)                                     # MaPLe's prompt depth J
    return {
        "coop": 16 * w,                                    # n_ctx x text_width
        "cocoop": 4 * w + (d * (d // 16) + d // 16) + ((d // 16) * w + w),
        "vpt": lv * 8 * vw,                                 # every layer, 8 tokens
        "maple": j * 2 * w + j * (w * vw + vw),            # P_0..P_{J-1} + J couplings
        "apex": 2 * w + lv * 2 * vw + d * d + d,           # ctx + depth x tokens x width + adapter
        "linear-probe": d * k + k,
    }


@pytest.mark.slow
def test_prompt_cost_quick_table(mini_world, tmp_path, capsys):
    pc = _script()
    out = tmp_path / "cost.json"
    res = pc.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["methods"].keys() == res["methods"].keys()
    names = ["coop", "cocoop", "vpt", "maple", "apex", "linear-probe"]
    assert list(res["methods"]) == names
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| method |") and "ratio (median of pairs)" in rows[0]
    body = {r.split("|")[1].strip(): r for r in rows[1:]}
    assert list(body) == names                              # one row per method, nothing else
    bb = pc._quiet_backbone("builtin")
    want = expected_counts(bb, pc.K_COUNT)
    for name in names:
        r = res["methods"][name]
        assert r["learned_builtin"] == want[name], name
        assert f"| {want[name]:,} |" in body[name]
        assert "learned_vitb16" not in r                    # quick: builtin only
        b = r["builtin"]
        assert b["infer_img_s"] > 0 and b["infer_batch"] == 128
        if name != "linear-probe":
            assert len(b["loop_s"]) == len(b["bare_s"]) == 2 and b["warm"] == 1
            assert b["loop_img_s"] > 0 and b["bare_img_s"] > 0 and b["ratio"] > 0
            assert b["ratio_median_of_pairs"] > 0
    assert res["methods"]["cocoop"]["builtin"]["batch"] == 1          # the recipes' batches
    assert res["methods"]["coop"]["builtin"]["batch"] == 32
    assert res["methods"]["apex"]["builtin"]["batch"] == 16
