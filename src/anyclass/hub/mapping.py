"""Class name → WordNet noun synset, for models' heads and for tasks' classes.

Order of attempts, each with a confidence in [0, 1] and a `how`:
1. `override` — a user's file or dict (name → synset name or wnid; null = "no synset"),
   checked against WordNet when loaded (an invalid synset is an error naming it).
2. `exact` — the whole name is a WordNet noun lemma (plurals via morphy): one noun sense →
   confidence 0.95.
3. `head_noun` — no lemma for the whole name: the part before a preposition ("of", "with",
   "behind", ...) or before a participle that follows a noun ("person lifting weights"), then
   modifiers dropped from the left until a lemma remains ("red apple" → apple,
   "bottle of wine" → bottle); one sense → 0.75.
4. several senses (after 2 or 3) → `+context`: disambiguation by text similarity, with the
   frozen MiniLM sentence tower of the offline world (world/textenc.py, embeddings cached on
   disk). The query is the name plus, when `context`, the mean embedding of its sibling class
   names in the task (so "mouse" among keyboard/monitor picks the device, among cat/hamster
   the rodent; weight 1.5 on the siblings' normalised mean); each candidate sense is
   "lemma (a kind of <hypernym>): definition". Score = cosine + small priors for depictable
   senses (animals, artifacts, food, ...: images show things) and for WordNet's most frequent
   sense, minus a penalty for instances (named individuals: Hart Crane is not a class);
   confidence = softmax(score/τ) of the winner × the step's base (0.9 exact, 0.7 head noun),
   runners-up in `alternatives`. `how` ends in "+context" (siblings used) or "+gloss".
Names nothing matches get synset None, how "none", confidence 0, and one warning lists them:
reported, never dropped.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping as TMapping, Sequence

import numpy as np

from ..errors import AnyclassError

EXACT_SINGLE = 0.95
EXACT_MULTI = 0.9
HEAD_SINGLE = 0.75
HEAD_MULTI = 0.7
TAU = 0.05                 # softmax temperature over candidate scores (cosine units)
CONTEXT_WEIGHT = 1.5       # weight of the siblings' mean embedding in the query (tuned on 13
                           # ambiguous names: mouse, bat, crane, seal, monitor, ...)
PRIOR_DEPICTABLE = 0.03
PRIOR_FREQUENT = 0.04
PENALTY_INSTANCE = 0.1
_DEPICTABLE = {"noun.animal", "noun.artifact", "noun.food", "noun.plant", "noun.object",
               "noun.person", "noun.body", "noun.phenomenon", "noun.shape", "noun.substance"}
_PREPS = (" of ", " with ", " without ", " in ", " on ", " at ", " for ", " from ", " behind ",
          " under ", " over ", " and ", ", ")


class MappingError(AnyclassError, ValueError):
    """An override naming a synset WordNet does not have, or an unreadable override file."""


@dataclass
class Mapping:
    name: str
    synset: str | None
    confidence: float
    how: str                                  # override | exact | head_noun [+context] | none
    alternatives: list[tuple[str, float]] = field(default_factory=list)


def _normalise(name: str) -> str:
    return re.sub(r"\s+", " ", str(name).replace("_", " ").strip()).lower()


def load_overrides(path: str | Path) -> dict[str, str | None]:
    """Read an override file: JSON {name: synset|wnid|null} or TSV lines "name<TAB>synset"
    ('#' comments, empty synset = no synset). Every synset is checked against WordNet."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MappingError(f"cannot read override file {path}: {e.strerror}") from None
    out: dict[str, str | None] = {}
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            d = json.loads(text)
        except ValueError as e:
            raise MappingError(f"override file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise MappingError(f"override file {path} must hold a JSON object name → synset")
        out = {str(k): (str(v) if v else None) for k, v in d.items()}
        where = {k: f"{path} key {k!r}" for k in out}
    else:
        where = {}
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise MappingError(f"{path}:{i}: expected 'class name<TAB>synset', got "
                                   f"{line[:80]!r}")
            out[parts[0].strip()] = parts[1].strip() or None
            where[parts[0].strip()] = f"{path}:{i}"
    return check_overrides(out, where)


def check_overrides(overrides: TMapping[str, str | None],
                    where: TMapping[str, str] | None = None) -> dict[str, str | None]:
    """Overrides with every value resolved to a synset name; MappingError naming the first
    invalid one (and where it came from)."""
    from .graph import GraphError, resolve_synset
    out: dict[str, str | None] = {}
    for k, v in overrides.items():
        if v is None:
            out[k] = None
            continue
        try:
            out[k] = resolve_synset(v).name()
        except GraphError:
            src = f" ({where[k]})" if where and k in where else ""
            raise MappingError(f"override for {k!r} names {v!r}, which is not a WordNet noun "
                               f"synset{src}") from None
    return out


def _senses(wn: Any, phrase: str) -> list[Any]:
    if not re.search(r"[a-z]", phrase):
        return []
    for variant in (phrase.replace(" ", "_"), phrase.replace(" ", "_").replace("-", "_"),
                    phrase.replace("-", "")):
        try:
            syns = wn.synsets(variant, pos="n")
        except Exception:
            syns = []
        if syns:
            return syns
    return []


def _head_noun(wn: Any, phrase: str) -> tuple[str, list[Any]]:
    """(head phrase, its senses) for a phrase WordNet lacks as a whole."""
    parts = [phrase]
    cuts = [phrase.index(sep) for sep in _PREPS if sep in phrase]
    words = phrase.split()
    # "person lifting weights" → person: the words before a participle, when they are a noun
    ing = next((i for i, w in enumerate(words) if i > 0 and w.endswith("ing")
                and not words[i - 1].endswith("ing") and _senses(wn, " ".join(words[:i]))),
               None)
    if ing is not None:
        cuts.append(len(" ".join(words[:ing])))
    if cuts:
        parts.insert(0, phrase[:min(cuts)].strip())
    for part in parts:
        words = part.split()
        for i in range(1 if part == phrase else 0, len(words)):
            tail = " ".join(words[i:])
            syns = _senses(wn, tail)
            if syns:
                return tail, syns
    return "", []


def _singular(wn: Any, phrase: str) -> str:
    """The lemma form of the phrase's last word ("dogs" → "dog") for frequency counts."""
    words = phrase.split()
    base = wn.morphy(words[-1], "n") if words else None
    return " ".join(words[:-1] + [base or words[-1]]) if words else phrase


def _gloss(syn: Any) -> str:
    """"crane (a kind of wading bird): large long-necked wading bird of marshes and plains" —
    the hypernym ties the sense to sibling classes of the same kind."""
    lemma = syn.lemmas()[0].name().replace("_", " ")
    hyper = (syn.hypernyms() or syn.instance_hypernyms() or [None])[0]
    kind = f" (a kind of {hyper.lemmas()[0].name().replace('_', ' ')})" if hyper else ""
    return f"{lemma}{kind}: {syn.definition()}"


def _prior(syns: Sequence[Any], phrase: str) -> np.ndarray:
    """Small score bonuses: depictable lexicographer file, WordNet sense frequency (tagged
    lemma counts, relative to the most frequent candidate); a penalty for instances (one
    named individual, e.g. the writer Hart Crane) — class names name kinds."""
    key = phrase.replace(" ", "_")
    counts = np.array([sum(lem.count() for lem in s.lemmas() if lem.name().lower() == key)
                       for s in syns], float)
    freq = np.log1p(counts) / max(np.log1p(counts.max()), 1e-9) if counts.max() > 0 else \
        np.zeros(len(syns))
    return np.array([PRIOR_DEPICTABLE * (s.lexname() in _DEPICTABLE)
                     + PRIOR_FREQUENT * f - PENALTY_INSTANCE * bool(s.instance_hypernyms())
                     for s, f in zip(syns, freq)])


def map_classnames(names: Sequence[str], context: bool = True,
                   overrides: TMapping[str, str | None] | str | Path | None = None,
                   warn: bool = True) -> list[Mapping]:
    """One Mapping per name, in order (see the module docstring). `context`: the other names
    help disambiguate each one. `overrides`: a dict or an override file path."""
    from ..world.wordnet import get_wordnet
    wn = get_wordnet()
    if isinstance(overrides, (str, Path)):
        ov = load_overrides(overrides)
    else:
        ov = check_overrides(overrides or {})
    ov_norm = {_normalise(k): v for k, v in ov.items()}
    names = list(names)
    out: list[Mapping | None] = [None] * len(names)
    pending: list[tuple[int, str, list[Any], float, float, str]] = []
    for i, name in enumerate(names):
        key = _normalise(name)
        if name in ov or key in ov_norm:
            s = ov[name] if name in ov else ov_norm[key]
            out[i] = Mapping(name, s, 1.0 if s else 0.0, "override")
            continue
        phrase = re.sub(r"\s*\(.*?\)\s*", " ", key).strip() or key   # "crane (bird)"
        syns, how, single, multi = _senses(wn, phrase), "exact", EXACT_SINGLE, EXACT_MULTI
        head = phrase
        if not syns:
            head, syns = _head_noun(wn, phrase)
            how, single, multi = "head_noun", HEAD_SINGLE, HEAD_MULTI
        syns = list(dict.fromkeys(syns))
        if not syns:
            out[i] = Mapping(name, None, 0.0, "none")
        elif len(syns) == 1:
            out[i] = Mapping(name, syns[0].name(), single, how)
        else:
            pending.append((i, _singular(wn, head), syns, single, multi, how))
    if pending:
        _disambiguate(names, pending, out, context)
    result = [m for m in out if m is not None]
    missing = [m.name for m in result if m.synset is None and m.how == "none"]
    if missing and warn:
        warnings.warn(f"{len(missing)} class name(s) map to no WordNet synset (kept, without a "
                      f"graph node; add them to an override file): "
                      f"{', '.join(map(repr, missing[:20]))}", stacklevel=2)
    return result


def _encode(texts: list[str]) -> dict[str, np.ndarray]:
    """Text → L2-normalised MiniLM embedding, via the on-disk sentence cache."""
    from ..world.textenc import shared_text_tower, text_cache
    uniq = list(dict.fromkeys(texts))
    emb = text_cache().encode(shared_text_tower(), uniq).numpy()
    return dict(zip(uniq, emb))


def _disambiguate(names: list[str], pending: list, out: list, context: bool) -> None:
    keys = [_normalise(n) for n in names]
    texts = list(keys) + [_gloss(s) for _, _, syns, *_ in pending for s in syns]
    E = _encode(texts)
    name_emb = np.stack([E[k] for k in keys])
    total = name_emb.sum(0)
    for i, head, syns, _single, multi, how in pending:
        key = keys[i]
        q = E[key].copy()
        if context and len(names) > 1:
            sib = (total - name_emb[i]) / (len(names) - 1)          # mean of the siblings
            q = q + CONTEXT_WEIGHT * sib / max(np.linalg.norm(sib), 1e-9)
        q /= max(np.linalg.norm(q), 1e-9)
        G = np.stack([E[_gloss(s)] for s in syns])
        score = G @ q + _prior(syns, head)
        p = np.exp((score - score.max()) / TAU)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        best = int(order[0])
        alts = [(syns[j].name(), round(float(p[j]), 4)) for j in order[1:4]]
        out[i] = Mapping(names[i], syns[best].name(), round(float(p[best]) * multi, 4),
                         f"{how}+context" if context and len(names) > 1 else f"{how}+gloss",
                         alts)
