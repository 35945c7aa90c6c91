"""Is bf16 autocast worth it on this CPU? Built-in model, float32 vs bfloat16 autocast, forward.

    OMP_NUM_THREADS=1 python benchmarks/cpu_amp.py [--texts 64] [--images 16] [--repeats 3]

On CPUs without bf16 units (AVX2 only) autocast is emulated and slower than float32; training
and test-time tuning warn then (methods/training.py `_autocast`). Ratios are within one run.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


def _seconds(fn, amp: bool, repeats: int) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        fn()                                                    # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    from anyclass.backbones.factory import create_backbone
    from anyclass.methods.training import cpu_has_bf16
    bb = create_backbone("builtin")
    names = [f"a photo of a thing {i}" for i in range(a.texts)]
    x = torch.rand(a.images, 3, bb.image_size, bb.image_size)
    print(f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 units: {cpu_has_bf16()}")
    print("| tower | batch | float32 s | bf16 autocast s | bf16 / fp32 |\n|---|---|---|---|---|")
    for tower, batch, fn in (("text", a.texts, lambda: bb.encode_texts(names)),
                             ("image", a.images, lambda: bb.encode_images(x))):
        f32, b16 = _seconds(fn, False, a.repeats), _seconds(fn, True, a.repeats)
        print(f"| {tower} | {batch} | {f32:.3f} | {b16:.3f} | {b16 / f32:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
