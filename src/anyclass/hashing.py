"""Content hashes of weight files and state dicts: one place for every layer (the world's
artefacts and experts, the backbones' weights) so none has to import another for them.

File hashes are memoised in-process and on disk ($ANYCLASS_HOME/hashes/), keyed by the
file's stat stamp (resolved path, size, mtime, ctime, inode): a start-up of a cached run
reads a few hundred bytes instead of hashing hundreds of MB of weights, and any rewrite of
the file changes the stamp, so a stale hash is never returned. torch is imported only by
`state_dict_hash`, so hashing a file does not pay for it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .atomic import file_stamp, read_checked_json, write_checked_json
from .paths import home

if TYPE_CHECKING:
    import torch

_SHA_MEMO: dict[tuple, str] = {}


def _memo_key(stamp: dict[str, Any]) -> tuple:
    return tuple(stamp[k] for k in ("path", "size", "mtime_ns", "ctime_ns", "ino"))


def _memo_path(resolved: str) -> Path:
    """One record per file path (a changed file overwrites its record)."""
    return home() / "hashes" / f"{hashlib.sha256(resolved.encode()).hexdigest()[:32]}.json"


def _sha256_of(path: Path, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _disk_memo(stamp: dict[str, Any]) -> str | None:
    rec = read_checked_json(_memo_path(stamp["path"]))
    if rec is None or _memo_key(rec) != _memo_key(stamp):
        return None
    sha = rec.get("sha256")
    return sha if isinstance(sha, str) and len(sha) == 64 else None


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22, memo: bool = True) -> str:
    """Hex sha256 of a file, streamed; memoised (in-process and on disk) on its stat stamp
    unless `memo` is False (integrity checks read the bytes every time; their result still
    refreshes the memo)."""
    stamp = file_stamp(path)
    key = _memo_key(stamp)
    if memo:
        if key in _SHA_MEMO:
            return _SHA_MEMO[key]
        sha = _disk_memo(stamp)
        if sha is not None:
            _SHA_MEMO[key] = sha
            return sha
    sha = _sha256_of(Path(stamp["path"]), chunk)
    if _memo_key(file_stamp(path)) == key:     # unchanged while we read it: safe to memoise
        _SHA_MEMO[key] = sha
        try:
            write_checked_json(_memo_path(stamp["path"]), {**stamp, "sha256": sha})
        except OSError:
            pass                                # a read-only cache only costs the re-hash
    return sha


def state_dict_hash(sd: Mapping[str, "torch.Tensor"]) -> str:
    """Deterministic hex sha256 over sorted names, dtypes, shapes and raw bytes of the tensors
    (independent of the device they live on); for weights that come from no file."""
    import torch
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{str(t.dtype)}|{tuple(sd[name].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
