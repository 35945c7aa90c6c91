"""`anyclass world artefacts`: train what the shipped artefacts lack and write them (a leaf
module: it needs both the artefact store and the expert hub, which do not import each
other)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .artefacts import ARTEFACT_ROOT, FORMAT, MANIFEST, _install, _sha256
from .experts import (ADVERSARIAL_FILTER, META_FILE, WEIGHTS_FILE, ensure_world_experts,
                      hub_dir, hub_key)
from .train import model_key


def export(world, root: Path | None = None, progress: bool = True) -> dict:
    """Write the world's model and every expert (trained first if needed) as artefacts."""
    root = root or ARTEFACT_ROOT
    ensure_world_experts(world, progress)
    tmp = root.with_name(f".{root.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    model_files = {}
    for p in sorted(world.model_dir.iterdir()):
        if p.is_file():
            shutil.copyfile(p, tmp / "model" / p.name)
            model_files[p.name] = _sha256(p)
    experts = {}
    for d in sorted(hub_dir(world).iterdir()):
        if d.is_dir() and (d / META_FILE).is_file():
            dst = tmp / "experts" / d.name
            dst.mkdir(parents=True)
            if d.name == ADVERSARIAL_FILTER:
                shutil.copyfile(d / WEIGHTS_FILE, dst / WEIGHTS_FILE)
            else:
                _save_half(d / WEIGHTS_FILE, dst / WEIGHTS_FILE)
            shutil.copyfile(d / META_FILE, dst / META_FILE)
            experts[d.name] = {f: _sha256(dst / f) for f in (WEIGHTS_FILE, META_FILE)}
    manifest = {"format": FORMAT, "world": world.cfg.name,
                "model": {"key": model_key(world.cfg), "files": model_files},
                "experts": {"key": hub_key(world), "experts": experts}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    for name, files in experts.items():       # this machine now uses the shipped weights too
        _install(root / "experts" / name, files, hub_dir(world) / name, f"world expert {name}")
    return manifest


def _save_half(src: Path, dst: Path) -> None:
    """Copy a safetensors file with its float32 tensors rounded to float16 (a file that has
    none, e.g. an installed artefact, is copied byte for byte: exporting is idempotent)."""
    import torch
    from safetensors.torch import load_file, save_file
    sd = load_file(str(src))
    if not any(v.dtype == torch.float32 for v in sd.values()):
        shutil.copyfile(src, dst)
        return
    save_file({k: (v.half() if v.dtype == torch.float32 else v).contiguous() for k, v in sd.items()},
              str(dst), metadata={"format": "anyclass-world-expert", "shipped_dtype": "float16"})
