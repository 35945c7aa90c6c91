"""Shipped, versioned artefacts of the full world: the built-in model and the expert hub's
trained weights, so that every machine uses the same weights (float reductions make CPU
training depend on thread counts and libraries) and a fresh `make demo` trains nothing.

Layout (package data): `resources/world/manifest.json` plus the files it lists under
`resources/world/model/` and `resources/world/experts/<name>/`. The manifest records the
recipe keys they were built from (`train.model_key`, `experts.hub_key`) and the
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

import json
import os
import shutil
import warnings
from pathlib import Path

from ..hashing import file_sha256


def _sha256(path: Path) -> str:
    return file_sha256(path, memo=False)      # an integrity check: never from the memo


ARTEFACT_ROOT = Path(__file__).resolve().parent.parent / "resources" / "world"
MANIFEST = "manifest.json"
FORMAT = "anyclass-world-artefacts/1"


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
    from .train import model_key
    if not entry or entry.get("key") != model_key(cfg):
        return False
    return _install(root / "model", entry["files"], Path(dest), "built-in model")


def install_expert(hub_key: str, name: str, dest: Path, root: Path | None = None) -> bool:
    """Install the shipped weights of world expert `name` of the hub recipe `hub_key`; False
    if not shipped for this recipe or refused."""
    root = root or ARTEFACT_ROOT
    m = read_manifest(root)
    entry = (m or {}).get("experts")
    if not entry or entry.get("key") != hub_key or name not in entry["experts"]:
        return False
    return _install(root / "experts" / name, entry["experts"][name], Path(dest),
                    f"world expert {name}")
