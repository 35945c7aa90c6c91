"""Shipped, versioned artefacts of the full world: the built-in model and the expert hub's
trained weights, so that every machine uses the same weights (float reductions make CPU
training depend on thread counts and libraries) and a fresh `make demo` trains nothing.

Layout (package data): `resources/world/manifest.json` plus the files it lists under
`resources/world/model/` and `resources/world/experts/<name>/`. The manifest records the
recipe keys they were built from (`WorldConfig.model_key()`, `experts.hub_key`) and the
sha256 of every file. An artefact is used only when its key equals the running code's key
and every checksum matches; a key mismatch means "not shipped for this recipe" (silently
train), a checksum mismatch is refused with a warning and the thing is rebuilt.

Size (< 50 MB in all): the model and the adversarial filter expert ship in float32 (they
define the zero-shot numbers and the adversarial domain's images); the other experts ship
their weights rounded to float16 (loaded back into float32 models). Exporting re-installs
the shipped files into the exporting machine's hub, so the numbers measured there are the
ones every machine gets.

Rebuild (after a recipe change): `anyclass world artefacts` trains what is missing in the
full world and rewrites this folder; commit it with the code change.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

ARTEFACT_ROOT = Path(__file__).resolve().parent.parent / "resources" / "world"
MANIFEST = "manifest.json"
FORMAT = "anyclass-world-artefacts/1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path | None = None) -> dict | None:
    path = (root or ARTEFACT_ROOT) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("format") == FORMAT else None


def _install(src: Path, files: dict[str, str], dest: Path, what: str) -> bool:
    """Copy `files` from src to dest (atomically, as a directory) if every checksum matches."""
    for name, sha in files.items():
        p = src / name
        if not p.is_file() or _sha256(p) != sha:
            warnings.warn(f"shipped {what} artefact {p} fails its checksum: refused, "
                          "rebuilding it instead", stacklevel=3)
            return False
    tmp = dest.with_name(f".{dest.name}.install-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in files:
        shutil.copyfile(src / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return True


def install_model(cfg, dest: Path, root: Path | None = None) -> bool:
    """Install the shipped built-in model for `cfg` into `dest`; False if none is shipped
    for this recipe or it fails its checksums (then the caller trains)."""
    root = root or ARTEFACT_ROOT
    m = read_manifest(root)
    entry = (m or {}).get("model")
    if not entry or entry.get("key") != cfg.model_key():
        return False
    return _install(root / "model", entry["files"], Path(dest), "built-in model")


def install_expert(world, name: str, dest: Path, root: Path | None = None) -> bool:
    """Install the shipped weights of world expert `name`; False if not shipped for this
    hub recipe or refused."""
    from .experts import hub_key
    root = root or ARTEFACT_ROOT
    m = read_manifest(root)
    entry = (m or {}).get("experts")
    if not entry or entry.get("key") != hub_key(world) or name not in entry["experts"]:
        return False
    return _install(root / "experts" / name, entry["experts"][name], Path(dest),
                    f"world expert {name}")


def export(world, root: Path | None = None, progress: bool = True) -> dict:
    """Write the world's model and every expert (trained first if needed) as artefacts."""
    from .experts import (ADVERSARIAL_FILTER, META_FILE, WEIGHTS_FILE, ensure_world_experts,
                          hub_dir, hub_key)
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
                "model": {"key": world.cfg.model_key(), "files": model_files},
                "experts": {"key": hub_key(world), "experts": experts}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    for name, files in experts.items():       # this machine now uses the shipped weights too
        _install(root / "experts" / name, files, hub_dir(world) / name, f"world expert {name}")
    return manifest


def _save_half(src: Path, dst: Path) -> None:
    """Copy a safetensors file with its float32 tensors rounded to float16."""
    import torch
    from safetensors.torch import load_file, save_file
    sd = load_file(str(src))
    save_file({k: (v.half() if v.dtype == torch.float32 else v).contiguous() for k, v in sd.items()},
              str(dst), metadata={"format": "anyclass-world-expert", "shipped_dtype": "float16"})
