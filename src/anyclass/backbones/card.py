"""Backbone cards: what a cached run needs to know about a backbone without building it.

A second identical `anyclass eval` reads cached image features (keyed by identity, weights
hash and preprocessing) and a cached text classifier (keyed by identity, weights hash and
the text tower's fingerprint), so it never runs the model — yet building it (imports of
open_clip/torchvision/transformers, model construction, weight hashing) was most of its
wall time. A card records those few facts the first time a spec is built, keyed by a
*source stamp*: everything the build reads, described without reading it (model
configuration, file stat stamps, package versions, the stamps of the backbone code). The
next run with the same stamp gets a `LazyBackbone` that answers from the card and builds the
real model only when something needs it (an uncached image, an uncached classifier, a hook).

Specs without a cheap stamp (open_clip pretrained tags, Hugging Face hub ids: resolving them
needs the library and maybe the network) are always built.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import __version__
from ..atomic import file_stamp, read_checked_json, write_checked_json
from ..errors import AnyclassError
from ..paths import home

#: bump when a card's fields or their meaning change
CARD_FORMAT = 1
#: sentences whose tokens and embeddings fingerprint a text tower
PROBES = ("a photo of a dog.", "an emoji of a red apple, drawn on a white background!")
_PKG = Path(__file__).resolve().parents[1]
#: the code that decides what a backbone computes (its stat stamps are part of every stamp)
_CODE = ("backbones/builtin.py", "backbones/openclip.py", "backbones/hf.py",
         "backbones/hooks.py", "backbones/weights.py", "world/model.py", "world/textenc.py")

Builder = Callable[[str, torch.device], Any]


@dataclass(frozen=True)
class Card:
    """The facts of a built backbone that cache keys and logits need."""
    identity: str
    weights_hash: str
    preprocess_id: str
    embed_dim: int
    logit_scale: float
    logit_bias: float
    text_id: str | None
    warnings: list[list[str]] = field(default_factory=list)   # [category, message]

    def replay_warnings(self) -> None:
        """Warn what building the backbone warned (e.g. "random weights"), as it would."""
        for cat, msg in self.warnings:
            warnings.warn(msg, _category(cat), stacklevel=4)


def _category(qualname: str) -> type[Warning]:
    mod, _, name = qualname.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod or "builtins"), name)
    except (ImportError, AttributeError):
        return UserWarning
    return cls if isinstance(cls, type) and issubclass(cls, Warning) else UserWarning


# ------------------------------------------------------------------ fingerprints and stamps

def text_fingerprint(backbone: Any) -> str | None:
    """sha256 of the tokenizer's ids for PROBES and of their embeddings rounded to 0.01: a
    change of tokenizer or text weights changes it; float noise between devices almost never
    does (and then only costs a cache miss). None when the backbone cannot encode text."""
    try:
        with torch.no_grad():
            emb = backbone.encode_texts(list(PROBES)).float().cpu().numpy()
        tok = getattr(backbone, "tokenizer", None)
        ids = tok(list(PROBES)) if callable(tok) else None
        ids = ids.tolist() if hasattr(ids, "tolist") else None
    except Exception:
        return None
    blob = {"tokenizer": f"{type(tok).__module__}.{type(tok).__qualname__}", "ids": ids,
            "emb": (np.round(emb.astype(np.float64), 2) + 0.0).tolist()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def _versions(*packages: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def _code_stamp() -> list[list[Any]]:
    out = []
    for rel in _CODE:
        try:
            st = (_PKG / rel).stat()
            out.append([rel, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([rel, None, None])
    return out


def _dir_files(d: Path, limit: int = 256) -> list[dict[str, Any]] | None:
    """Stat stamps of a model folder's files; None for a folder too big to be one."""
    files: list[Path] = []
    for p in d.rglob("*"):
        if p.is_file():
            files.append(p)
            if len(files) > limit:
                return None
    return [file_stamp(p) for p in sorted(files)]


def _builtin_stamp(rest: str) -> dict[str, Any] | None:
    from ..world.model import CONFIG_FILE, WEIGHTS_FILE
    from ..world.textenc import minilm_dir
    if rest and ("/" in rest or "\\" in rest or rest.startswith(("~", ".")) or Path(rest).is_dir()):
        d, world = Path(rest).expanduser(), None
    else:
        from ..world.build import ensure_world
        from ..world.config import get_config
        from ..world.train import model_key
        w = ensure_world(get_config(rest or None))
        d, world = w.model_dir, model_key(w.cfg)
    return {"model_dir": str(d.resolve()), "world_model": world,
            "files": [file_stamp(d / WEIGHTS_FILE), file_stamp(d / CONFIG_FILE)],
            "text_tower": _dir_files(minilm_dir()),
            "versions": _versions("torch", "transformers", "tokenizers")}


def _openclip_config(name: str) -> dict[str, Any] | None:
    """The model configuration, read from open_clip's bundled JSON without importing
    open_clip (seconds); from open_clip itself when it is loaded already (configs added
    with `open_clip.add_model_config` exist only in that process)."""
    import sys
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"].get_model_config(name)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "model_configs" / f"{name}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _openclip_stamp(rest: str) -> dict[str, Any] | None:
    from .openclip import RANDOM_SEED, parse_spec
    name, kind, value = parse_spec(rest)
    cfg = _openclip_config(name)
    if kind == "tag" or cfg is None:
        return None
    return {"name": name, "config": cfg, "weights": "random" if kind == "random" else None,
            "seed": RANDOM_SEED if kind == "random" else None,
            "file": file_stamp(str(value)) if kind == "path" else None,
            "versions": _versions("torch", "open_clip_torch", "timm", "transformers",
                                  "tokenizers")}


def _hf_stamp(rest: str) -> dict[str, Any] | None:
    d = Path(rest).expanduser()
    if not rest or not d.is_dir():
        return None                          # a hub id: resolving it needs transformers
    files = _dir_files(d)
    return None if files is None else {
        "dir": str(d.resolve()), "files": files,
        "versions": _versions("torch", "transformers", "tokenizers")}


_STAMPS: dict[str, Callable[[str], dict[str, Any] | None]] = {
    "builtin": _builtin_stamp, "openclip": _openclip_stamp, "hf": _hf_stamp}


def source_stamp(spec: str) -> dict[str, Any] | None:
    """Everything building `spec` reads, described without reading it; None when that is not
    cheap to know (or the spec is broken: the real build then reports the error)."""
    scheme, _, rest = spec.strip().partition(":")
    fn = _STAMPS.get(scheme)
    try:
        stamp = fn(rest.strip()) if fn else None
    except (OSError, ValueError, AnyclassError):
        return None
    if stamp is None:
        return None
    return {"card": CARD_FORMAT, "anyclass": __version__, "spec": spec.strip(),
            "scheme": scheme, "code": _code_stamp(), **stamp}


# ------------------------------------------------------------------ the card store

def _card_path(stamp: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()
    return home() / "backbones" / f"{key[:32]}.json"


def load_card(stamp: dict[str, Any]) -> Card | None:
    rec = read_checked_json(_card_path(stamp))
    if rec is None or rec.get("stamp") != json.loads(json.dumps(stamp, default=str)):
        return None
    try:
        return Card(**rec["card"])
    except (KeyError, TypeError):
        return None


def save_card(stamp: dict[str, Any], card: Card) -> None:
    try:
        write_checked_json(_card_path(stamp),
                           {"stamp": json.loads(json.dumps(stamp, default=str)),
                            "card": asdict(card)})
    except OSError:
        pass                                   # a read-only cache: every run builds


def forget_card(stamp: dict[str, Any]) -> None:
    _card_path(stamp).unlink(missing_ok=True)


def card_of(backbone: Any, caught: Sequence[warnings.WarningMessage] = ()) -> Card:
    """The card of a built backbone (computes its text fingerprint)."""
    return Card(identity=str(backbone.identity), weights_hash=str(backbone.weights_hash),
                preprocess_id=str(backbone.preprocess_id()), embed_dim=int(backbone.embed_dim),
                logit_scale=float(backbone.logit_scale),
                logit_bias=float(getattr(backbone, "logit_bias", 0.0) or 0.0),
                text_id=text_fingerprint(backbone),
                warnings=[[f"{w.category.__module__}.{w.category.__qualname__}", str(w.message)]
                          for w in caught])


# ------------------------------------------------------------------ building

def build_recorded(build: Builder, spec: str, device: torch.device
                   ) -> tuple[Any, list[warnings.WarningMessage]]:
    """Build, recording the warnings the build emits, then emit them as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bb = build(spec, device)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return bb, list(caught)


def carded_backbone(build: Builder, spec: str, device: torch.device, lazy: bool) -> Any:
    """The factory's path: with `lazy` and a card for this exact source, a LazyBackbone;
    otherwise the real backbone (its card written, its `text_id` set so its text classifiers
    are cached)."""
    stamp = source_stamp(spec)
    if lazy and stamp is not None:
        card = load_card(stamp)
        if card is not None:
            card.replay_warnings()
            return LazyBackbone(spec, device, card, stamp, build)
    bb, caught = build_recorded(build, spec, device)
    card = card_of(bb, caught)
    bb.text_id = card.text_id
    if stamp is not None:
        save_card(stamp, card)
    return bb


class LazyBackbone:
    """A backbone that answers identity, weights hash, preprocessing id, embedding size,
    logit scale/bias and text fingerprint from its card, and builds the real model on first
    use of anything else (then forwards to it). The real model must agree with the card;
    if it does not (a source change the stamp missed), the card is dropped and the run
    stops rather than mix results of two models."""

    def __init__(self, spec: str, device: torch.device, card: Card, stamp: dict[str, Any],
                 build: Builder) -> None:
        self.spec, self.device = spec, torch.device(device)
        self._card, self._stamp, self._build, self._real = card, stamp, build, None
        self.identity, self.weights_hash = card.identity, card.weights_hash
        self.embed_dim, self.logit_scale = card.embed_dim, card.logit_scale
        self.logit_bias, self.text_id = card.logit_bias, card.text_id

    @property
    def built(self) -> bool:
        return self._real is not None

    @property
    def real(self) -> Any:
        """The real backbone, built on first access."""
        if self._real is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")       # the card replayed them already
                bb = self._build(self.spec, self.device)
            if (bb.identity, bb.weights_hash) != (self.identity, self.weights_hash):
                forget_card(self._stamp)
                raise AnyclassError(
                    f"{self.spec}: the model built now ({bb.identity}, weights "
                    f"{str(bb.weights_hash)[:12]}) is not the one its start-up card recorded "
                    f"({self.identity}, {self.weights_hash[:12]}); the card is dropped, rerun")
            bb.text_id = self.text_id
            self._real = bb
        return self._real

    def preprocess_id(self) -> str:
        return self._card.preprocess_id

    def to(self, device: torch.device | str) -> "LazyBackbone":
        self.device = torch.device(device)
        if self._real is not None:
            self._real.to(self.device)
        return self

    # the protocol's methods, explicitly (hasattr on them must not build the model)
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.real.encode_images(images)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.real.encode_texts(texts)

    def embed_words(self, text: str) -> torch.Tensor:
        return self.real.embed_words(text)

    def encode_text_with_context(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.real.encode_text_with_context(*args, **kwargs)

    def encode_images_with_prompts(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.real.encode_images_with_prompts(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_real", "_card", "_stamp", "_build", "spec"):
            raise AttributeError(name)
        return getattr(self.real, name)

    def __repr__(self) -> str:
        state = "built" if self._real is not None else "not built"
        return f"LazyBackbone({self.identity}, {state}, device={self.device})"
