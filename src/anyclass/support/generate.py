"""SuS generation: N images per class from a text-to-image `diffusers` pipeline loaded from a
local model folder (no download: local_files_only). `diffusers` is an optional extra.

Defaults follow the SuS paper (Stable Diffusion v1.4, guidance 9.5, 85 steps). Every image
has its own seeded torch.Generator (seed, class index, image index), so a class's images do
not change when other classes, the batch size or the device count change.
Prompts: "photo" uses "A photo of a {}." for every image; "cupl" cycles through the class's
description sentences (image i uses sentence i mod S), as SuS spreads its budget over them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

from ..errors import AnyclassError

GUIDANCE = 9.5
STEPS = 85


def generator_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the model folder's file list with sizes and mtimes (cache keys)."""
    root = Path(path).expanduser().resolve()
    h = hashlib.sha256(str(root).encode())
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load_generator(path: str | os.PathLike, device: str | None = None):
    """A diffusers pipeline from a local folder (model_index.json + component folders)."""
    root = Path(path).expanduser()
    if not (root / "model_index.json").is_file():
        raise AnyclassError(f"generator {root}: not a diffusers model folder (no "
                            f"model_index.json); give a local folder saved with "
                            f"save_pretrained")
    try:
        import torch
        from diffusers import DiffusionPipeline
    except ImportError:
        raise AnyclassError("generation needs the optional extra: pip install "
                            "'anyclass[generation]' (diffusers)") from None
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kw = {}
    if str(dev).startswith("cuda"):  # fp16 on GPUs, as SD is usually run; fp32 on CPU
        try:  # diffusers renamed torch_dtype to dtype (the old name warns)
            from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
            kw["dtype"] = torch.float16
        except ImportError:
            kw["torch_dtype"] = torch.float16
    try:
        pipe = DiffusionPipeline.from_pretrained(str(root), local_files_only=True, **kw)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types; one line for users
        raise AnyclassError(f"generator {root}: cannot load ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_seed(seed: int, class_index: int, i: int) -> int:
    h = hashlib.sha256(f"sus-gen|{seed}|{class_index}|{i}".encode()).digest()
    return int.from_bytes(h[:7], "big")


def generate_class(pipe, sentences: Sequence[str], class_index: int, n: int, seed: int,
                   out_dir: Path, guidance: float = GUIDANCE, steps: int = STEPS,
                   batch_size: int = 4, size: int | None = None) -> list[str]:
    """Generate n images for one class into out_dir/<i>.png; returns the file names."""
    import torch
    names = []
    for lo in range(0, n, batch_size):
        idx = list(range(lo, min(n, lo + batch_size)))
        prompts = [sentences[i % len(sentences)] for i in idx]
        gens = [torch.Generator(device="cpu").manual_seed(image_seed(seed, class_index, i))
                for i in idx]
        kw = {"height": size, "width": size} if size else {}
        with torch.no_grad():
            out = pipe(prompt=prompts, num_inference_steps=int(steps),
                       guidance_scale=float(guidance), generator=gens, output_type="pil",
                       **kw)
        for i, img in zip(idx, out.images):
            name = f"{i:04d}.png"
            img.convert("RGB").save(out_dir / name)
            names.append(name)
    return names
