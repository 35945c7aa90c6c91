"""What each prompt-learning method costs: learned parameters, training images/s of the real
loop, the loop's overhead over a bare forward + backward, and inference images/s.

    python benchmarks/prompt_cost.py [--json runs/prompt_cost.json]          # full table
    python benchmarks/prompt_cost.py --quick                                  # 2 timed steps, builtin only
    python benchmarks/prompt_cost.py --no-openclip-steps                      # skip the ViT-B/16 CPU steps

Columns (methods coop, cocoop, vpt, maple, apex at their defaults; linear-probe where it applies):
- learned parameters: `est.n_learned()` after `est.prepare(backbone, K class names)`, K = 100,
  on the built-in model and on open_clip ViT-B-16 (random weights: same shapes); beside the
  ViT-B/16 count, the number the papers report (`PAPER`). No prompt method here has
  class-specific parameters, so the prompt counts do not depend on K; linear-probe's do (D·K + K).
- training images/s: `fit_prompts` itself (`method.fit`) on the built-in model, world:fruit_veg
  (base classes, 16 shots, seed 1, select="last" so no val pass), batch = the method's recipe
  batch. `encode_classes` is wrapped on the instance: the loop calls it once per step, so the
  time between two calls is one full step (batch indexing, transfer, augmentation, class
  encoding, forward, loss, zero_grad, backward, optimiser step, loss read-back). After
  `--warm` steps, `--steps` steps are timed and the fit is stopped.
- ratio = bare step time / loop step time (medians): bare = the method's own `encode_classes`
  + `forward` + cross-entropy + backward on one already-augmented batch already on the device
  (no data movement, no augmentation, no optimiser). The bare step runs inside the same wrapper
  just before each timed loop step (bare, loop, bare, loop ...), so machine noise hits both; the
  loop step is timed from the end of the bare step to the next loop step. Its gradients are
  discarded by the loop's own `zero_grad(set_to_none=True)`. 1.0 = the loop adds nothing;
  target ≥ 0.8 (the loop adds ≤ 25 %). Two summaries: the median over pairs of bare/loop
  (each pair adjacent in time, so it cancels load changes: the headline) and median bare /
  median loop (misleads when a shared machine switches between a fast and a slow regime
  during the run: the two medians can then fall in different regimes).
- inference images/s: `predict_logits` on 128 preprocessed test images, the class encoding
  computed once (as eval/fitting.py does), median of `--infer-reps`.
- ViT-B/16 on CPU (224 px): the step ratio with batch `--openclip-batch` (4) and 10 classes,
  every method at that batch (CoCoOp's recipe batch is 1). Its inference and the recipe
  batches on the real-size model are timed on a GPU by benchmarks/gpu_check.py
  (`prompt_methods`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

PROMPT_METHODS = ("coop", "cocoop", "vpt", "maple", "apex")
OPENCLIP = "openclip:ViT-B-16@random"
K_COUNT = 100

#: learned parameters the papers report for CLIP ViT-B/16 (None: not reported / not found)
PAPER = {
    "coop": (8_192, "CoOp (Zhou et al., IJCV 2022): default context length M=16, x 512 = 8.2K "
                    "(the product, not a number quoted from a table)"),
    "cocoop": (35_360, "MaPLe (Khattak et al., CVPR 2023), its comparison of prompting cost: "
                       "CoCoOp 35.36K (M=4 context + Meta-Net 512-32-512); table not retrieved "
                       "here, checked by arithmetic"),
    "vpt": (None, "not reported as a count: the MaPLe/APEX comparisons run 'deep vision "
                  "prompting' with 8 tokens at all 12 layers (MaPLe repo configs/trainers/VPT/"
                  "vit_b16_c2_ep5_batch4_4.yaml: N_CTX_VISION 8, PROMPT_DEPTH_VISION 12) = "
                  "12 x 8 x 768 = 73.7K"),
    "maple": (3_550_000, "MaPLe (Khattak et al., CVPR 2023), its comparison of prompting cost: "
                         "3.55M (J=9 couplings Linear(512, 768) are 3,545,856 of it); table not "
                         "retrieved here, checked by arithmetic"),
    "apex": (None, "no count found in the APEX paper (arXiv 2311.15569 / EMNLP 2024) in the "
                   "sources reachable here; the official code (YangYongJin/APEX trainers/apex.py, "
                   "config vit_b16_c2_ep15_batch16_2+2ctx.yaml) learns 2 text tokens x 512, "
                   "12 x 2 x 768 visual prompts and a 512x512 adapter + bias = 282,112"),
    "linear-probe": (None, "CLIP (Radford et al. 2021) App. A.3: D·K + K (not a fixed count)"),
}


class _Enough(Exception):
    """Raised from inside the loop once the timed steps are done."""


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _quiet_backbone(spec: str, device=None):
    from anyclass.backbones.factory import create_backbone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # random weights warn, as open_clip does
        return create_backbone(spec, device)


def classnames(k: int) -> list[str]:
    words = ["apple", "boat", "cat", "drum", "eagle", "fern", "guitar", "house", "igloo", "jar"]
    return [f"{words[i % len(words)]} {i // len(words)}" if i >= len(words) else words[i]
            for i in range(k)]


# ------------------------------------------------------------------------------ parameters

def learned_parameters(name: str, bb, k: int = K_COUNT) -> int:
    """`n_learned()` of a prompt method prepared for k classes; linear-probe: its fitted W_, b_."""
    from anyclass.methods import create_method
    if name == "linear-probe":
        from anyclass.methods.base import FeatureSet
        d = int(bb.embed_dim)
        gen = torch.Generator().manual_seed(0)
        x = F.normalize(torch.randn(2 * k, d, generator=gen), dim=-1)
        y = torch.arange(2 * k) % k
        est = create_method("linear-probe", C=1.0, max_iter=5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")           # max_iter=5: only the shapes matter here
            est.fit(torch.zeros(d, k), train=FeatureSet(x, y))
        return int(est.W_.numel() + est.b_.numel())
    est = create_method(name)
    est.prepare(bb, classnames(k))
    return int(est.n_learned())


def formula(name: str, bb, k: int = K_COUNT) -> tuple[int, str]:
    """The count from the method's definition and the backbone's widths (an independent check)."""
    w, vw, d = bb.text_width, bb.vision_width, bb.embed_dim
    lv, lt = bb.vision_layers, bb.text_layers
    if name == "coop":
        return 16 * w, f"16 ctx x {w}"
    if name == "cocoop":
        h = d // 16
        return 4 * w + d * h + h + h * w + w, f"4 ctx x {w} + Meta-Net {d}-{h}-{w}"
    if name == "vpt":
        return lv * 8 * vw, f"{lv} layers x 8 tokens x {vw}"
    if name == "maple":
        j = min(9, lv, lt)
        return 2 * w + (j - 1) * 2 * w + j * (w * vw + vw), \
            f"{j} x 2 tokens x {w} + {j} couplings {w}->{vw}"
    if name == "apex":
        return 2 * w + lv * 2 * vw + d * d + d, f"2 ctx x {w} + {lv} x 2 x {vw} + adapter {d}^2+{d}"
    if name == "linear-probe":
        return d * k + k, f"{d} x K + K, K={k}"
    raise KeyError(name)


# ------------------------------------------------------------------------------ data

def world_task(dataset: str, shots: int, seed: int = 1, n_classes: int | None = None):
    """(train, test) of the base classes (or the first n_classes) of a world task."""
    from anyclass.data.fewshot import base_new_split, sample_few_shot, subset_classes
    from anyclass.data.sources import load_dataset
    full = load_dataset(dataset, "train")
    classes = list(range(n_classes)) if n_classes else base_new_split(full.classnames)[0]
    train = sample_few_shot(subset_classes(full, classes), shots, seed)
    test = subset_classes(load_dataset(dataset, "test"), classes)
    return train, test


def inference_batch(bb, ds, n: int = 128) -> torch.Tensor:
    from anyclass.methods.training import load_images
    x, _ = load_images(bb, ds, progress=False)
    while len(x) < n:
        x = torch.cat([x, x])
    return x[:n].contiguous()


# ------------------------------------------------------------------------------ timing

def time_steps(name: str, bb, train, warm: int, steps: int, batch: int | None = None,
               hparams: dict | None = None) -> tuple[object, dict]:
    """Run the real `fit_prompts` for warm + steps steps, a bare step before each (see the
    module docstring). Returns the (partly trained) estimator and the raw timings."""
    from anyclass.methods import create_method
    from anyclass.methods.training import _autocast, augment, load_images
    hp = {"select": "last", **(hparams or {})}
    if batch is not None:
        hp["batch_size"] = int(batch)
    est = create_method(name, **hp)
    bs = int(est.batch_size)
    if bs > len(train):
        raise SystemExit(f"{name}: batch {bs} > {len(train)} training images")
    device = torch.device(bb.device)
    names = list(train.classnames)
    x, y = load_images(bb, train, progress=False)
    g = torch.Generator().manual_seed(123)
    idx = torch.randperm(len(x), generator=g)[:bs]
    xb = augment(x[idx].to(device), g, est.crop_scale)            # already augmented, on device
    yb = y[idx].to(device)
    del x
    original = est.encode_classes                                   # bound method
    state = {"n": 0, "start": None}
    loop_s: list[float] = []
    bare_s: list[float] = []

    def bare() -> float:
        _sync(device)
        t = time.perf_counter()
        with _autocast(device, est.amp):
            classes = original(bb, names)
            logits = est.forward(bb, xb, classes)
        F.cross_entropy(logits.float(), yb).backward()
        _sync(device)
        return time.perf_counter() - t

    def wrapped(backbone, cn):
        if not torch.is_grad_enabled():                           # an evaluation pass
            return original(backbone, cn)
        _sync(device)
        now = time.perf_counter()
        i = state["n"]
        if state["start"] is not None and i > warm:
            loop_s.append(now - state["start"])
        if i >= warm + steps:
            raise _Enough
        b = bare()
        if i >= warm:
            bare_s.append(b)
        state["n"] = i + 1
        state["start"] = time.perf_counter()
        return original(backbone, cn)

    est.encode_classes = wrapped                                    # instance attribute
    try:
        est.fit(bb, train, None, progress=False)
        raise RuntimeError(f"{name}: the fit ended before {warm + steps} steps "
                           f"({len(train)} images, batch {bs}); raise epochs")
    except _Enough:
        pass
    finally:
        del est.encode_classes
    est.module_.eval()
    for p in est.module_.parameters():
        p.grad = None
    lm, bm = statistics.median(loop_s), statistics.median(bare_s)
    pairs = [b / lo for b, lo in zip(bare_s, loop_s)]
    return est, {"batch": bs, "classes": len(names), "train_images": len(train),
                 "warm": warm, "steps": steps, "loop_s": [round(v, 6) for v in loop_s],
                 "bare_s": [round(v, 6) for v in bare_s],
                 "loop_step_s": round(lm, 6), "bare_step_s": round(bm, 6),
                 "loop_img_s": round(bs / lm, 2), "bare_img_s": round(bs / bm, 2),
                 "ratio": round(bm / lm, 3),
                 "ratio_median_of_pairs": round(statistics.median(pairs), 3)}


def time_inference(est, bb, x: torch.Tensor, names: list[str], reps: int,
                   amp: bool = False) -> dict:
    """predict_logits on the batch x, the class encoding computed once (eval/fitting.py; no
    autocast there). amp=True: the same under bfloat16 autocast (CUDA only)."""
    device = torch.device(bb.device)
    on = amp and device.type == "cuda"
    xd = x.to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=on):
        classes = est.encode_classes(bb, names)
    ts = []
    for _ in range(reps + 1):                                      # the first one warms up
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on):
            est.predict_logits(bb, xd, names, classes=classes)
        _sync(device)
        ts.append(time.perf_counter() - t)
    m = statistics.median(ts[1:])
    return {"infer_batch": len(x), "infer_s": [round(v, 5) for v in ts[1:]],
            "infer_img_s": round(len(x) / m, 1)}


def time_probe_inference(bb, x: torch.Tensor, k: int, reps: int) -> dict:
    """linear-probe at test time: the frozen image tower, then f W + b."""
    from anyclass.methods import create_method
    from anyclass.methods.base import FeatureSet
    d = int(bb.embed_dim)
    est = create_method("linear-probe", C=1.0, max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(torch.zeros(d, k), train=FeatureSet(F.normalize(torch.randn(k, d), dim=-1),
                                                    torch.arange(k)))
    device = torch.device(bb.device)
    xd = x.to(device)
    ts = []
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            est.predict_logits(bb.encode_images(xd))
        _sync(device)
        ts.append(time.perf_counter() - t)
    m = statistics.median(ts[1:])
    return {"infer_batch": len(x), "infer_s": [round(v, 5) for v in ts[1:]],
            "infer_img_s": round(len(x) / m, 1)}


# ------------------------------------------------------------------------------ runs

def run(a) -> dict:
    torch.manual_seed(0)
    out: dict = {"machine": machine(), "command": " ".join(["python"] + sys.argv),
                 "quick": bool(a.quick), "k_for_counts": K_COUNT, "methods": {}}
    t0 = time.perf_counter()
    bb = _quiet_backbone("builtin")
    out["builtin"] = {"identity": bb.identity, "dataset": a.dataset, "shots": a.shots}
    vit = None if a.quick else _quiet_backbone(OPENCLIP, "cpu")
    train, test = world_task(a.dataset, a.shots)
    out["builtin"]["classes"] = len(train.classnames)
    x_inf = inference_batch(bb, test, a.infer_batch)
    names = list(train.classnames)
    for name in (*PROMPT_METHODS, "linear-probe"):
        r: dict = {"learned_builtin": learned_parameters(name, bb),
                   "formula_builtin": formula(name, bb)[0]}
        if vit is not None:
            r["learned_vitb16"] = learned_parameters(name, vit)
            r["formula_vitb16"], r["formula"] = formula(name, vit)
        r["paper_vitb16"], r["paper_source"] = PAPER[name]
        if name in PROMPT_METHODS:
            est, steps = time_steps(name, bb, train, a.warm, a.steps)
            r["builtin"] = {**steps, **time_inference(est, bb, x_inf, names, a.infer_reps)}
        else:
            r["builtin"] = time_probe_inference(bb, x_inf, len(names), a.infer_reps)
        out["methods"][name] = r
        print(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'paper_source'})}",
              file=sys.stderr, flush=True)
    if vit is not None and a.openclip_steps:
        otrain, _ = world_task(a.dataset, a.openclip_shots, n_classes=a.openclip_classes)
        out["vitb16_cpu"] = {"backbone": OPENCLIP, "image_size": 224,
                             "batch": a.openclip_batch, "classes": a.openclip_classes,
                             "methods": {}}
        for name in PROMPT_METHODS:
            _, steps = time_steps(name, vit, otrain, a.openclip_warm, a.openclip_timed,
                                  batch=a.openclip_batch)
            out["vitb16_cpu"]["methods"][name] = steps
            print(f"{name} ViT-B/16 CPU: {json.dumps(steps)}", file=sys.stderr, flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _k(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 1_000_000:
        return f"{n / 1e6:.3g}M"
    if n >= 1_000:
        return f"{n / 1e3:.4g}K"
    return str(n)


def table(res: dict) -> str:
    vit = any("learned_vitb16" in r for r in res["methods"].values())
    head = ["method", "batch", "learned (builtin)"]
    if vit:
        head += ["learned (ViT-B/16)", "paper (ViT-B/16)"]
    head += ["train img/s (loop)", "bare img/s", "ratio (median of pairs)",
             "ratio (median/median)", "infer img/s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res["methods"].items():
        b = r["builtin"]
        cells = [name, str(b.get("batch", "—")), f"{r['learned_builtin']:,}"]
        if vit:
            cells += [f"{r['learned_vitb16']:,}", _k(r["paper_vitb16"])]
        if "loop_img_s" in b:
            cells += [f"{b['loop_img_s']:.3g}", f"{b['bare_img_s']:.3g}",
                      f"{b['ratio_median_of_pairs']:.2f}", f"{b['ratio']:.2f}"]
        else:
            cells += ["— (cached features)", "—", "—", "—"]
        cells.append(f"{b['infer_img_s']:.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    text = "\n".join(rows)
    if "vitb16_cpu" in res:
        v = res["vitb16_cpu"]
        rows = [f"\nViT-B/16@random on CPU, 224 px, batch {v['batch']}, K={v['classes']}:\n",
                "| method | loop s/step | bare s/step | ratio (median of pairs) | "
                "ratio (median/median) |",
                "|---|---|---|---|---|"]
        for name, s in v["methods"].items():
            rows.append(f"| {name} | {s['loop_step_s']:.2f} | {s['bare_step_s']:.2f} | "
                        f"{s['ratio_median_of_pairs']:.2f} | {s['ratio']:.2f} |")
        text += "\n" + "\n".join(rows)
    return text


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="builtin only, 1 warm-up + 2 timed steps, 2 inference repeats (tests)")
    ap.add_argument("--dataset", default="world:fruit_veg")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="timed loop steps per method")
    ap.add_argument("--infer-batch", type=int, default=128)
    ap.add_argument("--infer-reps", type=int, default=5)
    ap.add_argument("--no-openclip-steps", dest="openclip_steps", action="store_false")
    ap.add_argument("--openclip-batch", type=int, default=4)
    ap.add_argument("--openclip-classes", type=int, default=10)
    ap.add_argument("--openclip-shots", type=int, default=4)
    ap.add_argument("--openclip-warm", type=int, default=1)
    ap.add_argument("--openclip-timed", type=int, default=4)
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument("--from-json", default=None, help="print the table of a saved run, run nothing")
    a = ap.parse_args(argv)
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        print(table(res))
        print(f"\n{res['machine']}; {res['seconds']} s; {res['command']}")
        return res
    if a.quick:
        a.warm, a.steps, a.infer_reps = 1, 2, 2
    res = run(a)
    print(table(res))
    print(f"\n{res['machine']}; {res['seconds']} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
