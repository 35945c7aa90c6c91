"""The one dataset type every source resolves to: a list of image files with labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LabeledImages:
    """Image files, integer labels and the class names they index.

    `labels[i]` indexes `classnames`; the class order is explicit and never inferred from
    directory listing order at prediction time (a known label-mismatch bug elsewhere).
    """

    name: str                     # e.g. "world:animals@colour/test", "folder:/x"
    paths: list[str]              # absolute file paths
    labels: list[int]             # -1 where unknown (unlabelled pools, classify)
    classnames: list[str]
    domain: str = ""              # free-form: "colour", "sketch", ...
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices, name: str | None = None) -> "LabeledImages":
        idx = list(indices)
        return LabeledImages(name or self.name, [self.paths[i] for i in idx],
                             [self.labels[i] for i in idx], list(self.classnames),
                             self.domain, dict(self.meta))

    @property
    def root(self) -> Path | None:
        r = self.meta.get("root")
        return Path(r) if r else None
