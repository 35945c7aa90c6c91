"""The on-disk feature cache: $ANYCLASS_HOME/features/<key>/.

An entry holds one preallocated float32 array (features.npy, standard .npy, opened
memory-mapped) filled chunk by chunk, and one small JSON record per finished chunk (its
sha256 and the files it skipped). Records are written atomically after the chunk's rows,
so whatever set of records survives a crash describes rows that were written; checksums
catch what the OS lost anyway (truncation, torn writes, bit rot), and only the damaged
chunks are recomputed. An flock on the entry serialises concurrent runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_json  # noqa: F401 — re-exported
from ..paths import home

log = logging.getLogger("anyclass.features")

#: bump when anything that changes extracted numbers changes (image decoding, row layout)
FORMAT_VERSION = 1
DTYPE = np.dtype("<f4")


class CacheRebuildWarning(UserWarning):
    """A damaged cache entry (or part of it) is being recomputed."""


def features_root() -> Path:
    return home() / "features"


def feature_key(identity: str, weights_hash: str, preprocess_id: str, paths: Sequence[str],
                augment: str | None = None, aug_pass: int = 0,
                extra: dict[str, Any] | None = None) -> str:
    """sha256 of everything that determines the features: model identity and weights,
    preprocessing, the ordered file list with sizes and mtimes, the augmentation pass."""
    h = hashlib.sha256()
    head = {"format": FORMAT_VERSION, "identity": identity, "weights_hash": weights_hash,
            "preprocess": preprocess_id, "augment": augment,
            "aug_pass": int(aug_pass) if augment else 0, "n": len(paths), **(extra or {})}
    h.update(json.dumps(head, sort_keys=True).encode())
    for p in paths:
        try:
            st = os.stat(p)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{p}\0{size}\0{mtime}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def chunk_checksum(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=DTYPE).tobytes()).hexdigest()


class CacheEntry:
    """One cache directory. Use `with entry.locked():` around every read-modify step."""

    def __init__(self, key: str, root: Path | None = None) -> None:
        self.key = key
        self.dir = (root or features_root()) / key
        self.features_path = self.dir / "features.npy"
        self.meta_path = self.dir / "meta.json"
        self.index_path = self.dir / "index.json"
        self.chunk_dir = self.dir / "chunks"
        self._fd: int | None = None
        self._offset: int | None = None

    # ---------------------------------------------------------------- locking
    @contextlib.contextmanager
    def locked(self) -> Iterator["CacheEntry"]:
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        lf = open(self.dir / "lock", "a+")
        try:
            try:
                fcntl.flock(lf, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process extracting %s", self.dir)
                fcntl.flock(lf, fcntl.LOCK_EX)
            for p in list(self.dir.glob(".*.tmp")) + list(self.chunk_dir.glob(".*.tmp")):
                p.unlink(missing_ok=True)  # debris of a crashed writer (we hold the lock)
            yield self
        finally:
            self.close()
            fcntl.flock(lf, fcntl.LOCK_UN)
            lf.close()

    # ---------------------------------------------------------------- state
    def read_meta(self) -> dict | None:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None

    def records(self) -> dict[int, dict]:
        """Finished chunks: consolidated index.json plus per-chunk files."""
        recs: dict[int, dict] = {}
        if self.index_path.exists():
            try:
                recs = {int(k): v for k, v in json.loads(self.index_path.read_text()).items()}
            except (OSError, ValueError):
                warnings.warn(f"feature cache {self.dir}: unreadable index.json; "
                              f"recomputing", CacheRebuildWarning, stacklevel=4)
                recs = {}
        for p in sorted(self.chunk_dir.glob("*.json")):
            try:
                recs[int(p.stem)] = json.loads(p.read_text())
            except (OSError, ValueError):
                p.unlink(missing_ok=True)
        return recs

    def reset(self, reason: str) -> None:
        """Drop everything but the lock file."""
        if reason:
            warnings.warn(f"feature cache {self.dir}: {reason}; rebuilding",
                          CacheRebuildWarning, stacklevel=4)
        self.close()
        for p in (self.features_path, self.meta_path, self.index_path):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.chunk_dir, ignore_errors=True)
        self.chunk_dir.mkdir(parents=True, exist_ok=True)

    def _header(self) -> tuple[tuple[int, ...], int] | None:
        try:
            with open(self.features_path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read(f)
                if fortran or np.dtype(dtype) != DTYPE:
                    return None
                return tuple(shape), f.tell()
        except (OSError, ValueError):
            return None

    def check(self, n: int) -> tuple[dict | None, dict[int, dict]]:
        """Validate the entry against the expected row count and every finished chunk's
        checksum; damaged parts are dropped (with a warning) so they get recomputed.
        Returns (meta, surviving records)."""
        meta, recs = self.read_meta(), self.records()
        if meta is None and not self.features_path.exists():
            if recs:
                self.reset("chunk records without data")
            return None, {}
        hdr = self._header()
        if (meta is None or hdr is None or meta.get("n") != n
                or hdr[0] != (n, meta.get("dim"))):
            self.reset("unreadable or inconsistent features file")
            return None, {}
        (n_, dim), offset = hdr
        want = offset + n * dim * DTYPE.itemsize
        size = self.features_path.stat().st_size
        if size < want:
            warnings.warn(f"feature cache {self.dir}: features file truncated ({size} of "
                          f"{want} bytes); rebuilding the damaged chunks",
                          CacheRebuildWarning, stacklevel=3)
            os.truncate(self.features_path, want)  # zeros; checksums find what is lost
        cs, bad = int(meta["chunk_size"]), []
        with open(self.features_path, "rb") as f:
            for c, rec in recs.items():
                lo, hi = c * cs, min(n, (c + 1) * cs)
                if lo >= n:
                    bad.append(c)
                    continue
                raw = os.pread(f.fileno(), (hi - lo) * dim * 4, offset + lo * dim * 4)
                if hashlib.sha256(raw).hexdigest() != rec.get("sha256"):
                    bad.append(c)
        if bad:
            warnings.warn(f"feature cache {self.dir}: {len(bad)} chunk(s) failed their "
                          f"checksum (truncated or corrupted file); recomputing them",
                          CacheRebuildWarning, stacklevel=3)
            for c in bad:
                recs.pop(c)
                (self.chunk_dir / f"{c:08d}.json").unlink(missing_ok=True)
            atomic_write_json(self.index_path, {str(k): v for k, v in recs.items()
                                                if not (self.chunk_dir / f"{k:08d}.json")
                                                .exists()})
        self._offset = offset
        return meta, recs

    # ---------------------------------------------------------------- writing
    def create(self, n: int, dim: int, chunk_size: int, meta: dict) -> None:
        """Preallocate features.npy (sparse on disk) and write meta.json."""
        self.reset("")
        tmp = self.dir / f".features.{os.getpid()}.tmp"
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPE, shape=(n, dim))
        del arr
        os.replace(tmp, self.features_path)
        atomic_write_json(self.meta_path, {**meta, "n": n, "dim": dim,
                                           "chunk_size": chunk_size,
                                           "format": FORMAT_VERSION})
        hdr = self._header()
        assert hdr is not None
        self._offset = hdr[1]

    def write_chunk(self, c: int, start: int, rows: np.ndarray, invalid: list) -> None:
        """Rows first, then the record that vouches for them (atomically)."""
        if self._fd is None:
            self._fd = os.open(self.features_path, os.O_RDWR)
        rows = np.ascontiguousarray(rows, dtype=DTYPE)
        data = rows.tobytes()
        assert self._offset is not None
        os.pwrite(self._fd, data, self._offset + start * rows.shape[1] * 4)
        atomic_write_json(self.chunk_dir / f"{c:08d}.json",
                          {"sha256": hashlib.sha256(data).hexdigest(), "invalid": invalid})

    def consolidate(self) -> None:
        """Fold per-chunk records into index.json (fewer files for big datasets)."""
        recs = self.records()
        atomic_write_json(self.index_path, {str(k): v for k, v in sorted(recs.items())})
        for p in self.chunk_dir.glob("*.json"):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def open_features(self) -> np.ndarray:
        return np.load(self.features_path, mmap_mode="r")
