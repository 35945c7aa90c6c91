"""Few-shot sampling and class splits.

A few-shot sample is a pure function of (dataset, shots, seed): each image gets a key
hash(seed, path relative to the dataset root) and each class keeps its `shots` smallest
keys. So the sample does not depend on file-listing order or on where the dataset lives,
adding an unrelated image leaves it unchanged, and the k-shot sample is contained in the
(k+n)-shot sample of the same seed.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from typing import Sequence

import numpy as np

from .base import LabeledImages


def _relpaths(ds: LabeledImages) -> list[str]:
    root = ds.meta.get("root")
    if not root:
        return list(ds.paths)
    root = os.path.abspath(root)
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in ds.paths]


def _keys(rel: Sequence[str], seed: int) -> np.ndarray:
    salt = f"anyclass-fewshot:{int(seed)}:".encode()
    return np.fromiter((int.from_bytes(hashlib.blake2b(salt + r.encode(), digest_size=8)
                                       .digest(), "big") for r in rel),
                       dtype=np.uint64, count=len(rel))


def sample_few_shot(ds: LabeledImages, shots: int, seed: int) -> LabeledImages:
    """`shots` images per class (all of a class that has fewer, with a warning naming it).
    Unlabelled images (label -1) are never sampled. Output sorted by (label, relpath)."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1 (got {shots})")
    rel = _relpaths(ds)
    labels = np.asarray(ds.labels, dtype=np.int64)
    keys = _keys(rel, seed)
    # rank within class by (key, relpath): ties impossible in practice, still order-free
    relrank = np.empty(len(rel), dtype=np.int64)
    relrank[np.argsort(np.asarray(rel, dtype=object), kind="stable")] = np.arange(len(rel))
    order = np.lexsort((relrank, keys, labels))
    sl = labels[order]
    starts = np.searchsorted(sl, sl, side="left")
    rank = np.arange(len(sl)) - starts
    take = order[(rank < shots) & (sl >= 0)]
    counts = np.bincount(labels[labels >= 0], minlength=len(ds.classnames))
    short = [(ds.classnames[c], int(n)) for c, n in enumerate(counts) if n < shots]
    for name, n in short:
        warnings.warn(f"{ds.name}: class {name!r} has only {n} image(s) for {shots}-shot "
                      f"sampling; taking all {n}", stacklevel=2)
    take = take[np.lexsort((relrank[take], labels[take]))]
    out = ds.subset(take.tolist(), name=f"{ds.name}/{shots}shot-seed{seed}")
    out.meta["few_shot"] = {"shots": int(shots), "seed": int(seed)}
    out.meta["source_indices"] = take.tolist()
    return out


def base_new_split(classnames: Sequence[str] | int) -> tuple[list[int], list[int]]:
    """CoCoOp's base-to-new protocol: labels in order, the first ceil(K/2) are base."""
    k = classnames if isinstance(classnames, int) else len(classnames)
    m = math.ceil(k / 2)
    return list(range(m)), list(range(m, k))


def subset_classes(ds: LabeledImages, class_indices: Sequence[int], relabel: bool = True
                   ) -> LabeledImages:
    """Images of the given classes. relabel=True: labels become positions in
    `class_indices` and classnames shrink to those classes (what a base or new evaluation
    sees); relabel=False keeps the original labels and class list."""
    ci = [int(c) for c in class_indices]
    if len(set(ci)) != len(ci):
        raise ValueError("class_indices has duplicates")
    bad = [c for c in ci if not 0 <= c < len(ds.classnames)]
    if bad:
        raise ValueError(f"class index {bad[0]} outside 0..{len(ds.classnames) - 1}")
    lut = np.full(len(ds.classnames) + 1, -1, dtype=np.int64)  # last slot: label -1
    lut[ci] = np.arange(len(ci))
    labels = np.asarray(ds.labels, dtype=np.int64)
    new = lut[labels]
    keep = np.flatnonzero(new >= 0)
    out = ds.subset(keep.tolist())
    if relabel:
        out.labels = new[keep].tolist()
        out.classnames = [ds.classnames[c] for c in ci]
    out.meta["class_indices"] = ci
    out.meta["source_indices"] = keep.tolist()
    return out
