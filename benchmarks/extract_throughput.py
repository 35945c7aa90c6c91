"""End-to-end extraction throughput (decode + preprocess + forward, through
`extract_features` with its default DataLoader plan) against the bare forward pass on
pre-decoded tensors — same model, same batch size, same images, one process, repeats
interleaved (bare, end-to-end, bare, ...) so machine noise hits both. Target: ratio >= 0.9.

The bare pass is the backbone's own `encode_images` on the preprocessed float batches,
under inference_mode, with the process's torch threads — nothing is slowed down. The
end-to-end pass is `extract_features(..., cache=False)`: worker start-up, file reads, PNG/JPEG
decoding, preprocessing, normalisation and forward, nothing precomputed.

    ANYCLASS_WORLD=mini python benchmarks/extract_throughput.py --backbone builtin --images world
    python benchmarks/extract_throughput.py --backbone openclip:ViT-B-32@random --images jpeg
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, summary, timed, world_images, write_jpegs, write_pngs  # noqa: E402

from anyclass.backbones.factory import create_backbone  # noqa: E402
from anyclass.data.base import LabeledImages  # noqa: E402
from anyclass.data.images import load_image  # noqa: E402
from anyclass.features.extract import extract_features, loader_plan  # noqa: E402


def bare_forward(bb, x: torch.Tensor, batch: int) -> None:
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            bb.encode_images(x[i:i + batch].to(bb.device))
    if bb.device.type == "cuda":
        torch.cuda.synchronize()


def end_to_end(bb, ds, batch: int, workers: int | None) -> None:
    extract_features(bb, ds, batch_size=batch, cache=False, progress=False,
                     num_workers=workers)
    if bb.device.type == "cuda":
        torch.cuda.synchronize()


def image_set(kind: str, n: int) -> list[str]:
    tmp = Path(tempfile.gettempdir())
    if kind == "world":
        return world_images(n)
    if kind.startswith("png"):
        size = int(kind[3:] or 64)
        return write_pngs(tmp / f"anyclass-bench-png{size}", n, size)
    if kind == "jpeg":
        return write_jpegs(tmp / "anyclass-bench-jpeg500x375", n)
    raise SystemExit(f"unknown --images {kind!r}: world, png64, png<size>, jpeg")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="builtin")
    ap.add_argument("--images", default="world",
                    help="world (the offline world's 64px PNGs), png<size>, jpeg (500x375)")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None, help="default: loader_plan()")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights" notice
        bb = create_backbone(a.backbone)
    paths = image_set(a.images, a.n)
    ds = LabeledImages("bench", paths, [0] * len(paths), ["a", "b"])
    x = torch.stack([bb.preprocess(load_image(p)) for p in paths])     # pre-decoded, untimed
    plan = loader_plan(bb.device, len(paths), a.batch, a.workers)
    bare_forward(bb, x[: a.batch * 2], a.batch)                       # warm-up both paths
    end_to_end(bb, ds.subset(range(a.batch * 2)), a.batch, a.workers)
    bare, e2e = [], []
    for _ in range(a.repeats):                                       # interleaved
        bare.append(timed(bare_forward, bb, x, a.batch)[1])
        e2e.append(timed(end_to_end, bb, ds, a.batch, a.workers)[1])
    ratios = sorted(b / e for b, e in zip(bare, e2e))
    out = {"backbone": a.backbone, "identity": bb.identity, "images": a.images, "n": a.n,
           "batch": a.batch, "input_px": list(x.shape[-2:]),
           "loader": plan._asdict(),
           "bare_s": summary(bare), "end_to_end_s": summary(e2e),
           "bare_img_per_s_best": round(a.n / min(bare), 1),
           "end_to_end_img_per_s_best": round(a.n / min(e2e), 1),
           "ratio_best": round(min(bare) / min(e2e), 3),
           "ratio_median_of_pairs": round(ratios[len(ratios) // 2], 3),
           "machine": machine()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
