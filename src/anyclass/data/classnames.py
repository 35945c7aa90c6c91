"""Class names from users: a comma-separated string, a list, or a file (one per line).

Bad lists are refused with a one-line ClassNamesError: a classifier over zero or one class
is meaningless, and duplicates (compared case- and space-insensitively, since text encoders
lowercase) would give two indistinguishable classes.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterable

from ..errors import ClassNamesError


def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


def validate_classnames(names: Iterable[str], source: str = "") -> list[str]:
    """Strip names and check: non-empty, >= 2 classes, no duplicates. Returns the list."""
    where = f"{source}: " if source else ""
    out = [str(n).strip() for n in names]
    if any(not n for n in out):
        pos = [i + 1 for i, n in enumerate(out) if not n]
        raise ClassNamesError(f"{where}empty class name at position(s) {pos}")
    if not out:
        raise ClassNamesError(f"{where}empty class list: give at least two class names")
    if len(out) == 1:
        raise ClassNamesError(f"{where}need at least two classes (got only {out[0]!r})")
    seen: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(out):
        seen[_norm(n)].append(i + 1)
    dups = [(out[p[0] - 1], p) for p in seen.values() if len(p) > 1]
    if dups:
        desc = "; ".join(f"{name!r} at positions {', '.join(map(str, p))}" for name, p in dups)
        raise ClassNamesError(f"{where}duplicate class names: {desc}")
    return out


def parse_classes(text_or_list: str | Iterable[str], source: str = "") -> list[str]:
    """Parse class names: a list as given; a string one per line if it has several
    non-blank lines (names may then contain commas), else comma-separated. Blank entries
    are dropped; the result is validated (see validate_classnames)."""
    if isinstance(text_or_list, str):
        text = text_or_list.lstrip("\ufeff")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        items = lines if len(lines) > 1 else text.replace("\n", ",").split(",")
        names = [x.strip() for x in items if x.strip()]
    else:
        names = [str(x).strip() for x in text_or_list]
        names = [x for x in names if x]
    return validate_classnames(names, source)


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """Read a UTF-8 class file (one per line, or one comma-separated line)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ClassNamesError(f"cannot read class file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ClassNamesError(
            f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"save the file as UTF-8") from None
    return parse_classes(text, source=path)
