"""build_support: class names -> a SuS support set saved as an ordinary folder dataset.

Layout: `<root>/<class folder>/<image>` and `<root>/manifest.json`
  {"format": "anyclass-support/1", "classnames": [...], "folders": [...same order...],
   "strategy", "prompts", "pool", "backbone", "per_class", "items": [[relpath, label], ...],
   + "key", "counts", "scores", "sources", "search", "seed", "generator", ...}
The class index is the manifest's order (the order of the names given), never the sorted
folder order; the `folder:` dataset source reads it (data/sources.py).

Cached: the folder's name (default `$ANYCLASS_HOME/support/<key>`) and the manifest's "key"
hash every input that changes the result (class names, strategy, prompts and descriptions,
M, pool files with sizes and mtimes and the backbone for retrieval; generator folder,
seed, guidance, steps for generation), so the same call returns the existing folder at once.
Written atomically: built in a hidden temporary sibling, then renamed; an flock serialises
concurrent builds of one folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ..data.base import LabeledImages
from ..errors import AnyclassError
from ..paths import home
from .generate import GUIDANCE, STEPS
from .index import IVF_THRESHOLD, faiss_available

FORMAT = "anyclass-support/1"
STRATEGIES = ("retrieval", "generation")


class SupportWarning(UserWarning):
    """A class got fewer support images than asked for (the build goes on)."""


@dataclass
class SupportSet:
    """A built support set. `dataset` labels follow the order of the class names given."""

    root: Path
    dataset: LabeledImages
    counts: dict[str, int]
    manifest: dict
    reused: bool = False
    info: dict = field(default_factory=dict)   # build details: search method, timings


def default_pool(dataset_spec: str) -> str | None:
    """The pool to retrieve from for a dataset spec: the offline world's pool for `world:`
    tasks; None otherwise (the user must name a pool)."""
    return "world:pool" if dataset_spec.strip().startswith("world:") else None


def folder_names(classnames: Sequence[str]) -> list[str]:
    """Readable, filesystem-safe, unique folder names (spaces -> underscores, so the folder
    source would read the names back even without the manifest)."""
    out, seen = [], set()
    for c in classnames:
        base = re.sub(r"[^\w.\-]+", "_", c.strip()).strip("._") or "class"
        base = base[:100]
        name, n = base, 2
        while name.casefold() in seen:
            name, n = f"{base}_{n}", n + 1
        seen.add(name.casefold())
        out.append(name)
    return out


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_manifest(root: Path) -> dict | None:
    try:
        m = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def _open(root: Path, manifest: dict, reused: bool, info: dict | None = None) -> SupportSet:
    from ..data.sources import load_dataset
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no files")  # warned at build time
        ds = load_dataset(f"folder:{root}")
    counts = {c: int(n) for c, n in zip(manifest["classnames"], manifest["counts"])}
    return SupportSet(root, ds, counts, manifest, reused, info or {})


def _warn_short(counts: list[int], classnames: list[str], per_class: int, why: str) -> None:
    for c, n in zip(classnames, counts):
        if 0 < n < per_class:
            warnings.warn(f"support set: class {c!r} got only {n} of {per_class} images "
                          f"({why})", SupportWarning, stacklevel=3)
        elif n == 0:
            warnings.warn(f"support set: class {c!r} got no images ({why})", SupportWarning,
                          stacklevel=3)


def build_support(backbone, classnames: Sequence[str], *, pool: str | None = None,
                  out_dir: str | os.PathLike | None = None, strategy: str = "retrieval",
                  prompts: str = "photo",
                  descriptions: dict[str, list[str]] | str | os.PathLike | None = None,
                  per_class: int = 16, seed: int = 1, generator: str | None = None,
                  progress: bool = True, allow_partial: bool = False, search: str = "auto",
                  guidance: float = GUIDANCE, steps: int = STEPS,
                  image_size: int | None = None, batch_size: int = 256,
                  force: bool = False) -> SupportSet:
    """Build (or reuse) a SuS support set for `classnames` (see module docstring).

    retrieval: needs `pool` (a pool spec, see support/pools.py; `default_pool` gives the
    world's) and a backbone with encode_texts/encode_images. generation: needs `generator`,
    a local diffusers model folder; the backbone is not used. A class left with fewer than
    `per_class` images is warned about by name; a class with none is an error unless
    `allow_partial`. `force` replaces an `out_dir` holding something else.
    """
    from ..data.classnames import validate_classnames
    from ..data.templates import load_descriptions
    from .retrieve import class_sentences

    names = validate_classnames(list(classnames), "support set")
    if strategy not in STRATEGIES:
        raise AnyclassError(f"unknown support strategy {strategy!r} (retrieval or generation)")
    if int(per_class) < 1:
        raise AnyclassError(f"per_class must be at least 1 (got {per_class})")
    per_class = int(per_class)
    if isinstance(descriptions, (str, os.PathLike)):
        descriptions = load_descriptions(descriptions, names)
    elif descriptions is not None:
        lower = {k.lower(): v for k, v in descriptions.items()}
        descriptions = {c: descriptions.get(c, lower.get(c.lower())) for c in names}
    sentences = class_sentences(names, prompts, descriptions)

    parts: dict = {"format": FORMAT, "classnames": names, "strategy": strategy,
                   "prompts": prompts, "per_class": per_class, "sentences": sentences,
                   "allow_partial": bool(allow_partial)}
    pool_obj = None
    if strategy == "retrieval":
        if not pool:
            raise AnyclassError("retrieval needs a pool: --pool folder:DIR | list:FILE | "
                                "wds:SHARDS | world:pool")
        from ..features.cache import feature_key
        from .pools import load_pool
        pool_obj = load_pool(pool, progress=progress)
        ivf = (search != "exact" and faiss_available() and len(pool_obj) >= IVF_THRESHOLD)
        parts.update(pool=pool_obj.spec, backbone=backbone.identity, ivf=ivf,
                     pool_key=feature_key(backbone.identity, backbone.weights_hash,
                                          backbone.preprocess_id(), pool_obj.paths,
                                          extra={"support": FORMAT}))
    else:
        if not generator:
            raise AnyclassError("generation needs a local diffusers model folder: "
                                "--generator DIR")
        from .generate import generator_fingerprint
        if not Path(generator).expanduser().is_dir():
            raise AnyclassError(f"generator {generator}: not a directory")
        parts.update(generator=str(Path(generator).expanduser().resolve()),
                     generator_fp=generator_fingerprint(generator), seed=int(seed),
                     guidance=float(guidance), steps=int(steps), image_size=image_size)
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    out = Path(out_dir).expanduser() if out_dir else home() / "support" / key
    out = out.resolve()

    with _locked(out):
        old = _read_manifest(out)
        if old is not None and old.get("key") == key and not force:
            _warn_short(old["counts"], names, per_class, "as built earlier")
            return _open(out, old, reused=True)
        if out.exists() and any(out.iterdir()) and not force:
            raise AnyclassError(f"{out} exists and holds something else (another support "
                                f"set or other files); choose another output folder or "
                                f"pass force=True / --force")
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            folders = folder_names(names)
            for f in folders:
                (tmp / f).mkdir()
            if strategy == "retrieval":
                items, extra, info = _retrieve(backbone, pool_obj, names, folders, sentences,
                                               per_class, search, batch_size, progress, tmp)
                why = (f"the pool has {info['pool_valid']} readable images; its other "
                       f"candidates went to classes that scored them higher")
            else:
                items, extra, info = _generate(generator, names, folders, sentences,
                                               per_class, seed, guidance, steps, image_size,
                                               progress, tmp, backbone)
                why = "generation"
            counts = [0] * len(names)
            for _, lab in items:
                counts[lab] += 1
            empty = [c for c, n in zip(names, counts) if n == 0]
            if empty and not allow_partial:
                raise AnyclassError(
                    "support set: found no usable image for class(es) "
                    + ", ".join(repr(c) for c in empty[:10])
                    + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
                    + f" ({why}); use a larger pool, a smaller per_class, or allow partial "
                    f"sets (--allow-partial)")
            _warn_short(counts, names, per_class, why)
            manifest = {"format": FORMAT, "classnames": names, "folders": folders,
                        "strategy": strategy, "prompts": prompts, "pool": pool,
                        "backbone": getattr(backbone, "identity", None)
                        if strategy == "retrieval" else None,
                        "per_class": per_class, "items": items, "key": key,
                        "counts": counts, "seed": int(seed), **extra}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1,
                                                          ensure_ascii=False),
                                               encoding="utf-8")
            if out.exists():
                trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
                os.rename(out, trash / "x")
                os.rename(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _open(out, manifest, reused=False, info=info)


def _retrieve(backbone, pool, names, folders, sentences, per_class, search, batch_size,
              progress, tmp: Path):
    import time
    from .index import build_index
    from .retrieve import class_queries, retrieve_dedup
    t0 = time.perf_counter()
    index = build_index(backbone, pool, batch_size=batch_size, progress=progress)
    t1 = time.perf_counter()
    queries = class_queries(backbone, sentences)
    rows, scores = retrieve_dedup(index, queries, per_class, search)
    t2 = time.perf_counter()
    items, sources, sc = [], [], []
    for k, (f, rs, ss) in enumerate(zip(folders, rows, scores)):
        for rank, (row, s) in enumerate(zip(rs.tolist(), ss.tolist())):
            src = pool.paths[row]
            name = f"{rank:04d}_{os.path.basename(src)}"
            shutil.copyfile(src, tmp / f / name)
            items.append([f"{f}/{name}", k])
            sources.append(src)
            sc.append(round(float(s), 6))
    info = {"search": index.method_for(search), "pool_size": len(pool),
            "pool_valid": index.n_valid, "index_s": round(t1 - t0, 3),
            "query_s": round(t2 - t1, 3), "index_key": index.key}
    extra = {"sources": sources, "scores": sc, "search": info["search"],
             "pool_resolved": pool.spec}
    return items, extra, info


def _generate(generator, names, folders, sentences, per_class, seed, guidance, steps,
              image_size, progress, tmp: Path, backbone):
    from tqdm.auto import tqdm
    from .generate import generate_class, load_generator
    dev = getattr(backbone, "device", None) if backbone is not None else None
    pipe = load_generator(generator, device=str(dev) if dev is not None else None)
    items = []
    for k, f in enumerate(tqdm(folders, desc="generate support", disable=not progress)):
        for name in generate_class(pipe, sentences[k], k, per_class, seed, tmp / f,
                                   guidance, steps, size=image_size):
            items.append([f"{f}/{name}", k])
    extra = {"generator": str(Path(generator).expanduser().resolve()),
             "guidance": float(guidance), "steps": int(steps)}
    return items, extra, {}
