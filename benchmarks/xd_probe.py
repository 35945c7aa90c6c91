"""Why source-trained prompts do not beat zero-shot in the world's cross-dataset / DG tables
(docs/benchmarks.md): does training on `world:source` raise the source accuracy at all, and
does what is learned on the source carry over to its shifted domains?

Rows (built-in model, seed 1; every row evaluated on the source test split and the four
shifted domains' test splits, 6,360 images each):
1. zero-shot ("a photo of a {}.");
2. linear probe, 16 shots (CLIP's protocol) — fits the source much better than any prompt:
   does a better source fit move the shifted domains?
3. CoOp as in the xd table (M = 16 random context, 4 shots, 5 epochs) — from the sweep's state;
4. CoOp, same budget, M = 4 initialised from "a photo of a" — starts at zero-shot;
5. CoOp as in row 3 with 16 shots (4x the steps; the state benchmarks/tta_world.py's DG uses);
6. MaPLe, 16 shots, 2 epochs, depth 3 (the recipe PromptAlign starts from; cached by eval/tta).

    OMP_NUM_THREADS=1 python benchmarks/xd_probe.py [--out runs/bench-prompt/xd_probe.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from anyclass.backbones.factory import create_backbone
from anyclass.eval.fitting import Fitted, fit_on
from anyclass.eval.tta import world_source_prompts
from anyclass.methods.prompted import load_prompts, read_prompt_file
from anyclass.methods.training import bf16_pays

DOMAINS = ["", "@sketch", "@rendition", "@v2", "@adversarial"]
XD = dict(epochs=5, amp=bf16_pays(), crop_scale=[0.5, 1.0])      # the xd table's CoOp schedule


def scores(fitted: Fitted) -> dict[str, float]:
    return {(d or "colour").lstrip("@"): round(100 * fitted.evaluate("world:source" + d,
                                                                       progress=False)["metrics"]["acc1"], 2)
            for d in DOMAINS}


def history(f: Fitted) -> list:
    return [(r["epoch"], round(r["loss"], 3), round(100 * r["val_acc1"], 2))
            for r in getattr(f.estimator, "history_", [])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-prompt/xd_probe.json")
    ap.add_argument("--states", default="runs/bench-prompt/states")
    args = ap.parse_args()
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    bb = create_backbone("builtin")
    states = Path(args.states)

    def row(name: str, make) -> None:
        if name in res:
            return
        f = make()
        res[name] = {"acc1": scores(f), "history": history(f)}
        print(name, res[name], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))

    row("zeroshot", lambda: fit_on("zeroshot", bb, "world:source", shots=0, seed=1, progress=False))
    row("linear-probe 16-shot", lambda: fit_on("linear-probe", bb, "world:source", shots=16,
                                                seed=1, progress=False))
    # the xd table's own CoOp state (same key as the sweep: reused, not retrained)
    coop_state = sorted((states / "coop" / "world-source").glob("shots4-seed1-*.safetensors"))
    row("coop M=16 random, 4-shot, 5 ep (xd table)",
        lambda: fit_on("coop", bb, "world:source", shots=4, seed=1, hparams=XD,
                       state_path=coop_state[0] if coop_state else None, progress=False))
    row("coop M=4 'a photo of a', 4-shot, 5 ep",
        lambda: fit_on("coop", bb, "world:source", shots=4, seed=1,
                       hparams={**XD, "n_ctx": 4, "ctx_init": "a photo of a"}, progress=False))

    # 4x the steps (16 shots): the CoOp that benchmarks/tta_world.py's DG rows start from
    tta_coop = Path("runs/tta-world/states/coop-source-s1.safetensors")
    tta_coop.parent.mkdir(parents=True, exist_ok=True)
    row("coop M=16 random, 16-shot, 5 ep", lambda: fit_on("coop", bb, "world:source", shots=16,
                                                           seed=1, hparams=XD, state_path=tta_coop,
                                                           progress=False))

    def maple16() -> Fitted:
        p = world_source_prompts(bb, seed=1, progress=False)
        names = json.loads(read_prompt_file(p)[1]["classnames"])
        return Fitted("maple", bb, names, load_prompts(p, bb, names))
    row("maple 16-shot, 2 ep, depth 3 (TTA init)", maple16)

    doms = [(d or "colour").lstrip("@") for d in DOMAINS]
    print("| row | " + " | ".join(doms) + " | shifted mean |")
    print("|---|" + "---|" * (len(doms) + 1))
    for name, r in res.items():
        a = r["acc1"]
        shifted = sum(a[d] for d in doms[1:]) / (len(doms) - 1)
        print(f"| {name} | " + " | ".join(f"{a[d]:.2f}" for d in doms) + f" | {shifted:.2f} |")


if __name__ == "__main__":
    main()
