"""The on-disk cache of text classifiers: $ANYCLASS_HOME/text-classifiers/<key>.npy + .json.

A zero-shot classifier W [D, K] is a pure function of the text tower and the sentences, so
a cached run need not load the text tower at all. The key hashes everything W depends on:
backbone identity and weights hash, the text tower's fingerprint (tokenizer and encoder,
see `backbones.card.text_fingerprint`), the templates, the class names, the CuPL
descriptions used and whether templates were used. The .npy is written first, then the
.json record vouching for it (its sha256), both atomically; a missing, truncated or
corrupted entry is simply recomputed.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import atomic_write_bytes, read_checked_json, write_checked_json
from ..paths import home

#: bump when anything that changes cached classifiers changes (sentence building, pooling)
FORMAT_VERSION = 1


def text_root() -> Path:
    return home() / "text-classifiers"


def classifier_key(identity: str, weights_hash: str, text_id: str, classnames: Sequence[str],
                   templates: Sequence[str], descriptions: dict[str, list[str]] | None,
                   with_templates: bool) -> str:
    """sha256 of everything the classifier depends on (descriptions of the task's classes
    only, so an unrelated edit of a CuPL file does not invalidate it)."""
    names = [str(c) for c in classnames]
    desc = None if descriptions is None else {c: list(descriptions.get(c, [])) for c in names}
    head = {"format": FORMAT_VERSION, "identity": identity, "weights_hash": weights_hash,
            "text": text_id, "classnames": names,
            "templates": list(templates) if with_templates else None, "descriptions": desc}
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:32]


def load_classifier(key: str) -> np.ndarray | None:
    """The cached float32 [D, K] array, or None (absent or failing its checksum)."""
    rec = read_checked_json(text_root() / f"{key}.json")
    if rec is None:
        return None
    try:
        raw = (text_root() / f"{key}.npy").read_bytes()
    except OSError:
        return None
    if hashlib.sha256(raw).hexdigest() != rec.get("sha256"):
        return None
    arr = np.load(io.BytesIO(raw), allow_pickle=False)
    return arr if list(arr.shape) == rec.get("shape") else None


def save_classifier(key: str, W: np.ndarray, info: dict[str, Any]) -> None:
    """Array first, then the record that vouches for it."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(W, dtype="<f4"), allow_pickle=False)
    raw = buf.getvalue()
    atomic_write_bytes(text_root() / f"{key}.npy", raw)
    write_checked_json(text_root() / f"{key}.json",
                       {**info, "shape": list(W.shape),
                        "sha256": hashlib.sha256(raw).hexdigest()})
