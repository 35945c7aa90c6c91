"""End-to-end extraction throughput (decode + preprocess + forward, through the feature
extractor) against the bare forward pass on pre-decoded tensors — same model, same batch size,
same images, one run. Target: ratio >= 0.9.

    python benchmarks/extract_throughput.py [--backbone builtin] [--n 2000] [--batch 128]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, timed, write_pngs  # noqa: E402

from anyclass.backbones.factory import create_backbone  # noqa: E402
from anyclass.data.base import LabeledImages  # noqa: E402
from anyclass.data.images import load_image  # noqa: E402
from anyclass.features.extract import extract_features  # noqa: E402


def bare_forward(bb, x: torch.Tensor, batch: int) -> None:
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            bb.encode_images(x[i:i + batch].to(bb.device))
    if bb.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="builtin")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    bb = create_backbone(a.backbone)
    tmp = Path(tempfile.gettempdir()) / f"anyclass-bench-png{a.image_size}"
    paths = write_pngs(tmp, a.n, a.image_size)
    ds = LabeledImages("bench", paths, [0] * len(paths), ["a", "b"])
    x = torch.stack([bb.preprocess(load_image(p)) for p in paths])     # pre-decoded, untimed
    bare_forward(bb, x[: a.batch * 2], a.batch)                       # warm-up
    extract_features(bb, ds.subset(range(a.batch * 2)), batch_size=a.batch, cache=False,
                     progress=False, num_workers=a.workers)
    bare, e2e = [], []
    for _ in range(a.repeats):                                       # interleaved: noise hits both
        bare.append(timed(bare_forward, bb, x, a.batch)[1])
        e2e.append(timed(extract_features, bb, ds, batch_size=a.batch, cache=False,
                         progress=False, num_workers=a.workers)[1])
    tb, te = min(bare), min(e2e)
    out = {"backbone": a.backbone, "identity": bb.identity, "images": a.n, "batch": a.batch,
           "image_size_on_disk": a.image_size, "bare_img_per_s": round(a.n / tb, 1),
           "end_to_end_img_per_s": round(a.n / te, 1), "ratio": round(tb / te, 3),
           "machine": machine()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
