"""Batched image-feature extraction, streamed into the on-disk cache.

DataLoader workers decode and preprocess while the main process runs the forward pass
(AMP on CUDA). Rows go into one preallocated file chunk by chunk, so memory holds a chunk
and the loader's prefetch queue, never the dataset; a killed run resumes from its finished
chunks and a damaged file is repaired chunk by chunk (see cache.py).
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.base import LabeledImages
from ..data.images import (BadImageWarning, BadItem, ImageFileDataset, collate_skip_bad,
                           make_augment, max_pixels_default)
from .cache import CacheEntry, feature_key

log = logging.getLogger("anyclass.features")

DEFAULT_CHUNK = 1024


class ImageEncoder(Protocol):
    """The part of the backbone protocol extraction needs."""
    identity: str
    weights_hash: str
    embed_dim: int

    def preprocess(self, img: Image.Image) -> torch.Tensor: ...
    def preprocess_id(self) -> str: ...
    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Features:
    """Image embeddings of a dataset, row i <-> ds.paths[i]. Rows of files that could not
    be read are zero and `valid` is False there; evaluation should use `valid_only()`."""
    features: np.ndarray          # [N, D] float32, L2-normalised (read-only memmap if cached)
    labels: np.ndarray            # int64 [N], -1 = unlabelled
    valid: np.ndarray             # bool [N]
    paths: list[str]
    key: str
    classnames: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    dataset: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Features":
        """Rows `indices` (in memory), e.g. a few-shot sample's meta["source_indices"]."""
        idx = np.asarray(indices, dtype=np.int64)
        keep = set(self.paths[i] for i in idx.tolist())
        return Features(np.asarray(self.features[idx]), self.labels[idx], self.valid[idx],
                        [self.paths[i] for i in idx.tolist()], self.key,
                        list(self.classnames), [s for s in self.skipped if s[0] in keep],
                        self.dataset)

    def valid_only(self) -> "Features":
        return self.subset(np.flatnonzero(self.valid))


class _PathTable(Sequence[str]):
    """Paths packed in two numpy arrays: forked DataLoader workers share them without the
    copy-on-write growth a Python list of a million str objects causes (refcounts)."""

    def __init__(self, paths: Sequence[str]) -> None:
        enc = [os.fspath(p).encode("utf-8", "surrogateescape") for p in paths]
        self.off = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in enc], out=self.off[1:])
        self.buf = np.frombuffer(b"".join(enc), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.off) - 1

    def __getitem__(self, i):  # type: ignore[override]
        i = int(i)
        return self.buf[self.off[i]:self.off[i + 1]].tobytes().decode("utf-8",
                                                                      "surrogateescape")


class _Indices(torch.utils.data.Sampler[int]):
    def __init__(self, idx: np.ndarray) -> None:
        self.idx = idx

    def __iter__(self) -> Iterator[int]:
        return (int(i) for i in self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process owns the cores for forward


class _MemorySink:
    """cache=False: rows land in an in-memory array (small, interactive runs)."""

    def __init__(self, n: int, dim: int) -> None:
        self.arr = np.zeros((n, dim), dtype=np.float32)
        self.recs: dict[int, dict] = {}

    def write_chunk(self, c: int, start: int, rows: np.ndarray, invalid: list) -> None:
        self.arr[start:start + len(rows)] = rows
        self.recs[c] = {"invalid": invalid}


def _precision(device: torch.device, amp: bool | None) -> torch.dtype | None:
    if device.type != "cuda" or amp is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _encode(backbone: ImageEncoder, x: torch.Tensor, device: torch.device,
            amp_dtype: torch.dtype | None) -> np.ndarray:
    x = x.to(device, non_blocking=True)
    with torch.inference_mode():
        if amp_dtype is not None:
            with torch.autocast(device.type, dtype=amp_dtype):
                f = backbone.encode_images(x)
        else:
            f = backbone.encode_images(x)
        f = f.float()
        f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # exact unit norm after AMP
    return f.cpu().numpy()


def _run(backbone: ImageEncoder, paths: _PathTable, n: int, dim: int, chunk: int,
         pending: list[int], sink, batch_size: int, num_workers: int | None,
         augment, max_pixels: int, device: torch.device, amp_dtype: torch.dtype | None,
         progress: bool, desc: str) -> list[BadItem]:
    """Extract the rows of the `pending` chunks into `sink`, chunk by chunk, in order."""
    from tqdm.auto import tqdm
    idx = np.concatenate([np.arange(c * chunk, min(n, (c + 1) * chunk)) for c in pending])
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if len(idx) > batch_size else 0
    dataset = ImageFileDataset(paths, backbone.preprocess, max_pixels, augment)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=_Indices(idx), num_workers=num_workers,
        collate_fn=collate_skip_bad, pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=2 if num_workers else None)
    size = {c: min(n, (c + 1) * chunk) - c * chunk for c in pending}
    remaining = dict(size)
    bufs: dict[int, np.ndarray] = {}
    invalid: dict[int, list] = {}
    bad_all: list[BadItem] = []
    bar = tqdm(total=len(idx), unit="img", desc=desc, disable=not progress, leave=False)
    try:
        for batch in loader:
            for b in batch.bad:
                c = b.index // chunk
                invalid.setdefault(c, []).append([int(b.index), b.reason])
                remaining[c] -= 1
                bad_all.append(b)
                warnings.warn(f"skipped {b.reason}", BadImageWarning, stacklevel=3)
            if batch.images is not None:
                emb = _encode(backbone, batch.images, device, amp_dtype)
                if emb.shape[1] != dim:
                    raise RuntimeError(f"{backbone.identity}: encode_images returned "
                                       f"{emb.shape[1]}-d features, embed_dim is {dim}")
                ii = batch.indices.numpy()
                cc = ii // chunk
                for c in np.unique(cc).tolist():
                    m = cc == c
                    if c not in bufs:
                        bufs[c] = np.zeros((size[c], dim), dtype=np.float32)
                    bufs[c][ii[m] - c * chunk] = emb[m]
                    remaining[c] -= int(m.sum())
            for c in [c for c, r in remaining.items() if r == 0]:
                rows = bufs.pop(c, None)
                if rows is None:
                    rows = np.zeros((size[c], dim), dtype=np.float32)
                sink.write_chunk(c, c * chunk, rows, sorted(invalid.pop(c, [])))
                del remaining[c]
            bar.update(len(batch.indices) + len(batch.bad))
    finally:
        bar.close()
    return bad_all


def extract_features(backbone: ImageEncoder, ds: LabeledImages, batch_size: int = 256,
                     num_workers: int | None = None, augment: str | None = None,
                     aug_pass: int = 0, cache: bool = True, progress: bool = True,
                     chunk_size: int = DEFAULT_CHUNK, amp: bool | None = None,
                     max_pixels: int | None = None) -> Features:
    """Embeddings of every image of `ds` (see Features), cached unless cache=False.

    augment="flip_crop" with aug_pass=k gives the k-th seeded augmented view (Tip-Adapter's
    cache model). amp=None: autocast (bf16, else fp16) on CUDA, fp32 elsewhere.
    num_workers=None: up to 8 decoding workers when there is more than one batch.
    Unreadable files are skipped with a BadImageWarning naming each, then a count.
    """
    n = len(ds)
    device = torch.device(getattr(backbone, "device", "cpu"))
    amp_dtype = _precision(device, amp)
    mp = max_pixels_default() if max_pixels is None else int(max_pixels)
    aug = make_augment(augment, aug_pass)
    dim = int(backbone.embed_dim)
    key = feature_key(backbone.identity, backbone.weights_hash, backbone.preprocess_id(),
                      ds.paths, augment, aug_pass,
                      {"precision": str(amp_dtype or "fp32"), "max_pixels": mp})
    labels = np.asarray(ds.labels, dtype=np.int64)
    desc = f"features {ds.name}" + (f" [{augment} #{aug_pass}]" if augment else "")
    run_args = dict(batch_size=batch_size, num_workers=num_workers, augment=aug,
                    max_pixels=mp, device=device, amp_dtype=amp_dtype, progress=progress,
                    desc=desc)
    if n == 0:
        return Features(np.zeros((0, dim), np.float32), labels, np.zeros(0, bool), [], key,
                        list(ds.classnames), [], ds.name)
    if not cache:
        chunk = max(1, chunk_size)
        sink = _MemorySink(n, dim)
        fresh = _run(backbone, _PathTable(ds.paths), n, dim, chunk,
                     list(range((n + chunk - 1) // chunk)), sink, **run_args)
        arr, recs = sink.arr, sink.recs
    else:
        entry = CacheEntry(key)
        with entry.locked():
            meta, recs = entry.check(n)
            if meta is None:
                chunk = max(1, chunk_size)
                entry.create(n, dim, chunk, {
                    "identity": backbone.identity, "weights_hash": backbone.weights_hash,
                    "preprocess": backbone.preprocess_id(), "augment": augment,
                    "aug_pass": aug_pass if augment else 0, "dataset": ds.name})
            else:
                chunk = int(meta["chunk_size"])
                if int(meta["dim"]) != dim:
                    raise RuntimeError(f"cache {entry.dir} holds {meta['dim']}-d features, "
                                       f"backbone says {dim}")
            pending = [c for c in range((n + chunk - 1) // chunk) if c not in recs]
            fresh = []
            if pending:
                if recs:
                    log.info("resuming %s: %d of %d chunks left", entry.dir, len(pending),
                             (n + chunk - 1) // chunk)
                fresh = _run(backbone, _PathTable(ds.paths), n, dim, chunk, pending, entry,
                             **run_args)
                entry.close()
                entry.consolidate()
                recs = entry.records()
        arr = entry.open_features()
    valid = np.ones(n, dtype=bool)
    skipped: list[tuple[str, str]] = []
    for c in sorted(recs):
        for i, reason in recs[c]["invalid"]:
            valid[i] = False
            skipped.append((ds.paths[i], reason))
    warned = {int(b.index) for b in fresh}
    for c in sorted(recs):  # files skipped by an earlier (cached or interrupted) run
        for i, reason in recs[c]["invalid"]:
            if int(i) not in warned:
                warnings.warn(f"skipped {reason}", BadImageWarning, stacklevel=2)
    if skipped:
        k = len(skipped)
        warnings.warn(f"skipped {k} unreadable image{'s' if k != 1 else ''} of {n} "
                      f"(see warnings)", BadImageWarning, stacklevel=2)
    return Features(arr, labels, valid, list(ds.paths), key, list(ds.classnames), skipped,
                    ds.name)
