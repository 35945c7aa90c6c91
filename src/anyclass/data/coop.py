"""CoOp's split-file format: {"train": [[relpath, label, classname], ...], "val": [...],
"test": [...]}, relpaths relative to the dataset's image directory.

The same format serves CoOp's benchmark splits (split_zhou_*.json) and the offline world's
tasks, so one validated reader feeds both.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Mapping, Sequence

from ..errors import SpecError
from .base import LabeledImages

Entry = tuple[str, int, str]
SPLITS = ("train", "val", "test")


class SplitFileError(SpecError):
    """A CoOp split file that is malformed or inconsistent (names the offending entry)."""


def _check_entry(path: str, split: str, i: int, e: object) -> Entry:
    where = f"{path}: {split}[{i}]"
    if not isinstance(e, (list, tuple)) or len(e) != 3:
        raise SplitFileError(f"{where} = {e!r}: expected [relpath, label, classname]")
    rel, label, name = e
    if not isinstance(rel, str) or not rel:
        raise SplitFileError(f"{where} = {list(e)!r}: relpath must be a non-empty string")
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise SplitFileError(f"{where} = {list(e)!r}: label must be an integer >= 0")
    if not isinstance(name, str) or not name.strip():
        raise SplitFileError(f"{where} = {list(e)!r}: classname must be a non-empty string")
    return rel, label, name


def validate_splits(splits: Mapping[str, Sequence[Sequence]], path: str = "<splits>"
                    ) -> dict[str, list[Entry]]:
    """Check entries and label<->classname consistency across all splits; labels must be
    0..K-1 without gaps. Returns the splits as lists of (relpath, label, classname)."""
    out: dict[str, list[Entry]] = {}
    by_label: dict[int, tuple[str, str, int]] = {}
    by_name: dict[str, tuple[int, str, int]] = {}
    for split, entries in splits.items():
        if not isinstance(entries, list):
            raise SplitFileError(f"{path}: split {split!r} must be a list of entries")
        rows = []
        for i, e in enumerate(entries):
            rel, label, name = _check_entry(path, split, i, e)
            if label in by_label and by_label[label][0] != name:
                n0, s0, i0 = by_label[label]
                raise SplitFileError(
                    f"{path}: {split}[{i}] = {[rel, label, name]!r}: label {label} is "
                    f"{n0!r} in {s0}[{i0}]")
            if name in by_name and by_name[name][0] != label:
                l0, s0, i0 = by_name[name]
                raise SplitFileError(
                    f"{path}: {split}[{i}] = {[rel, label, name]!r}: class {name!r} has "
                    f"label {l0} in {s0}[{i0}]")
            by_label.setdefault(label, (name, split, i))
            by_name.setdefault(name, (label, split, i))
            rows.append((rel, label, name))
        out[split] = rows
    if by_label:
        missing = sorted(set(range(max(by_label) + 1)) - set(by_label))
        if missing:
            raise SplitFileError(f"{path}: labels are not contiguous: no entry has label "
                                 f"{missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                    if len(missing) > 1 else ""))
    return out


def classnames_of(splits: Mapping[str, Iterable[Entry]]) -> list[str]:
    """Class names ordered by label, over all splits."""
    names: dict[int, str] = {}
    for entries in splits.values():
        for _, label, name in entries:
            names.setdefault(label, name)
    return [names[k] for k in sorted(names)]


def read_split(path: str | os.PathLike) -> dict[str, list[Entry]]:
    """Read and validate a CoOp split JSON."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SplitFileError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SplitFileError(f"{path}: cannot read split file ({e})") from None
    if not isinstance(data, dict):
        raise SplitFileError(f"{path}: expected an object with train/val/test lists")
    return validate_splits(data, path)


def write_split(path: str | os.PathLike, splits: Mapping[str, Iterable[Sequence]]) -> None:
    """Validate and write atomically (temp file + os.replace)."""
    path = os.fspath(path)
    rows = {k: [[str(r), int(l), str(n)] for r, l, n in v] for k, v in splits.items()}
    validate_splits(rows, path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".split-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def split_to_dataset(splits: Mapping[str, Sequence[Entry]], split: str, image_root: str,
                     name: str, domain: str = "", underscores_to_spaces: bool = True,
                     meta: dict | None = None) -> LabeledImages:
    """One split as LabeledImages. Class names come from all splits (so labels agree across
    splits); like CoOp's prompt learner, underscores in names are read as spaces."""
    if split not in splits:
        raise SpecError(f"{name}: no split {split!r} (available: {', '.join(splits)})")
    classnames = classnames_of(splits)
    if underscores_to_spaces:
        classnames = [c.replace("_", " ") for c in classnames]
    root = os.path.abspath(image_root)
    entries = splits[split]
    paths = [os.path.join(root, rel) for rel, _, _ in entries]
    labels = [label for _, label, _ in entries]
    m = {"root": root, "split": split, **(meta or {})}
    return LabeledImages(name, paths, labels, classnames, domain, m)
