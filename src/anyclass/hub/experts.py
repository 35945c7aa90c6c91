"""Expert image classifiers — the "small models" of Model Label Learning (METHODS.md §5).

An expert is a closed-set classifier: images in, one logit per head out. Each head carries a
readable name and, when the model knows it, a WordNet noun synset ("golden_retriever.n.01"),
which the hub's semantic graph keys its nodes by. ImageNet heads get their synsets from the
ImageNet WordNet ids (n########) bundled with timm, so no name matching is needed for them.

Specs (one decorated builder per scheme in `EXPERTS`):

* ``timm:NAME[@/path/ckpt|@random]`` — ``timm.create_model(NAME, pretrained=False)``; a local
  checkpoint is read with :mod:`.weights` (safetensors or weights-only torch.load).
* ``torchvision:NAME[@/path/ckpt|@random]`` — ``torchvision.models.get_model(NAME, weights=None)``.
* ``hf-image:/local/dir`` — a Hugging Face image-classification folder (config.json,
  model.safetensors, preprocessor_config.json); id2label gives the head names.
* ``world-expert:NAME`` — an expert of the offline world's hub (``anyclass.world.experts``).

No network, ever: a pretrained tag (``timm:resnet50@imagenet``) is refused with a message
saying to download the file elsewhere and pass its path. A checkpoint whose classifier has
other than the architecture's default number of outputs builds the model with that many; its
head names come from a sidecar ``<ckpt>.labels.json`` ({"names": [...], "synsets": [...]},
synsets as names or wnids, null where unknown), else ``class_i`` with a warning.

`expert_logits` runs an expert over a dataset with the feature extractor (DataLoader workers,
on-disk cache, resume, bad images skipped) with normalisation switched off.
"""
from __future__ import annotations

import difflib
import functools
import json
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import AnyclassError, SpecError
from ..registry import Registry
from ..backbones.weights import (SAFETENSORS_EXT, TORCH_EXT, file_sha256, load_state_dict,
                      state_dict_hash, state_dict_mismatch)

RANDOM_SEED = 0
_WNID = re.compile(r"^n\d{8}$")
_SYNSET = re.compile(r"^.+\.n\.\d{2}$")


@runtime_checkable
class ExpertModel(Protocol):
    """What the hub needs from an expert classifier."""
    #: stable id from the spec (part of every cache key)
    identity: str
    #: sha256 (hex) of the weights actually loaded
    weights_hash: str
    #: one readable name per output
    head_names: list[str]
    #: WordNet noun synset name per output where the model knows it, else None
    head_synsets: list[str | None]
    num_params: int
    device: torch.device

    def preprocess(self, img: Image.Image) -> torch.Tensor: ...
    def preprocess_id(self) -> str: ...
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch [B,3,H,W] -> logits [B, len(head_names)], no grad."""


EXPERTS: Registry["ClassifierExpert"] = Registry("expert scheme")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def create_expert(spec: str, device: str | torch.device | None = None) -> "ClassifierExpert":
    """`timm:NAME[@/path|@random]`, `torchvision:NAME[@/path|@random]`, `hf-image:/dir`,
    `world-expert:NAME`."""
    spec = spec.strip()
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in EXPERTS:
        raise SpecError(f"unknown expert spec {spec!r}: expected timm:NAME[@PATH|@random], "
                        f"torchvision:NAME[@PATH|@random], hf-image:/local/dir or world-expert:NAME")
    expert = EXPERTS.get(scheme)(rest.strip(), torch.device(device) if device else default_device())
    expert.spec = spec
    return expert


# ------------------------------------------------------------------------------ the expert

@dataclass
class ClassifierExpert:
    """The ExpertModel protocol over any torch classifier `model(x) -> logits`."""
    model: nn.Module
    identity: str
    weights_hash: str
    head_names: list[str]
    head_synsets: list[str | None]
    preprocess: Callable[[Image.Image], torch.Tensor]
    preprocess_desc: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None  # custom call
    meta: dict = field(default_factory=dict)
    spec: str = ""

    def __post_init__(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if len(self.head_names) != len(self.head_synsets):
            raise ValueError("head_names and head_synsets differ in length")
        self.num_params = int(sum(p.numel() for p in self.model.parameters()))
        self.to(self.device)

    @property
    def num_heads(self) -> int:
        return len(self.head_names)

    def to(self, device: torch.device | str) -> "ClassifierExpert":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def preprocess_id(self) -> str:
        return self.preprocess_desc

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = images.to(self.device, non_blocking=True)
            out = self.forward(self.model, x) if self.forward else self.model(x)
            return out.float()

    def __repr__(self) -> str:
        return (f"ClassifierExpert({self.identity}, {self.num_heads} heads, "
                f"{self.num_params / 1e6:.2f}M params, device={self.device})")


# ------------------------------------------------------------------------------ preprocessing

class _ToRGB:
    """Alpha onto white, any mode to RGB (load_image already does this; direct callers may not)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.mode == "RGB":
            return img
        from ..data.images import to_rgb
        return to_rgb(img)


def make_preprocess(size: int, resize: int, interpolation: str, mean: Sequence[float],
                    std: Sequence[float]) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """The standard ImageNet eval transform (RGB, shorter side -> `resize`, centre crop `size`,
    ToTensor, Normalize) as a torchvision Compose (so extraction's uint8 transport applies),
    and its exact description for cache keys."""
    from torchvision import transforms as T
    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
             "nearest": T.InterpolationMode.NEAREST, "lanczos": T.InterpolationMode.LANCZOS}
    interpolation = interpolation if interpolation in modes else "bilinear"
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    tf = T.Compose([_ToRGB(), T.Resize(int(resize), interpolation=modes[interpolation], antialias=True),
                    T.CenterCrop(int(size)), T.ToTensor(), T.Normalize(mean, std)])
    desc = (f"expert-eval|rgb:alpha-over-white|resize=shortest:{int(resize)}:{interpolation}:antialias"
            f"|crop=center:{int(size)}|to_tensor|mean={tuple(mean)}|std={tuple(std)}")
    return tf, desc


# ------------------------------------------------------------------------------ ImageNet labels

@lru_cache(maxsize=4)
def imagenet_labels(subset: str = "imagenet-1k") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, readable names) of an ImageNet label set bundled with timm, in index order."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo(subset)
    wnids = tuple(info.label_names())
    names = tuple(info.index_to_description(i).split(",")[0].strip() for i in range(len(wnids)))
    return wnids, names


def wnids_to_synsets(wnids: Sequence[str | None]) -> list[str | None]:
    """ImageNet WordNet ids ("n02099601") -> nltk synset names ("golden_retriever.n.01");
    None where an id is not a WordNet 3.0 noun."""
    from ..world.wordnet import get_wordnet
    wn = get_wordnet()
    out: list[str | None] = []
    for w in wnids:
        try:
            out.append(wn.synset_from_pos_and_offset("n", int(w[1:])).name() if w else None)
        except Exception:  # noqa: BLE001 - unknown offset: no synset
            out.append(None)
    return out


def _normalise_synsets(values: Sequence[Any], source: str) -> list[str | None]:
    """Sidecar/label synsets: synset names, wnids or null; anything unknown becomes None
    with one warning naming the entries."""
    from ..world.wordnet import get_wordnet
    wn = get_wordnet()
    out: list[str | None] = []
    bad: list[str] = []
    for v in values:
        if v is None or v == "":
            out.append(None)
            continue
        v = str(v).strip()
        try:
            if _WNID.match(v):
                out.append(wn.synset_from_pos_and_offset("n", int(v[1:])).name())
            else:
                s = wn.synset(v)
                if s.pos() != "n":
                    raise ValueError("not a noun")
                out.append(s.name())
        except Exception:  # noqa: BLE001
            out.append(None)
            bad.append(v)
    if bad:
        warnings.warn(f"{source}: {len(bad)} synset(s) not in WordNet 3.0 nouns, left unmapped "
                      f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})", UserWarning, stacklevel=4)
    return out


def _imagenet_heads(n: int, subset: str | None = "imagenet-1k"
                    ) -> tuple[list[str], list[str | None]] | None:
    if not subset:
        return None
    try:
        wnids, names = imagenet_labels(subset)
    except Exception:  # noqa: BLE001 - unknown subset name
        return None
    if len(wnids) != n:
        return None
    return list(names), wnids_to_synsets(wnids)


def sidecar_path(ckpt: Path) -> Path | None:
    """`<ckpt>.labels.json` (e.g. model.safetensors.labels.json) or `<stem>.labels.json`."""
    for p in (ckpt.with_name(ckpt.name + ".labels.json"), ckpt.with_name(ckpt.stem + ".labels.json")):
        if p.is_file():
            return p
    return None


def read_sidecar(path: Path, n: int) -> tuple[list[str], list[str | None]]:
    """{"names": [...], "synsets": [...]} with exactly `n` entries each (synsets optional)."""
    try:
        d = json.loads(path.read_text())
        names = [str(x) for x in d["names"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AnyclassError(f"cannot read label file {path}: expected JSON "
                            f'{{"names": [...], "synsets": [...]}} ({type(e).__name__})') from None
    if len(names) != n:
        raise AnyclassError(f"label file {path} names {len(names)} classes but the checkpoint "
                            f"has {n} outputs")
    syn = d.get("synsets")
    if syn is None:
        return names, [None] * n
    if len(syn) != n:
        raise AnyclassError(f"label file {path} has {len(syn)} synsets for {n} names")
    return names, _normalise_synsets(syn, str(path))


def _heads(n: int, ckpt: Path | None, imagenet_subset: str | None, what: str
           ) -> tuple[list[str], list[str | None]]:
    """Head names/synsets: sidecar file, else ImageNet (when the size matches), else class_i."""
    side = sidecar_path(ckpt) if ckpt is not None else None
    if side is not None:
        return read_sidecar(side, n)
    heads = _imagenet_heads(n, imagenet_subset)
    if heads is not None:
        return heads
    warnings.warn(f"{what} has {n} outputs and no label file: heads are named class_0.."
                  f"class_{n - 1} without synsets (add {ckpt.name + '.labels.json' if ckpt else 'a label file'}"
                  f" with {{\"names\": [...], \"synsets\": [...]}})", UserWarning, stacklevel=4)
    return [f"class_{i}" for i in range(n)], [None] * n


# ------------------------------------------------------------------------------ spec parsing

def parse_weights(scheme: str, rest: str) -> tuple[str, Path | None]:
    """`NAME[@/path|@random]` -> (name, checkpoint path or None for random weights)."""
    name, _, w = rest.partition("@")
    name, w = name.strip(), w.strip()
    if not name:
        raise SpecError(f"{scheme} spec needs a model name: {scheme}:NAME[@/path/to/ckpt|@random]")
    if w in ("", "random"):
        return name, None
    looks_like_path = (any(c in w for c in "/\\") or w.startswith(("~", "."))
                       or w.lower().endswith(SAFETENSORS_EXT + TORCH_EXT) or Path(w).exists())
    if not looks_like_path:
        raise SpecError(f"{scheme}:{name}@{w}: pretrained tags are not downloaded (anyclass never uses "
                        f"the network for experts); download the weights elsewhere and give "
                        f"{scheme}:{name}@/path/to/weights.safetensors, or @random")
    p = Path(w).expanduser()
    if not p.is_file():
        raise SpecError(f"checkpoint file not found: {p} (in spec {scheme}:{rest})")
    return name, p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: Path, what: str,
                 filter_fn: Callable | None = None) -> None:
    """load_state_dict(strict) with one clear error; tries the library's own key converter
    (timm's checkpoint_filter_fn) when the plain keys don't fit."""
    attempt = functools.partial(state_dict_mismatch, model)
    err = attempt(sd)
    if err and filter_fn is not None:
        try:
            err2 = attempt(filter_fn(dict(sd), model))
        except Exception:  # noqa: BLE001 - converter does not apply
            err2 = err
        err = err2 and err
    if err:
        raise AnyclassError(f"checkpoint {source} does not fit {what}: {err}")


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return None


# ------------------------------------------------------------------------------ timm

def _check_timm_name(name: str) -> None:
    import timm
    if timm.is_model(name):
        return
    models = timm.list_models()
    base = name.split(".")[0]
    close = difflib.get_close_matches(base, models, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise SpecError(f"unknown timm model {name!r}{hint} (timm.list_models() lists all {len(models)})")


def _timm_classifier_outputs(model: nn.Module, sd: dict[str, torch.Tensor]) -> int | None:
    """Outputs of the checkpoint's classifier (the model's pretrained_cfg names its module)."""
    clf = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    names = clf if isinstance(clf, (list, tuple)) else [clf] if clf else []
    for c in names:
        w = sd.get(f"{c}.weight")
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    return None


@EXPERTS.register("timm")
def build_timm(rest: str, device: torch.device) -> ClassifierExpert:
    import sys

    import timm
    from timm.data import infer_imagenet_subset, resolve_data_config
    name, ckpt = parse_weights("timm", rest)
    _check_timm_name(name)

    def create(**kw) -> nn.Module:
        try:
            return _seeded(lambda: timm.create_model(name, pretrained=False, **kw))
        except Exception as e:  # noqa: BLE001
            raise AnyclassError(f"cannot build timm model {name!r}: {type(e).__name__}: {_one_line(e)}") from None

    if ckpt is None:
        model = create()
        warnings.warn(f"timm:{name} has random weights (seed {RANDOM_SEED}); its predictions are "
                      f"meaningless — give @/path/to/checkpoint for trained weights", UserWarning, stacklevel=3)
        weights_hash, identity = state_dict_hash(model.state_dict()), f"timm:{name}@random"
    else:
        sd = load_state_dict(ckpt)  # refuses pickles and corrupt files before anything is built
        model = create()
        n = _timm_classifier_outputs(model, sd)
        if n is not None and n != model.num_classes:
            model = create(num_classes=n)
        filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        _load_strict(model, sd, ckpt, f"timm model {name!r}", filt)
        weights_hash, identity = file_sha256(ckpt), f"timm:{name}@file"
    subset = None
    try:
        subset = infer_imagenet_subset(model)
    except Exception:  # noqa: BLE001
        pass
    names, synsets = _heads(int(model.num_classes), ckpt, subset or "imagenet-1k", f"timm:{name}")
    cfg = resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    resize = int(np.floor(size / float(cfg.get("crop_pct") or 1.0)))
    tf, desc = make_preprocess(size, resize, str(cfg.get("interpolation", "bicubic")), cfg["mean"], cfg["std"])
    return ClassifierExpert(model, identity, weights_hash, names, synsets, tf, desc, device,
                            meta={"library": "timm", "model": name,
                                  "checkpoint": str(ckpt) if ckpt else None})


# ------------------------------------------------------------------------------ torchvision

@EXPERTS.register("torchvision")
def build_torchvision(rest: str, device: torch.device) -> ClassifierExpert:
    import torchvision
    name, ckpt = parse_weights("torchvision", rest)
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SpecError(f"unknown torchvision classification model {name!r}{hint} "
                        f"(torchvision.models.list_models(module=torchvision.models) lists all {len(known)})")

    def create(**kw) -> nn.Module:
        try:
            return _seeded(lambda: torchvision.models.get_model(name, weights=None, **kw))
        except Exception as e:  # noqa: BLE001
            raise AnyclassError(f"cannot build torchvision model {name!r}: {type(e).__name__}: "
                                f"{_one_line(e)}") from None

    weights_enum = torchvision.models.get_model_weights(name).DEFAULT
    if ckpt is None:
        model = create()
        warnings.warn(f"torchvision:{name} has random weights (seed {RANDOM_SEED}); its predictions "
                      f"are meaningless — give @/path/to/checkpoint for trained weights",
                      UserWarning, stacklevel=3)
        weights_hash, identity = state_dict_hash(model.state_dict()), f"torchvision:{name}@random"
    else:
        sd = load_state_dict(ckpt)
        model = create()
        # the last Linear/Conv producing the default class count is the classifier
        last = [(k, m) for k, m in model.named_modules() if _out_features(m) == len(weights_enum.meta["categories"])]
        if last and f"{last[-1][0]}.weight" in sd:
            n = int(sd[f"{last[-1][0]}.weight"].shape[0])
            if n != _out_features(last[-1][1]):
                model = create(num_classes=n)
        _load_strict(model, sd, ckpt, f"torchvision model {name!r}")
        weights_hash, identity = file_sha256(ckpt), f"torchvision:{name}@file"
    n_out = _n_outputs(model, weights_enum)
    cats = list(weights_enum.meta.get("categories") or [])
    side = sidecar_path(ckpt) if ckpt is not None else None
    if side is None and n_out == len(cats) == 1000:
        wnids, _ = imagenet_labels("imagenet-1k")
        names, synsets = cats, wnids_to_synsets(wnids)   # same index order as timm's list
    else:
        names, synsets = _heads(n_out, ckpt, "imagenet-1k", f"torchvision:{name}")
    t = weights_enum.transforms()
    interp = getattr(t.interpolation, "value", str(t.interpolation))
    tf, desc = make_preprocess(int(t.crop_size[0]), int(t.resize_size[0]), str(interp), t.mean, t.std)
    return ClassifierExpert(model, identity, weights_hash, names, synsets, tf, desc, device,
                            meta={"library": "torchvision", "model": name,
                                  "checkpoint": str(ckpt) if ckpt else None})


def _n_outputs(model: nn.Module, weights_enum) -> int:
    """Number of logits, from a 1-image dry run at the weights' crop size (robust for every
    torchvision family: fc, classifier.N, heads.head, squeezenet's conv)."""
    size = int(weights_enum.transforms().crop_size[0])
    with torch.inference_mode():
        model.eval()
        out = model(torch.zeros(1, 3, size, size))
    return int(out.shape[-1])


# ------------------------------------------------------------------------------ Hugging Face

def _hf_preprocess(d: Path) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    p = d / "preprocessor_config.json"
    cfg = json.loads(p.read_text()) if p.is_file() else {}
    size = cfg.get("size", 224)
    crop = cfg.get("crop_size")
    if isinstance(size, dict):
        short = size.get("shortest_edge") or size.get("height") or 224
    else:
        short = int(size)
    if cfg.get("do_center_crop", crop is not None) and crop is not None:
        crop = crop.get("height", short) if isinstance(crop, dict) else int(crop)
    else:
        crop = short
    mean = cfg.get("image_mean", [0.5, 0.5, 0.5]) if cfg.get("do_normalize", True) else [0, 0, 0]
    std = cfg.get("image_std", [0.5, 0.5, 0.5]) if cfg.get("do_normalize", True) else [1, 1, 1]
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(int(cfg.get("resample", 2)), "bilinear")
    return make_preprocess(int(crop), int(short), resample, mean, std)


def _hf_labels(labels: list[str], n: int) -> list[str | None]:
    """ImageNet-1k label lists (HF ports keep timm's "tench, Tinca tinca" order) map by index;
    otherwise labels that are wnids or synset names map one by one; the rest stay None."""
    if n == 1000:
        _, names = imagenet_labels("imagenet-1k")
        same = sum(a.split(",")[0].strip().lower() == b.lower() for a, b in zip(labels, names))
        if same >= 900:
            return wnids_to_synsets(imagenet_labels("imagenet-1k")[0])
    direct = [lab if (_WNID.match(lab) or _SYNSET.match(lab)) else None for lab in labels]
    if any(direct):
        return _normalise_synsets(direct, "hf-image labels")
    return [None] * n


@EXPERTS.register("hf-image")
def build_hf_image(rest: str, device: torch.device) -> ClassifierExpert:
    d = Path(rest).expanduser()
    if not rest or not d.is_dir():
        raise SpecError(f"hf-image:{rest}: expected a local Hugging Face model folder (config.json + "
                        f"model.safetensors); anyclass never downloads expert models")
    weights = next((d / f for f in ("model.safetensors", "pytorch_model.bin") if (d / f).is_file()), None)
    if weights is None or not (d / "config.json").is_file():
        raise SpecError(f"{d} is not a Hugging Face model folder (needs config.json and model.safetensors)")
    load_state_dict(weights)  # refuse pickled objects / corrupt files before transformers sees them
    from transformers import AutoModelForImageClassification
    try:
        model = AutoModelForImageClassification.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise AnyclassError(f"cannot load Hugging Face image classifier from {d}: "
                            f"{type(e).__name__}: {_one_line(e)}") from None
    n = int(model.config.num_labels)
    id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
    names = [id2label.get(i, f"class_{i}") for i in range(n)]
    side = sidecar_path(weights)
    synsets = read_sidecar(side, n)[1] if side else _hf_labels(names, n)
    tf, desc = _hf_preprocess(d)
    return ClassifierExpert(model, f"hf-image:{d.resolve()}", file_sha256(weights), names, synsets, tf,
                            desc, device, forward=lambda m, x: m(pixel_values=x).logits,
                            meta={"library": "transformers", "dir": str(d.resolve())})


# ------------------------------------------------------------------------------ offline world

@EXPERTS.register("world-expert")
def build_world_expert(rest: str, device: torch.device) -> ClassifierExpert:
    from ..world.experts import load_world_expert_net
    from ..world.model import IMAGE_MEAN, IMAGE_STD
    from ..backbones.builtin import BuiltinPreprocess
    if not rest:
        raise SpecError("world-expert spec needs a name: world-expert:NAME "
                        "(`anyclass hub list` or anyclass.world.experts.ensure_world_experts(world))")
    from ..world.build import ensure_world
    model, meta, weights = load_world_expert_net(rest, ensure_world())
    pp = BuiltinPreprocess(meta["world_image_size"], IMAGE_MEAN, IMAGE_STD)
    return ClassifierExpert(model, f"world-expert:{rest}", file_sha256(weights),
                            list(meta["head_names"]), list(meta["head_synsets"]), pp, pp.describe(),
                            torch.device(device), meta=meta)



# ------------------------------------------------------------------------------ dataset logits

class _LogitEncoder:
    """An expert seen through extract_features' ImageEncoder interface: embed_dim = number of
    heads, encode_images = logits (extracted with normalize=False)."""

    def __init__(self, expert: ExpertModel) -> None:
        self.expert = expert
        self.identity = f"logits:{expert.identity}"
        self.weights_hash = expert.weights_hash
        self.embed_dim = len(expert.head_names)
        self.preprocess = expert.preprocess
        self.device = expert.device

    def preprocess_id(self) -> str:
        return self.expert.preprocess_id()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.expert.predict_logits(images)


def expert_logits(expert: ExpertModel, dataset, batch_size: int = 256, progress: bool = True,
                  cache: bool = True, num_workers: int | None = None, amp: bool | None = False,
                  with_valid: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Logits [N, H] (float32) of `expert` on every image of `dataset` (a LabeledImages).

    Cached on disk like features (key: expert identity + weights hash + preprocessing + the
    file list), resumable, bad images warned and skipped: their rows are zero (`with_valid`
    also returns the bool mask of rows that were read). amp=False by default: logits are
    compared across models after calibration, so they are computed in fp32.
    """
    from ..features.extract import extract_features
    f = extract_features(_LogitEncoder(expert), dataset, batch_size=batch_size, num_workers=num_workers,
                         cache=cache, progress=progress, amp=amp, normalize=False)
    logits = np.array(f.features, dtype=np.float32)
    return (logits, np.asarray(f.valid)) if with_valid else logits
