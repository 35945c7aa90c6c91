"""Content hashes of weight files and state dicts: one place for every layer (the world's
artefacts and experts, the backbones' weights) so none has to import another for them."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import torch

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22, memo: bool = True) -> str:
    """Hex sha256 of a file, streamed; memoised in-process on (resolved path, size, mtime_ns)
    unless `memo` is False (integrity checks: a same-size rewrite within one mtime tick
    must not hit the memo)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if not memo or key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def state_dict_hash(sd: Mapping[str, torch.Tensor]) -> str:
    """Deterministic hex sha256 over sorted names, dtypes, shapes and raw bytes of the tensors
    (independent of the device they live on); for weights that come from no file."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{str(t.dtype)}|{tuple(sd[name].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
