"""Test-time tuning speed (issue 11): per-image time of the batched TPT / PromptAlign /
PromptSync against a faithful re-implementation of the reference loop (one image's 64 views
per batch, prompt and optimiser re-initialised per image, every view re-encoded at every
step, the image encoded again to predict: `TestTimeMethod.tune_reference`) in the same run,
checking both give the same predictions; and against plain zero-shot (the overhead a user
pays). Target: reference / batched ≥ 20x for TPT and PromptSync.

    python benchmarks/tta_speed.py [--backbone builtin] [--dataset world:source@sketch]
                                   [--images 64] [--ref-images 8] [--amp] [--out FILE]
    python benchmarks/tta_speed.py --breakdown --images 3     # where one batch's time goes

Timing does not depend on what the prompts learned, so θ_0 is a MaPLe prompt file at its
seeded initialisation (depth 3, as PromptAlign's) and the statistics are computed on the
dataset's train split; TPT starts from the hand-written prompt, as in its paper.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

METHODS = ("tpt", "promptalign", "promptsync")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def prepared_maple(bb, names: list[str], path: Path, depth: int = 3) -> Path:
    from anyclass.methods import create_method
    m = create_method("maple", depth=depth)
    torch.manual_seed(0)
    m.prepare(bb, names)
    return m.save(path)


def zero_shot_per_image(bb, x: torch.Tensor, names: list[str], reps: int = 3) -> dict:
    """Image encoding + cosine logits per image (the text classifier, built once per class
    list, reported apart)."""
    from anyclass.methods.prompt_parts import zeroshot_text
    t0 = time.perf_counter()
    with torch.no_grad():
        t = zeroshot_text(bb, names)
    _sync(bb.device)
    text_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            _ = (bb.encode_images(x.to(bb.device)) @ t.t()).argmax(1).cpu()
        _sync(bb.device)
        best = min(best, time.perf_counter() - t0)
    return {"s_per_image": best / len(x), "text_classifier_s": round(text_s, 4)}


def measure(bb, x: torch.Tensor, names: list[str], source, workdir: Path, n_ref: int,
            methods=METHODS, amp: bool | None = None, batch_size: int | None = None,
            n_views: int = 64, ratio: float = 0.1) -> dict:
    """Batched vs reference per-image seconds of each method on preprocessed images x."""
    from anyclass.methods import create_method
    from anyclass.methods.tta import prompt_init
    from anyclass.methods.tta_stats import compute_stats
    maple = prepared_maple(bb, names, workdir / "maple.safetensors")
    stats = compute_stats(bb, prompt_init(bb, maple), source, 3, "speed", progress=False)
    stats_path = stats.save(workdir / "stats.safetensors")
    zs = zero_shot_per_image(bb, x, names)
    out: dict = {"classes": len(names), "images": len(x), "ref_images": n_ref, "views": n_views,
                 "zeroshot_s_per_image": round(zs["s_per_image"], 6),
                 "zeroshot_text_classifier_s": zs["text_classifier_s"], "methods": {}}
    for name in methods:
        kw = dict(n_views=n_views, ratio=ratio, amp=amp, batch_size=batch_size)
        if name != "tpt":
            kw.update(init=str(maple), stats=str(stats_path))
        m = create_method(name, **kw).prepare(bb, names)
        m.predict(bb, x[:1])                                            # warm-up, both arms
        m.tune_reference(bb, x[:1])
        _sync(bb.device)
        t0 = time.perf_counter()
        got = m.predict(bb, x)
        _sync(bb.device)
        batched = (time.perf_counter() - t0) / len(x)
        t0 = time.perf_counter()
        ref = m.tune_reference(bb, x[:n_ref])
        _sync(bb.device)
        reference = (time.perf_counter() - t0) / n_ref
        same = bool(torch.equal(got.logits[:n_ref].argmax(1), ref.logits.argmax(1)))
        out["methods"][name] = {
            "batched_s_per_image": round(batched, 5), "reference_s_per_image": round(reference, 5),
            "ratio": round(reference / batched, 2),
            "overhead_vs_zeroshot": round(batched / zs["s_per_image"], 1),
            "same_predictions": same,
            "max_abs_logit_diff": float((got.logits[:n_ref] - ref.logits).abs().max()),
            "images_per_batch": m.images_per_batch(len(names), bb.device),
            "changed_by_tuning": int((got.logits.argmax(1) != got.untuned.argmax(1)).sum())}
        print(f"{name}: {json.dumps(out['methods'][name])}", file=sys.stderr, flush=True)
    return out


def breakdown(bb, x: torch.Tensor, names: list[str], name: str = "tpt") -> dict:
    """Where one batch's time goes: seconds inside the engine's text_features, shared_vjp and
    image_features (wrapped), and the rest (backward, optimiser, views), for the batched
    engine and the reference loop on the same images (TPT from the hand-written prompt)."""
    import functools
    from unittest import mock

    import anyclass.methods.tta as engine
    from anyclass.methods import create_method
    acc: dict[str, float] = {}

    def timed(key, f):
        @functools.wraps(f)
        def g(*a, **k):
            t0 = time.perf_counter()
            r = f(*a, **k)
            _sync(bb.device)
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
            return r
        return g
    m = create_method(name).prepare(bb, names)
    m.predict(bb, x[:1])                                                # warm-up
    out = {"images": len(x), "classes": len(names), "method": name}
    with mock.patch.multiple(engine, **{k: timed(k, getattr(engine, k)) for k in
                                        ("text_features", "shared_vjp", "image_features")}):
        for arm, run in (("batched", m.predict), ("reference", m.tune_reference)):
            acc.clear()
            t0 = time.perf_counter()
            run(bb, x)
            _sync(bb.device)
            total = time.perf_counter() - t0
            out[arm] = {"total_s": round(total, 2), **{k: round(v, 2) for k, v in acc.items()},
                        "rest_s": round(total - sum(acc.values()), 2)}
    return out


def text_trim(spec: str = "openclip:ViT-B-16@random", n: int = 200, reps: int = 2) -> dict:
    """open_clip text: the batch cut at its last end-of-text token (backbone default) vs
    CLIP's whole 77-token context (`trim_text=False`, what the reference code runs)."""
    import warnings

    from anyclass.backbones.factory import create_backbone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = create_backbone(spec, "cpu")
    texts = [f"a photo of a {w}." for w in ("cat", "dog", "sports car", "big red apple tree")] * (n // 4)
    out = {}
    for trim in (True, False):
        bb.trim_text = trim
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            with torch.no_grad():
                f = bb.encode_texts(texts)
            best = min(best, time.perf_counter() - t0)
        out[trim] = (best, f)
    bb.trim_text = True
    return {"backbone": spec, "texts": len(texts), "trimmed_s": round(out[True][0], 3),
            "full_context_s": round(out[False][0], 3),
            "speedup": round(out[False][0] / out[True][0], 2),
            "max_abs_diff": float((out[True][1] - out[False][1]).abs().max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="builtin")
    ap.add_argument("--dataset", default="world:source@sketch")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--ref-images", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast (default on CUDA)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--text-trim", action="store_true",
                    help="only time open_clip ViT-B-16's text tower, trimmed vs 77 tokens")
    ap.add_argument("--breakdown", action="store_true",
                    help="only split one batch of --images (TPT) into text forwards, "
                         "pulled-back gradients, images and the rest, batched vs reference")
    a = ap.parse_args(argv)
    if a.text_trim:
        print(json.dumps({**text_trim(), "machine": machine()}, indent=1))
        return 0
    from anyclass.backbones.factory import create_backbone
    from anyclass.data.sources import load_dataset
    from anyclass.methods.training import load_images
    bb = create_backbone(a.backbone, a.device)
    test = load_dataset(a.dataset, "test")
    step = max(1, len(test) // a.images)
    x, _ = load_images(bb, test.subset(range(0, step * a.images, step)))
    if a.breakdown:
        print(json.dumps({**breakdown(bb, x, list(test.classnames)), "machine": machine(),
                          "command": "python " + " ".join(sys.argv)}, indent=1))
        return 0
    source = load_dataset(a.dataset.split("@")[0], "train")
    with tempfile.TemporaryDirectory() as d:
        res = measure(bb, x, list(test.classnames), source, Path(d), a.ref_images,
                      a.methods.split(","), amp=True if a.amp else None)
    res.update(machine=machine(), backbone=a.backbone, dataset=a.dataset, amp=bool(a.amp),
               command="python " + " ".join(sys.argv))
    text = json.dumps(res, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
