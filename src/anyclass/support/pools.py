"""Unlabelled image pools for SuS retrieval: a spec string -> a list of image files.

    folder:<dir>              every file under <dir> (recursively); sub-folder names ignored
    list:<file>               one image path per line (relative paths: against the file's dir)
    wds:<dir | shard glob>    webdataset tar shards; image members unpacked once into a cache
    world:pool                the offline world's unlabelled colour renders of all concepts

Adding a kind is one function registered with `@POOLS.register("scheme")` taking the part
after the colon and returning a `Pool`. Listing never decodes images: unreadable files are
skipped with a warning naming them when the pool is embedded (features/extract.py).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..data.base import LabeledImages
from ..errors import SpecError
from ..paths import home
from ..registry import Registry


@dataclass
class Pool:
    """An unlabelled image pool: `paths` in a fixed order (sorted where the source has none)."""

    spec: str
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def as_dataset(self) -> LabeledImages:
        """The pool as a dataset with dummy labels (-1), so features/extract.py embeds and
        caches it like any other (its key already covers paths, sizes and mtimes)."""
        return LabeledImages(f"pool:{self.spec}", list(self.paths), [-1] * len(self.paths),
                             [], "", {"pool": self.spec})


POOLS: Registry[Pool] = Registry("pool kind")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".ppm", ".tif", ".tiff")


def load_pool(spec: str, progress: bool = True) -> Pool:
    """Resolve a pool spec (see module docstring)."""
    scheme, sep, arg = spec.strip().partition(":")
    if not sep or not arg:
        raise SpecError(f"pool spec {spec!r} needs a kind: folder:<dir>, list:<file>, "
                        f"wds:<dir or shard glob> or world:pool")
    if scheme not in POOLS:
        raise SpecError(f"unknown pool spec {spec!r}: the kind must be one of "
                        + ", ".join(POOLS.names()))
    pool = POOLS.get(scheme)(arg, progress=progress)
    if not pool.paths:
        raise SpecError(f"pool {spec!r} holds no files")
    return pool


@POOLS.register("folder")
def folder_pool(arg: str, progress: bool = True) -> Pool:
    """Every non-hidden file under the folder; class sub-folders, if any, are ignored."""
    from ..data.sources import list_files
    d = os.path.abspath(os.path.expanduser(arg))
    if not os.path.isdir(d):
        raise SpecError(f"pool folder:{arg}: not a directory")
    return Pool(f"folder:{d}", [p for p in list_files(d)
                                if os.path.basename(p) != "manifest.json"])


@POOLS.register("list")
def list_pool(arg: str, progress: bool = True) -> Pool:
    """One path per line; blank lines and lines starting with # are ignored."""
    f = os.path.abspath(os.path.expanduser(arg))
    try:
        text = Path(f).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"pool list:{arg}: cannot read ({e})") from None
    base = os.path.dirname(f)
    paths = [os.path.normpath(os.path.join(base, os.path.expanduser(ln.strip())))
             for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return Pool(f"list:{f}", paths)


# ---------------------------------------------------------------------------- webdataset

def _shards(arg: str) -> list[str]:
    p = os.path.abspath(os.path.expanduser(arg))
    if os.path.isdir(p):
        out = sorted(glob.glob(os.path.join(p, "**", "*.tar"), recursive=True))
    elif any(ch in arg for ch in "*?[{"):
        out = sorted(glob.glob(p, recursive=True))
        if "{" in arg and not out:  # webdataset brace notation a-{000..009}.tar
            try:
                import braceexpand  # shipped with webdataset
                out = sorted(x for x in braceexpand.braceexpand(p) if os.path.isfile(x))
            except ImportError:
                pass
    else:
        out = [p] if os.path.isfile(p) else []
    if not out:
        raise SpecError(f"pool wds:{arg}: no .tar shards found")
    return out


def _shard_key(shards: list[str]) -> str:
    h = hashlib.sha256(b"wds-unpack/1\n")
    for s in shards:
        st = os.stat(s)
        h.update(f"{s}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:24]


def _unpack_shard(shard: str, dest: Path, warn) -> list[str]:
    """Image members of one shard -> dest/<n>_<key>.<ext>. Webdataset groups a sample's
    files by key (the name up to the first dot of the base name); one image per member."""
    out = []
    try:
        with tarfile.open(shard, "r:*") as tf:
            for n, m in enumerate(tf):
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                ext = os.path.splitext(base)[1].lower()
                if ext not in IMAGE_EXTS or base.startswith("."):
                    continue
                key = "".join(ch if ch.isalnum() or ch in "-_" else "_"
                              for ch in base.split(".")[0])[:80]
                name = f"{n:07d}_{key}{ext}"  # never a path from the archive (traversal)
                src = tf.extractfile(m)
                if src is None:
                    continue
                with open(dest / name, "wb") as f:
                    shutil.copyfileobj(src, f)
                out.append(str(dest / name))
    except (tarfile.TarError, OSError, EOFError) as e:
        warn(f"pool shard {shard}: unreadable or truncated tar ({e}); kept the "
             f"{len(out)} image(s) read before the error")
    return out


@POOLS.register("wds")
def wds_pool(arg: str, progress: bool = True) -> Pool:
    """Tar shards unpacked once into $ANYCLASS_HOME/pools/wds-<key>/ (keyed by shard paths,
    sizes and mtimes); later calls list the unpacked files. Unpacking keeps the one
    embedding path (random access by file for extraction, resume and bad-file warnings)."""
    import warnings
    shards = _shards(arg)
    root = home() / "pools" / f"wds-{_shard_key(shards)}"
    listing = root / "files.json"
    if listing.exists():
        try:
            return Pool(f"wds:{arg}", json.loads(listing.read_text()))
        except ValueError:
            pass
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        files: list[str] = []
        for i, s in enumerate(shards):
            d = tmp / f"{i:05d}"
            d.mkdir()
            got = _unpack_shard(s, d, lambda m: warnings.warn(m, stacklevel=4))
            files += [str(root / f"{i:05d}" / os.path.basename(p)) for p in got]
        (tmp / "files.json").write_text(json.dumps(files))
        try:
            os.rename(tmp, root)
        except OSError:  # another process unpacked it first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
            files = json.loads(listing.read_text())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Pool(f"wds:{arg}", files)


@POOLS.register("world")
def world_pool(arg: str, progress: bool = True) -> Pool:
    """world:pool — the offline world's unlabelled colour renders (see world/pool.py)."""
    if arg != "pool":
        raise SpecError(f"pool world:{arg}: the offline world's pool is 'world:pool'")
    from ..world.build import ensure_world
    from ..world.pool import ensure_pool
    world = ensure_world(progress=progress)
    return Pool(f"world:pool@{world.cfg.key()}", ensure_pool(world, progress=progress))
