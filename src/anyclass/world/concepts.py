"""Concepts of the offline world: emoji drawn in both Noto Color Emoji and Symbola.

A concept is one Unicode code point whose glyph exists in both fonts' cmaps (the colour
"photo" and monochrome "sketch" domains), with its names, keywords and WordNet noun synset.
Building the list needs the font cmaps and WordNet (~10 s), so it is cached as JSON under
`$ANYCLASS_HOME/world/`, keyed by everything that determines it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import AnyclassError
from ..paths import home
from .config import WORLD_VERSION, WorldConfig

NOTO_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
SYMBOLA_CANDIDATES = (Path("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"),
                      Path("/usr/share/fonts/truetype/ancient-scripts/Symbola.ttf"),
                      Path("/usr/share/fonts/truetype/symbola/Symbola.ttf"))

# Bump when the concept list or its mapping rules change (part of the cache key).
CONCEPTS_VERSION = "1"


@dataclass(frozen=True)
class Concept:
    """One emoji concept. `id` ("u1f436") is stable across machines and versions."""

    id: str
    codepoint: int
    char: str                      # the fully-qualified emoji string (may end in U+FE0F)
    name: str                      # Unicode name, lowercase: "dog face"
    label: str                     # short readable name: "dog"
    keywords: tuple[str, ...]      # label, CLDR name, Unicode name, aliases (unique, ordered)
    synset: str | None             # WordNet noun synset, e.g. "dog.n.01"
    synset_how: str = "none"       # how it was mapped: direct | rule | curated | none

    @property
    def glyph(self) -> str:
        """The bare code point, which both fonts map (Symbola has no variation selectors)."""
        return chr(self.codepoint)


def concept_id(codepoint: int) -> str:
    return f"u{codepoint:04x}"


def noto_font_path() -> Path:
    if not NOTO_FONT.exists():
        raise AnyclassError(f"{NOTO_FONT} not found: install the Debian package "
                            "fonts-noto-color-emoji")
    return NOTO_FONT


@lru_cache(maxsize=1)
def symbola_font_path() -> Path:
    """Symbola's file; its directory differs between Debian releases, so ask fontconfig last."""
    for p in SYMBOLA_CANDIDATES:
        if p.exists():
            return p
    try:
        import subprocess
        out = subprocess.run(["fc-list", "Symbola", "file"], capture_output=True, text=True,
                             timeout=20).stdout
        for line in out.splitlines():
            p = Path(line.split(":")[0].strip())
            if p.exists():
                return p
    except (OSError, subprocess.SubprocessError):
        pass
    raise AnyclassError("the Symbola font was not found: install the Debian package "
                        "fonts-symbola")


def _clean(text: str) -> str:
    text = text.strip(":").replace("_", " ").replace("’", "'").replace("“", "").replace("”", "")
    return re.sub(r"\s+", " ", text).strip().lower()


# Animal faces live in these blocks; elsewhere "... face" is a facial expression.
_ANIMAL_FACE_RANGES = ((0x1F400, 0x1F43F), (0x1F980, 0x1F9AF))


def _short_label(cldr: str, codepoint: int) -> str:
    """CLDR short name, with " face" dropped for animal faces ("dog face" → "dog")."""
    label = cldr
    if label.endswith(" face") and any(a <= codepoint <= b for a, b in _ANIMAL_FACE_RANGES):
        label = label[: -len(" face")]
    return label


def _cache_key() -> str:
    from importlib.metadata import version
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / f).read_bytes()
                                   for f in ("concepts.py", "wordnet.py"))).hexdigest()
    parts = [CONCEPTS_VERSION, WORLD_VERSION, version("emoji"), version("nltk"),
             unicodedata.unidata_version, code]
    for p in (noto_font_path(), symbola_font_path()):
        st = p.stat()
        parts += [p.name, str(st.st_size)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _build_all() -> list[Concept]:
    """Scan the emoji table against both fonts' cmaps and map each concept to WordNet."""
    import emoji
    from fontTools.ttLib import TTFont

    from .wordnet import map_to_synset

    cmaps = [TTFont(str(p), lazy=True).getBestCmap()
             for p in (noto_font_path(), symbola_font_path())]
    chosen: dict[int, tuple[str, dict]] = {}
    for char, data in emoji.EMOJI_DATA.items():
        bare = char.replace("\ufe0f", "")
        if len(bare) != 1:
            continue  # sequences (ZWJ, keycaps, flags, skin tones): Symbola has none
        cp = ord(bare)
        if data.get("status") == emoji.STATUS["component"]:
            continue  # skin-tone swatches and hair components: not things
        if not all(cp in cm for cm in cmaps):
            continue
        # keep the fully-qualified spelling (status 2) when both forms are listed
        if cp not in chosen or data.get("status") == emoji.STATUS["fully_qualified"]:
            chosen[cp] = (char, data)
    out: list[Concept] = []
    for cp in sorted(chosen):
        char, data = chosen[cp]
        name = unicodedata.name(chr(cp), "").lower() or _clean(data["en"])
        cldr = _clean(data["en"])
        aliases = tuple(_clean(a) for a in data.get("alias", ())
                        if re.fullmatch(r":[A-Za-z][A-Za-z_ '’-]*:", a))
        label = _short_label(cldr, cp)
        keywords = tuple(dict.fromkeys(k for k in (label, cldr, name, *aliases) if k))
        synset, how = map_to_synset(cp, cldr, name, aliases)
        out.append(Concept(concept_id(cp), cp, char, name, label, keywords, synset, how))
    return out


@lru_cache(maxsize=4)
def _all_concepts(cache_dir: str) -> tuple[Concept, ...]:
    path = Path(cache_dir) / f"concepts-{_cache_key()}.json"
    if path.exists():
        try:
            rows = json.loads(path.read_text())
            return tuple(Concept(**{**r, "keywords": tuple(r["keywords"])}) for r in rows)
        except (ValueError, TypeError, KeyError):
            pass  # truncated or stale: rebuild below
    concepts = _build_all()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".concepts-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump([asdict(c) for c in concepts], f, ensure_ascii=False, indent=0)
    os.replace(tmp, path)
    for old in path.parent.glob("concepts-*.json"):   # lists of older code/fonts: stale
        if old != path:
            old.unlink(missing_ok=True)
    return tuple(concepts)


def all_concepts() -> list[Concept]:
    """Every concept (both fonts), in code point order."""
    return list(_all_concepts(str(home() / "world")))


def load_concepts(cfg: WorldConfig | None = None) -> list[Concept]:
    """The concepts of a world configuration, in code point order.

    `cfg.max_concepts` caps the count (mini world) but always keeps every concept the
    configuration's tasks use; the rest are filled evenly across the code point range so the
    subset keeps the variety of the whole.
    """
    from .config import get_config
    from .tasks import task_concept_ids

    cfg = cfg or get_config()
    concepts = all_concepts()
    if cfg.max_concepts is None or cfg.max_concepts >= len(concepts):
        return concepts
    keep = set(task_concept_ids(cfg))
    rest = [c for c in concepts if c.id not in keep]
    n_fill = max(0, cfg.max_concepts - len(keep))
    if n_fill and rest:
        step = len(rest) / n_fill
        keep |= {rest[int(i * step)].id for i in range(min(n_fill, len(rest)))}
    return [c for c in concepts if c.id in keep]


def concept_map(concepts: list[Concept] | None = None) -> dict[str, Concept]:
    """id → concept."""
    return {c.id: c for c in (concepts if concepts is not None else all_concepts())}
