"""Small on-disk records every cache shares: atomic writes, JSON records that carry their own
checksum, and the stat stamp of a file. A bottom-layer module (only the standard library),
so the feature cache, the text-classifier cache, the weight-hash memo and the backbone cards
all use one implementation."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling and rename it onto `path`: a reader sees the old
    file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, separators=(",", ":")).encode())


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def write_checked_json(path: Path, obj: dict[str, Any]) -> None:
    """Atomic JSON record with a sha256 of its own content under "check"."""
    atomic_write_json(path, {"check": _digest(obj), "record": obj})


def read_checked_json(path: Path) -> dict[str, Any] | None:
    """The record written by `write_checked_json`, or None when it is missing, unreadable or
    fails its checksum (a truncated or corrupted record is treated as absent)."""
    try:
        raw = json.loads(Path(path).read_text())
        rec = raw["record"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if isinstance(rec, dict) and raw.get("check") == _digest(rec) else None


def file_stamp(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a file's content without reading it: resolved path, size, mtime,
    ctime and inode. ctime cannot be set back by a user (unlike mtime), so a same-size
    rewrite whose mtime was restored still changes the stamp."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}
