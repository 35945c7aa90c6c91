"""Every GPU measurement the docs lack, in one run that prints one JSON (for the few minutes a
GPU machine is lent; issue 12, item 3). Each part has its own time budget and its result or
the reason it was skipped; the whole run stays under 8 minutes on one GPU.

    python benchmarks/gpu_check.py [--out runs/gpu_check.json]   # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run                      # tiny sizes, any device (tested)

Parts:
- `extraction`: open_clip ViT-B-16 (random weights time like trained ones) at 224 px on
  synthetic 500x375 JPEGs: end-to-end `extract_features` (loader workers, decode, pinned
  uint8 transfer, on-device normalisation, AMP) against the bare forward on preprocessed
  batches under the same autocast, repeats interleaved; images/s and their ratio (target ≥ 0.9).
- `tipx_search`: issue 3's full 20 α × 200 β × 50 γ TIP-X search on 10,000 test × 1,600
  support × 100 classes × 512-d synthetic features, on the device: seconds, the pick, acc1.
- `prompt_methods`: CoOp, CoCoOp, VPT, MaPLe, APEX on open_clip ViT-B-16 (random weights) at
  224 px, 50 classes, 400 synthetic JPEGs, each method at its recipe batch: the real
  `fit_prompts` loop (bfloat16 autocast, as the loop does on CUDA) timed from inside, a bare
  encode_classes + forward + cross-entropy + backward before each timed step (the ratio
  bare/loop, target ≥ 0.8), `predict_logits` images/s on 128 images (fp32 as eval/fitting.py
  runs it, and under bf16 autocast), peak memory; benchmarks/prompt_cost.py does the timing.
- `tta_batched_ratio`: TPT, PromptAlign and PromptSync on open_clip ViT-B-16 (random weights)
  at 224 px, 200 classes (ImageNet-A's count), 64 views: per-image time of the batched engine
  against the one-image reference loop in the same run, same predictions checked, and the
  overhead over plain zero-shot (target ratio ≥ 20x); benchmarks/tta_speed.py does the timing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import machine, write_jpegs  # noqa: E402

#: (full, dry-run) sizes
SIZES = {
    "extraction": ({"images": 2048, "batch": 256, "repeats": 3}, {"images": 8, "batch": 4, "repeats": 1}),
    "tipx_search": ({"n": 10_000, "m": 1_600, "k": 100, "d": 512},
                    {"n": 200, "m": 64, "k": 8, "d": 32}),
    "prompt_methods": ({"classes": 50, "images": 400, "warm": 5, "steps": 20, "batch": None,
                        "infer_batch": 128, "infer_reps": 5},
                       {"classes": 2, "images": 2, "warm": 0, "steps": 1, "batch": 2,
                        "infer_batch": 2, "infer_reps": 1}),
    "tta": ({"classes": 200, "images": 64, "ref_images": 4, "batch_size": 8, "n_views": 64},
            {"classes": 3, "images": 2, "ref_images": 1, "batch_size": 2, "n_views": 10}),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def extraction(device: torch.device, images: int, batch: int, repeats: int,
               spec: str = "openclip:ViT-B-16@random") -> dict:
    from anyclass.backbones.factory import create_backbone
    from anyclass.data.base import LabeledImages
    from anyclass.data.images import load_image
    from anyclass.features.extract import extract_features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # random weights warn, as open_clip does
        bb = create_backbone(spec, device)
    paths = write_jpegs(Path(tempfile.gettempdir()) / "anyclass-gpu-check-jpeg", images)
    ds = LabeledImages("gpu-check", paths, [0] * len(paths), ["x"])
    x = torch.stack([bb.preprocess(load_image(p)) for p in paths])
    amp = device.type == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16

    def bare() -> float:
        t = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            for i in range(0, len(x), batch):
                bb.encode_images(x[i:i + batch].to(device, non_blocking=True))
        _sync(device)
        return time.perf_counter() - t

    def e2e() -> float:
        t = time.perf_counter()
        extract_features(bb, ds, batch_size=batch, cache=False, progress=False)
        _sync(device)
        return time.perf_counter() - t

    bare(), e2e()                                 # warm-up: cudnn autotune, worker start
    pairs = [(bare(), e2e()) for _ in range(repeats)]
    ratios = sorted(b / e for b, e in pairs)
    return {"backbone": spec, "image_size": int(x.shape[-1]), "images": images, "batch": batch,
            "amp": str(dtype).removeprefix("torch.") if amp else "off",
            "bare_img_s": round(images / min(b for b, _ in pairs), 1),
            "end_to_end_img_s": round(images / min(e for _, e in pairs), 1),
            "ratio_median_of_pairs": round(ratios[len(ratios) // 2], 3), "target": 0.9}


def tipx_search(device: torch.device, n: int, m: int, k: int, d: int) -> dict:
    from tipx_search import features

    from anyclass.methods import search as S
    f, y, Fs, ys, W = (t.to(device) for t in features(n, m, k, d))
    L = S.one_hot(ys, k).to(device)
    _sync(device)
    t = time.perf_counter()
    Z = 100.0 * f @ W
    T = S.kl_term(f, Fs, W, L, 0.5)
    r = S.search_grid(Z, f, Fs, L, y, S.TIPX_ALPHA, S.TIPX_BETA, S.TIPX_GAMMA, T=T, order="abg")
    _sync(device)
    grid = [len(S.grid(g)) for g in (S.TIPX_ALPHA, S.TIPX_BETA, S.TIPX_GAMMA)]
    return {"n": n, "m": m, "k": k, "d": d, "grid": grid, "points": grid[0] * grid[1] * grid[2],
            "seconds": round(time.perf_counter() - t, 3),
            "pick": [float(r.alpha), float(r.beta), float(r.gamma)], "acc1": round(100 * float(r.acc), 2),
            "cpu_reference": "53 s on 2 loaded CPU cores (docs/benchmarks.md, TIP-X search)"}


def prompt_methods(device: torch.device, classes: int, images: int, warm: int, steps: int,
                   batch: int | None, infer_batch: int, infer_reps: int,
                   spec: str = "openclip:ViT-B-16@random") -> dict:
    """Training step (the real loop vs a bare forward + backward) and inference of each prompt
    method; `batch` None = each method's recipe batch."""
    import prompt_cost as pc

    from anyclass.data.base import LabeledImages
    bb = pc._quiet_backbone(spec, device)
    paths = write_jpegs(Path(tempfile.gettempdir()) / "anyclass-gpu-check-jpeg", images)
    names = pc.classnames(classes)
    ds = LabeledImages("gpu-check-prompts", paths, [i % classes for i in range(len(paths))], names)
    x = pc.inference_batch(bb, ds, infer_batch)
    cuda = device.type == "cuda"
    out: dict = {"backbone": spec, "image_size": int(x.shape[-1]), "classes": classes,
                 "train_images": len(paths), "amp": "bfloat16" if cuda else "off",
                 "warm": warm, "steps": steps, "target_ratio": 0.8, "methods": {}}
    for name in pc.PROMPT_METHODS:
        t = time.perf_counter()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            est, r = pc.time_steps(name, bb, ds, warm, steps, batch=batch)
            if cuda:
                r["train_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            r.update(pc.time_inference(est, bb, x, names, infer_reps))
            if cuda:
                r["infer_img_s_bf16"] = pc.time_inference(est, bb, x, names, infer_reps,
                                                          amp=True)["infer_img_s"]
            del est
        except Exception as e:  # noqa: BLE001 — one failing method must not lose the others
            r = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
        r["seconds"] = round(time.perf_counter() - t, 2)
        out["methods"][name] = r
    ratios = [r["ratio"] for r in out["methods"].values() if "ratio" in r]
    out["min_ratio"] = min(ratios) if ratios else None
    return out


def tta(device: torch.device, classes: int, images: int, ref_images: int, batch_size: int,
        n_views: int, spec: str = "openclip:ViT-B-16@random") -> dict:
    """Batched test-time tuning vs the reference loop (benchmarks/tta_speed.py)."""
    import prompt_cost as pc
    import tta_speed

    from anyclass.data.base import LabeledImages
    bb = pc._quiet_backbone(spec, device)
    paths = write_jpegs(Path(tempfile.gettempdir()) / "anyclass-gpu-check-jpeg", max(images, classes))
    names = pc.classnames(classes)
    ds = LabeledImages("gpu-check-tta", paths, [i % classes for i in range(len(paths))], names)
    x = pc.inference_batch(bb, ds, images)
    with tempfile.TemporaryDirectory() as d:
        out = tta_speed.measure(bb, x, names, ds, Path(d), ref_images, batch_size=batch_size,
                                n_views=n_views)
    ratios = [r["ratio"] for r in out["methods"].values()]
    out.update(backbone=spec, image_size=int(x.shape[-1]), target_ratio=20,
               amp="bfloat16" if device.type == "cuda" else "off", min_ratio=min(ratios))
    return out


def skipped(why: str) -> dict:
    return {"skipped": why}


def run(dry_run: bool, device: torch.device) -> dict:
    pick = 1 if dry_run else 0
    out: dict = {"machine": machine(), "device": str(device), "dry_run": dry_run}
    parts = {
        "extraction": lambda: extraction(device, **SIZES["extraction"][pick]),
        "tipx_search": lambda: tipx_search(device, **SIZES["tipx_search"][pick]),
        "prompt_methods": lambda: prompt_methods(device, **SIZES["prompt_methods"][pick]),
        "tta_batched_ratio": lambda: tta(device, **SIZES["tta"][pick]),
    }
    t0 = time.perf_counter()
    for name, fn in parts.items():
        t = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 — one failing part must not lose the others
            out[name] = {"error": f"{type(e).__name__}: {e}",
                         "trace": traceback.format_exc(limit=3)}
        out[name]["part_seconds"] = round(time.perf_counter() - t, 2)
        print(f"{name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on any device")
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not a.dry_run:
        raise SystemExit("error: no CUDA device; run with --dry-run to check the script on CPU")
    res = run(a.dry_run, device)
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
