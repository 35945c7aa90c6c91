"""Dataset specs -> LabeledImages.

    world:<task>[@<domain>]         the offline world's tasks (default domain colour; also
                                    sketch, rendition, v2, adversarial)
    folder:<dir>                    one sub-folder per class (optionally under train/val/test)
    csv:<file>                      columns path,label (+ optional classname, split)
    coop:<name>@<root>              CoOp's DATASETS.md layout (11 datasets + ImageNet variants)

Each scheme is one function registered in SOURCES; each CoOp dataset one in COOP. Listing
never decodes images: unreadable or non-image files are kept and are skipped, with a warning
naming them, when features are extracted (one place for that policy, and listing 1.2M
ImageNet files stays cheap).
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from functools import partial
from typing import Callable

from ..errors import SpecError
from ..registry import Registry
from .base import LabeledImages
from .classnames import validate_classnames
from .coop import classnames_of, read_split, split_to_dataset

Source = Callable[[str, str], LabeledImages]
SOURCES: Registry[LabeledImages] = Registry("dataset source")
COOP: Registry[LabeledImages] = Registry("CoOp dataset")

SPLITS = ("train", "val", "test")


def load_dataset(spec: str, split: str = "test") -> LabeledImages:
    """Resolve a dataset spec (see module docstring) to one split."""
    if split not in SPLITS:
        raise SpecError(f"unknown split {split!r} (use train, val or test)")
    scheme, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise SpecError(f"dataset spec {spec!r} needs a scheme: world:<task>, folder:<dir>, "
                        f"csv:<file> or coop:<name>@<root>")
    if scheme not in SOURCES:
        raise SpecError(f"unknown dataset spec {spec!r}: the scheme must be one of "
                        + ", ".join(SOURCES.names()))
    ds = SOURCES.get(scheme)(arg, split)
    ds.meta.setdefault("spec", spec)
    ds.meta.setdefault("split", split)
    return ds


# --------------------------------------------------------------------------- helpers

def _hidden(name: str) -> bool:
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def _subdirs(d: str) -> list[str]:
    with os.scandir(d) as it:
        return sorted(e.name for e in it if not _hidden(e.name) and e.is_dir())


def _loose_files(d: str) -> list[str]:
    with os.scandir(d) as it:
        return sorted(e.name for e in it if not _hidden(e.name) and e.is_file())


def list_files(d: str) -> list[str]:
    """Every non-hidden regular file under `d` (recursively), sorted, absolute. Hidden
    files (.DS_Store, AppleDouble ._x) are OS litter, not user data, and are not listed."""
    out: list[str] = []
    for cur, dirs, files in os.walk(d, followlinks=True):
        dirs[:] = sorted(x for x in dirs if not _hidden(x))
        out.extend(os.path.join(cur, f) for f in files if not _hidden(f))
    out.sort()
    return out


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start})") from None


# --------------------------------------------------------------------------- world

@SOURCES.register("world")
def world_source(arg: str, split: str) -> LabeledImages:
    """world:<task>[@<domain>]: a task of the offline world in one of its domains (colour,
    sketch, rendition, v2, adversarial), built on first use; checked before any build."""
    task, _, domain = arg.partition("@")
    domain = {"": "colour", "color": "colour"}.get(domain, domain)
    from ..world.config import get_config
    from ..world.render import DOMAINS
    from ..world.tasks import get_tasks
    if domain not in DOMAINS:
        raise SpecError(f"world:{arg}: unknown domain {domain!r} (known: {', '.join(DOMAINS)})")
    known = get_tasks(get_config())
    if task not in known:
        raise SpecError(f"world:{arg}: unknown world task {task!r} (known: {', '.join(known)})")
    from ..world.build import ensure_world
    world = ensure_world()
    split_file = world.split_file(task, domain)
    root = world.image_root
    root = root(domain) if callable(root) else root
    splits = read_split(split_file)
    return split_to_dataset(splits, split, os.fspath(root), f"world:{task}@{domain}/{split}",
                            domain=domain, meta={"task": task, "split_file": str(split_file)})


# --------------------------------------------------------------------------- folder

@SOURCES.register("folder")
def folder_source(arg: str, split: str) -> LabeledImages:
    """folder:<dir>: one sub-folder per class (name = class, underscores read as spaces,
    labels in sorted folder-name order). With train/val/test sub-folders, each holds the
    class folders of that split; without, the folder has one split, "test" (everything).
    A <dir>/manifest.json (support sets write one) fixes names and order instead: label i
    is its classnames[i], read from folder folders[i]."""
    d = os.path.abspath(os.path.expanduser(arg))
    if not os.path.isdir(d):
        raise SpecError(f"folder:{arg}: not a directory")
    top = _subdirs(d)
    split_layout = bool(top) and set(top) <= set(SPLITS)
    if split_layout:
        if split not in top:
            raise SpecError(f"folder:{arg}: no {split!r} sub-folder (has: {', '.join(top)})")
        folders = sorted({c for s in top for c in _subdirs(os.path.join(d, s))})
        base = os.path.join(d, split)
    else:
        if split != "test":
            raise SpecError(f"folder:{arg} has no train/val/test sub-folders, so its only "
                            f"split is 'test' (all images); asked for {split!r}")
        folders, base = top, d
    manifest = _folder_manifest(d, arg)
    if manifest is not None:
        classnames, folders = _manifest_classes(manifest, d, base, folders, arg, split_layout)
    if not folders:
        raise SpecError(f"folder:{arg}: no class sub-folders (expected <dir>/<class>/<image>)")
    loose = [f for f in _loose_files(base) if not (manifest is not None and base == d
                                                   and f == "manifest.json")]
    if loose:
        warnings.warn(f"folder:{arg}: ignoring {len(loose)} file(s) outside class folders "
                      f"(e.g. {loose[0]})", stacklevel=3)
    if manifest is None:
        classnames = [f.replace("_", " ") for f in folders]
    classnames = validate_classnames(classnames, f"folder:{arg}")
    paths: list[str] = []
    labels: list[int] = []
    for label, f in enumerate(folders):
        cdir = os.path.join(base, f)
        files = list_files(cdir) if os.path.isdir(cdir) else []
        if not files and not split_layout:
            warnings.warn(f"folder:{arg}: class folder {f!r} has no files", stacklevel=3)
        paths += files
        labels += [label] * len(files)
    name = f"folder:{d}/{split}" if split_layout else f"folder:{d}"
    meta = {"root": base, "class_folders": folders}
    if manifest is not None:
        meta["manifest"] = os.path.join(d, "manifest.json")
    return LabeledImages(name, paths, labels, classnames, "", meta)


def _folder_manifest(d: str, arg: str) -> dict | None:
    """<dir>/manifest.json (written by `anyclass support build`, or by hand): its
    "classnames" and "folders" fix the class index, so labels never depend on how folder
    names sort."""
    p = os.path.join(d, "manifest.json")
    if not os.path.isfile(p):
        return None
    try:
        with open(p, "rb") as f:
            m = json.loads(_decode(f.read(), p))
    except ValueError as e:
        raise SpecError(f"folder:{arg}: manifest.json is not valid JSON ({e})") from None
    if (not isinstance(m, dict) or not isinstance(m.get("classnames"), list)
            or not isinstance(m.get("folders", m["classnames"]), list)):
        raise SpecError(f"folder:{arg}: manifest.json needs a \"classnames\" list (and "
                        f"optionally \"folders\", one per class, same order)")
    return m


def _manifest_classes(m: dict, d: str, base: str, found: list[str], arg: str,
                      split_layout: bool) -> tuple[list[str], list[str]]:
    """(classnames, folders) in manifest order; a class whose folder is missing is an error
    naming it, a folder the manifest does not list is ignored with a warning."""
    names = [str(c) for c in m["classnames"]]
    folders = [str(f) for f in m.get("folders", names)]
    if len(folders) != len(names):
        raise SpecError(f"folder:{arg}: manifest.json lists {len(names)} classnames but "
                        f"{len(folders)} folders")
    present = set(found)
    for c, f in zip(names, folders):
        if f not in present:  # split layout: `found` is the union over the splits
            raise SpecError(f"folder:{arg}: class {c!r} of manifest.json has no folder "
                            f"{f!r} in {base if not split_layout else d}")
    extra = sorted(present - set(folders))
    if extra:
        warnings.warn(f"folder:{arg}: ignoring {len(extra)} folder(s) not listed in "
                      f"manifest.json (e.g. {extra[0]!r})", stacklevel=4)
    return names, folders


# --------------------------------------------------------------------------- csv

_PATH_COLS = ("path", "image", "file", "filepath", "filename")
_LABEL_COLS = ("label", "class", "target")
_NAME_COLS = ("classname", "class_name")


def _pick(header: list[str], options: tuple[str, ...]) -> int | None:
    for o in options:
        if o in header:
            return header.index(o)
    return None


def _classes_file_near(csv_path: str) -> str | None:
    stem = os.path.splitext(csv_path)[0]
    for cand in (stem + ".classes.txt", os.path.join(os.path.dirname(csv_path),
                                                     "classnames.txt")):
        if os.path.isfile(cand):
            return cand
    return None


@SOURCES.register("csv")
def csv_source(arg: str, split: str) -> LabeledImages:
    """csv:<file> with a header. Columns: path (relative paths resolved against the CSV's
    folder), label (class name or integer; empty = unlabelled), optional classname (names
    for integer labels) and split (train/val/test; without it the only split is "test").
    Class order: <stem>.classes.txt or classnames.txt next to the CSV if present, else the
    classname column by label, else sorted unique label names."""
    path = os.path.abspath(os.path.expanduser(arg))
    try:
        with open(path, "rb") as f:
            text = _decode(f.read(), path)
    except OSError as e:
        raise SpecError(f"csv:{arg}: cannot read ({e.strerror or e})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise SpecError(f"csv:{arg}: empty file (expected a header path,label)")
    header = [h.strip().lower() for h in rows[0]]
    pc, lc, nc = _pick(header, _PATH_COLS), _pick(header, _LABEL_COLS), _pick(header, _NAME_COLS)
    sc = _pick(header, ("split",))
    if lc is None:
        lc = nc
    if pc is None or lc is None:
        raise SpecError(f"csv:{arg}: header must name a path and a label column "
                        f"(got {rows[0]!r})")
    base = os.path.dirname(path)
    body = [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]
    recs = []
    for line, r in body:
        if len(r) < len(header):
            raise SpecError(f"csv:{arg}: line {line} has {len(r)} fields, header has "
                            f"{len(header)}")
        p = r[pc].strip()
        if not p:
            raise SpecError(f"csv:{arg}: line {line}: empty path")
        recs.append((line, os.path.join(base, os.path.expanduser(p)), r[lc].strip(),
                     r[nc].strip() if nc is not None and nc != lc else "",
                     r[sc].strip().lower() if sc is not None else ""))
    given = [x[2] for x in recs if x[2]]
    integer = bool(given) and all(g.lstrip("-").isdigit() for g in given)
    cfile = _classes_file_near(path)
    if cfile is not None:
        from .classnames import read_classes_file
        classnames = read_classes_file(cfile)
    elif integer:
        names: dict[int, str] = {}
        for line, _, lab, nm, _ in recs:
            if lab and nm:
                if names.setdefault(int(lab), nm) != nm:
                    raise SpecError(f"csv:{arg}: line {line}: label {lab} is named {nm!r} "
                                    f"but {names[int(lab)]!r} elsewhere")
        if not names:
            raise SpecError(f"csv:{arg}: integer labels need class names: add a classname "
                            f"column or a classnames.txt (one per line) next to the CSV")
        k = max(names) + 1
        missing = [i for i in range(k) if i not in names]
        if missing:
            raise SpecError(f"csv:{arg}: no class name for label {missing[0]}")
        classnames = [names[i] for i in range(k)]
    else:
        classnames = sorted(set(given))
    classnames = validate_classnames(classnames, f"csv:{arg}")
    index = {c: i for i, c in enumerate(classnames)}
    if sc is not None:
        recs = [x for x in recs if x[4] == split]
        if not recs:
            raise SpecError(f"csv:{arg}: no rows with split {split!r}")
    elif split != "test":
        raise SpecError(f"csv:{arg} has no split column, so its only split is 'test' "
                        f"(all rows); asked for {split!r}")
    paths, labels = [], []
    for line, p, lab, _, _ in recs:
        if not lab:
            y = -1
        elif integer:
            y = int(lab)
            if not 0 <= y < len(classnames):
                raise SpecError(f"csv:{arg}: line {line}: label {y} outside "
                                f"0..{len(classnames) - 1}")
        elif lab in index:
            y = index[lab]
        else:
            raise SpecError(f"csv:{arg}: line {line}: label {lab!r} not in the class list "
                            f"({cfile})")
        paths.append(p)
        labels.append(y)
    name = f"csv:{path}/{split}" if sc is not None else f"csv:{path}"
    return LabeledImages(name, paths, labels, classnames, "", {"root": base})


# --------------------------------------------------------------------------- coop

_ALIASES = {"imagenet_v2": "imagenetv2", "imagenetsketch": "imagenet_sketch",
            "imagenet_adversarial": "imagenet_a", "imagenet_rendition": "imagenet_r",
            "caltech_101": "caltech101", "flowers102": "oxford_flowers",
            "describabletextures": "dtd", "food_101": "food101", "sun": "sun397",
            "ucf_101": "ucf101", "pets": "oxford_pets", "cars": "stanford_cars",
            "aircraft": "fgvc_aircraft"}


@SOURCES.register("coop")
def coop_source(arg: str, split: str) -> LabeledImages:
    """coop:<name>@<root>: <root> is CoOp's DATA folder (holding e.g. caltech-101/) or the
    dataset's own folder."""
    name, sep, root = arg.partition("@")
    if not sep or not root:
        raise SpecError(f"coop:{arg}: give the data root: coop:<name>@<root> "
                        f"(datasets: {', '.join(COOP.names())})")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    ds = COOP.get(key)(os.path.abspath(os.path.expanduser(root)), split)
    ds.meta["coop"] = key
    return ds


def _dataset_dir(root: str, folder: str, marker: str, what: str) -> str:
    """`root/folder` (CoOp's DATA root) or `root` itself if it is the dataset folder."""
    for d in (os.path.join(root, folder), root):
        if os.path.exists(os.path.join(d, marker)):
            return d
    raise SpecError(f"coop:{what}@{root}: expected {os.path.join(root, folder, marker)} "
                    f"(CoOp DATASETS.md layout); not found")


_SPLIT_JSON = {  # name: (dataset folder, image folder, split file)
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}


def _split_json_dataset(name: str, root: str, split: str) -> LabeledImages:
    folder, images, split_file = _SPLIT_JSON[name]
    d = _dataset_dir(root, folder, split_file, name)
    splits = read_split(os.path.join(d, split_file))
    return split_to_dataset(splits, split, os.path.join(d, images), f"coop:{name}/{split}",
                            meta={"split_file": os.path.join(d, split_file)})


for _name in _SPLIT_JSON:
    COOP.register(_name)(partial(_split_json_dataset, _name))


@COOP.register("fgvc_aircraft")
def fgvc_aircraft(root: str, split: str) -> LabeledImages:
    """FGVC-Aircraft as CoOp reads it: variants.txt (class order) and
    images_variant_<split>.txt lines "<image id> <variant>", images in images/<id>.jpg."""
    d = _dataset_dir(root, "fgvc_aircraft", "variants.txt", "fgvc_aircraft")
    with open(os.path.join(d, "variants.txt"), encoding="utf-8") as f:
        classnames = [ln.strip() for ln in f if ln.strip()]
    index = {c: i for i, c in enumerate(classnames)}
    listing = os.path.join(d, f"images_variant_{split}.txt")
    if not os.path.isfile(listing):
        raise SpecError(f"coop:fgvc_aircraft: {listing} not found")
    paths, labels = [], []
    with open(listing, encoding="utf-8") as f:
        for n, ln in enumerate(f, 1):
            if not ln.strip():
                continue
            img, _, variant = ln.strip().partition(" ")
            if variant not in index:
                raise SpecError(f"{listing}:{n}: variant {variant!r} not in variants.txt")
            paths.append(os.path.join(d, "images", img + ".jpg"))
            labels.append(index[variant])
    return LabeledImages(f"coop:fgvc_aircraft/{split}", paths, labels, classnames, "",
                         {"root": os.path.join(d, "images")})


def read_wnid_classnames(path: str) -> dict[str, str]:
    """CoOp's ImageNet classnames.txt: lines "<wnid> <class name>", in label order."""
    try:
        with open(path, "rb") as f:
            text = _decode(f.read(), path)
    except FileNotFoundError:
        raise SpecError(f"{path} not found: copy CoOp's ImageNet classnames.txt there "
                        f"(see CoOp DATASETS.md)") from None
    out: dict[str, str] = {}
    for n, ln in enumerate(text.splitlines(), 1):
        if ln.strip():
            wnid, _, name = ln.strip().partition(" ")
            if not name:
                raise SpecError(f"{path}:{n}: expected '<wnid> <class name>'")
            out[wnid] = name.strip()
    return out


def _wnid_folders(image_dir: str, names: dict[str, str], split_name: str,
                  wnids: list[str] | None = None) -> tuple[list[str], list[int]]:
    """Files under image_dir/<wnid>/ labelled by the position of wnid in `wnids`."""
    wnids = list(names) if wnids is None else wnids
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for w in _subdirs(image_dir):
        if w not in index:
            raise SpecError(f"{split_name}: folder {w!r} in {image_dir} is not a class of "
                            f"classnames.txt")
        files = list_files(os.path.join(image_dir, w))
        paths += files
        labels += [index[w]] * len(files)
    return paths, labels


def _only_test(name: str, split: str) -> None:
    if split != "test":
        raise SpecError(f"coop:{name} is an evaluation set: only split 'test' exists")


@COOP.register("imagenet")
def imagenet(root: str, split: str) -> LabeledImages:
    """imagenet/{classnames.txt, images/train/<wnid>/, images/val/<wnid>/}; as in CoOp the
    val images are the test set (split "val" reads them too)."""
    d = _dataset_dir(root, "imagenet", "classnames.txt", "imagenet")
    names = read_wnid_classnames(os.path.join(d, "classnames.txt"))
    sub = "train" if split == "train" else "val"
    image_dir = os.path.join(d, "images", sub)
    if not os.path.isdir(image_dir):
        raise SpecError(f"coop:imagenet: {image_dir} not found")
    paths, labels = _wnid_folders(image_dir, names, "coop:imagenet")
    return LabeledImages(f"coop:imagenet/{split}", paths, labels, list(names.values()), "",
                         {"root": image_dir, "wnids": list(names)})


def _imagenet_names_for(d: str, root: str) -> dict[str, str]:
    for p in (os.path.join(d, "classnames.txt"), os.path.join(root, "imagenet",
                                                              "classnames.txt")):
        if os.path.isfile(p):
            return read_wnid_classnames(p)
    return read_wnid_classnames(os.path.join(d, "classnames.txt"))  # raises, names it


@COOP.register("imagenetv2")
def imagenetv2(root: str, split: str) -> LabeledImages:
    """imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/ (folder = label)."""
    _only_test("imagenetv2", split)
    sub = "imagenetv2-matched-frequency-format-val"
    d = _dataset_dir(root, "imagenetv2", sub, "imagenetv2")
    names = _imagenet_names_for(d, root)
    image_dir = os.path.join(d, sub)
    paths, labels = [], []
    for f in _subdirs(image_dir):
        if not f.isdigit() or int(f) >= len(names):
            raise SpecError(f"coop:imagenetv2: unexpected folder {f!r} in {image_dir}")
        files = list_files(os.path.join(image_dir, f))
        paths += files
        labels += [int(f)] * len(files)
    return LabeledImages("coop:imagenetv2/test", paths, labels, list(names.values()), "",
                         {"root": image_dir, "wnids": list(names)})


@COOP.register("imagenet_sketch")
def imagenet_sketch(root: str, split: str) -> LabeledImages:
    """imagenet-sketch/images/<wnid>/ with ImageNet's 1000 classes."""
    _only_test("imagenet_sketch", split)
    d = _dataset_dir(root, "imagenet-sketch", "images", "imagenet_sketch")
    names = _imagenet_names_for(d, root)
    image_dir = os.path.join(d, "images")
    paths, labels = _wnid_folders(image_dir, names, "coop:imagenet_sketch")
    return LabeledImages("coop:imagenet_sketch/test", paths, labels, list(names.values()),
                         "sketch", {"root": image_dir, "wnids": list(names)})


def _imagenet_200(key: str, folder: str, images: str, root: str, split: str
                  ) -> LabeledImages:
    """ImageNet-A / -R: 200-class subsets. The 200 WordNet ids are taken from the wnid
    folders present on disk (sorted), as CoOp does, rather than from a list shipped here:
    labels are the positions in that sorted list; meta["imagenet_indices"] maps them to
    the 1000 ImageNet classes (for 1000-way heads)."""
    _only_test(key, split)
    d = _dataset_dir(root, folder, images, key)
    names = _imagenet_names_for(d, root)
    image_dir = os.path.join(d, images)
    wnids = _subdirs(image_dir)
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise SpecError(f"coop:{key}: folder {unknown[0]!r} in {image_dir} is not an ImageNet "
                        f"class of classnames.txt")
    if len(wnids) != 200:
        warnings.warn(f"coop:{key}: found {len(wnids)} class folders in {image_dir}, "
                      f"expected 200 (incomplete download?)", stacklevel=3)
    paths, labels = _wnid_folders(image_dir, names, f"coop:{key}", wnids)
    all_wnids = list(names)
    return LabeledImages(f"coop:{key}/test", paths, labels, [names[w] for w in wnids], "",
                         {"root": image_dir, "wnids": wnids,
                          "imagenet_indices": [all_wnids.index(w) for w in wnids]})


COOP.register("imagenet_a")(partial(_imagenet_200, "imagenet_a", "imagenet-adversarial",
                                    "imagenet-a"))
COOP.register("imagenet_r")(partial(_imagenet_200, "imagenet_r", "imagenet-rendition",
                                    "imagenet-r"))

__all__ = ["SOURCES", "COOP", "load_dataset", "list_files", "read_wnid_classnames",
           "classnames_of"]
