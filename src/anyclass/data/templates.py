"""Prompt templates and class descriptions (CuPL) for zero-shot classifiers.

A template is a format string with one `{}` for the class name. Named sets:
  single    "a photo of a {}."
  ensemble7 the 7-template set of METHODS.md §0 (CLIP's ImageNet "simple" set)
  openai80  OpenAI's 80 ImageNet templates (as shipped by open_clip)
  dataset   the per-dataset template(s) for the dataset being evaluated (CoOp's choices,
            plus ours for the offline world's tasks); falls back to `single`
A path to a text file (one template per line) also works.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import AnyclassError

SINGLE = ["a photo of a {}."]

ENSEMBLE7 = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

# Per-dataset single templates (CoOp's), keyed by dataset name (the part after "coop:" or
# the world task name).
DATASET = {
    "imagenet": ["a photo of a {}."],
    "imagenetv2": ["a photo of a {}."],
    "imagenet_sketch": ["a photo of a {}."],
    "imagenet_a": ["a photo of a {}."],
    "imagenet_r": ["a photo of a {}."],
    "caltech101": ["a photo of a {}."],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "stanford_cars": ["a photo of a {}."],
    "oxford_flowers": ["a photo of a {}, a type of flower."],
    "food101": ["a photo of {}, a type of food."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft."],
    "sun397": ["a photo of a {}."],
    "dtd": ["{} texture."],
    "eurosat": ["a centered satellite photo of {}."],
    "ucf101": ["a photo of a person doing {}."],
}


def _openai80() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def get_templates(name: str = "single", dataset: str | None = None,
                  dataset_templates: list[str] | None = None) -> list[str]:
    """Resolve a template-set name (or file path) to format strings.

    `dataset_templates` lets a dataset carry its own templates (world tasks do).
    """
    if name == "single":
        return list(SINGLE)
    if name in ("ensemble7", "7"):
        return list(ENSEMBLE7)
    if name in ("openai80", "openai", "80"):
        return _openai80()
    if name == "dataset":
        if dataset_templates:
            return list(dataset_templates)
        return list(DATASET.get((dataset or "").lower(), SINGLE))
    p = Path(name)
    if p.is_file():
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        bad = [ln for ln in lines if ln.count("{}") != 1]
        if not lines or bad:
            raise AnyclassError(f"template file {p}: every line needs exactly one '{{}}'"
                                + (f" (bad: {bad[0]!r})" if bad else " (file is empty)"))
        return lines
    raise AnyclassError(f"unknown template set {name!r} (known: single, ensemble7, openai80, "
                        "dataset, or a file with one template per line)")


def load_descriptions(path: str | Path, classnames: list[str]) -> dict[str, list[str]]:
    """CuPL descriptions: JSON {"class name": ["sentence.", ...]}; every class must have one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnyclassError(f"cannot read descriptions file {p}: {e}") from None
    if not isinstance(data, dict):
        raise AnyclassError(f"descriptions file {p}: expected a JSON object class -> [sentences]")
    lower = {k.lower(): v for k, v in data.items()}
    out: dict[str, list[str]] = {}
    missing = []
    for c in classnames:
        sents = data.get(c, lower.get(c.lower()))
        if not sents or not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            missing.append(c)
        else:
            out[c] = [s.strip() for s in sents if s.strip()]
    if missing:
        raise AnyclassError(f"descriptions file {p} has no sentences for class(es): "
                            + ", ".join(repr(m) for m in missing[:5])
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return out
