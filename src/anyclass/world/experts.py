"""The offline world's expert hub: small image classifiers for MLL to label, select and reuse.

Each expert is trained from scratch on its own concept subset (a WordNet branch, a task group
or a code-point range of the emoji table; some broad, some narrow, overlapping) in its own
domain (colour, sketch or both), with its own architecture (CNNs of several widths/depths, a
tiny ViT, an MLP on downsampled pixels, timm's mobilenetv3 / resnet10t) and its own data size
and epochs — so quality is mixed on purpose, as in a real model hub. Heads are the concepts'
names; head synsets are the concepts' WordNet synsets (None where a concept has none).

Training images are rendered with seeds of their own (`EXPERT_SEED_BASE` + k·2²¹ + code point,
≥ 2⁶¹): disjoint from the built-in model's pretraining renders (< 2³²) and from every task
split (2³² + a 56-bit hash < 2⁵⁷). Held-out images (k ≥ HELDOUT_K0) measure each expert in
both domains.

Layout: `<world root>/experts/<hub key>/<name>/{model.safetensors, expert.json}` and
`<hub key>/hub.json` once all are built. The hub key hashes EXPERTS_VERSION and the world's
recipes, not the world key, so experts are built lazily (`ensure_world_experts`) without
touching the world itself. Builds are lock-protected (flock) and resumable per expert (an
expert directory appears atomically when its training is done).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..locks import build_lock

#: bump when anything that changes what an expert learns changes (data, training, archs)
EXPERTS_VERSION = "2"
EXPERT_SEED_BASE = 2 ** 61
_K_STRIDE = 2 ** 21            # > max Unicode code point
HELDOUT_K0 = 1 << 16           # held-out renders use k >= this
HELDOUT_PER_CONCEPT = 4        # per concept and domain
WEIGHTS_FILE = "model.safetensors"
META_FILE = "expert.json"
DOMAINS = ("colour", "sketch")


# ------------------------------------------------------------------------------ recipes

@dataclass(frozen=True)
class Subset:
    """A concept subset: the union of WordNet lexicographer files, WordNet ancestors (any
    hypernym path), world tasks and code-point ranges, optionally thinned evenly to
    `max_concepts`."""
    name: str
    lexnames: tuple[str, ...] = ()
    ancestors: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()
    max_concepts: int | None = None
    everything: bool = False
    all_tasks: bool = False        # every concept any task uses (never thinned, mini included)


@dataclass(frozen=True)
class Arch:
    """kind: cnn (widths per stage, `depth` convs per stage), vit (world.model.VisionTower),
    mlp (pixels at input_size px, hidden widths), timm (timm model `timm_name`). Images come
    in at the world's size (64 px) and are resized to `input_size` inside the model."""
    kind: str
    input_size: int = 64
    widths: tuple[int, ...] = ()
    depth: int = 1
    heads: int = 2
    patch: int = 8
    timm_name: str = ""


@dataclass(frozen=True)
class ExpertRecipe:
    name: str
    arch: Arch
    subset: Subset
    domain: str                    # colour | sketch | both
    per_concept: int               # training renders per concept (both: split across domains)
    epochs: int
    lr: float = 2e-3
    batch_size: int = 32          # small batches: many steps on small data (CPU-cheap at 32 px)
    seed: int = 0


# subsets of the full world
ANIMALS = Subset("animals", lexnames=("noun.animal",), tasks=("animals", "animal_faces"))
MAMMALS = Subset("mammals", ancestors=("mammal.n.01",))
FOOD = Subset("food", lexnames=("noun.food", "noun.plant"), tasks=("fruit_veg", "meals"))
FRUIT_VEG = Subset("fruit_veg", ancestors=("edible_fruit.n.01", "vegetable.n.01"), tasks=("fruit_veg",))
VEHICLES = Subset("vehicles", ancestors=("vehicle.n.01", "craft.n.02"), tasks=("vehicles",))
OBJECTS = Subset("objects", tasks=("objects", "tools", "devices"))
ARTIFACTS = Subset("artifacts", lexnames=("noun.artifact",))
CLOTHING = Subset("clothing", ancestors=("clothing.n.01", "headdress.n.01", "footwear.n.02"),
                  tasks=("clothing",))
PLACES = Subset("places", ancestors=("structure.n.01", "geological_formation.n.01"),
                tasks=("buildings", "plants"))
SPORTS = Subset("sports", ancestors=("sports_equipment.n.01", "ball.n.01"), tasks=("sports", "activities"))
PEOPLE = Subset("people", lexnames=("noun.person",), tasks=("activities",))
FACES = Subset("faces", tasks=("faces",), ranges=((0x1F600, 0x1F637), (0x1F641, 0x1F644),
                                                 (0x1F910, 0x1F917), (0x1F920, 0x1F92F),
                                                 (0x1F970, 0x1F97A)))
HANDS = Subset("hands", tasks=("hand_gestures",), ranges=((0x1F446, 0x1F450), (0x1F918, 0x1F91F)))
CLOCKS = Subset("clocks", tasks=("clocks",), ranges=((0x1F550, 0x1F567), (0x23F0, 0x23F3), (0x231A, 0x231B)))
SKY = Subset("sky", tasks=("weather", "moon_phases"), ranges=((0x1F311, 0x1F31E),))
SYMBOLS = Subset("symbols", tasks=("zodiac", "hearts", "arrows"), ranges=((0x2190, 0x21FF), (0x2648, 0x2653)))
BODY = Subset("body", lexnames=("noun.body",))
EVERYTHING = Subset("everything", everything=True)
TASK_CONCEPTS = Subset("tasks", all_tasks=True)

#: the expert that filters the adversarial domain (ImageNet-A's ResNet-50): every task
#: concept, colour only; never the built-in model
ADVERSARIAL_FILTER = "tasks-cnn-colour"

_CNN_S = Arch("cnn", 32, widths=(16, 32, 64))
_CNN_M = Arch("cnn", 32, widths=(32, 64, 128))
_CNN_W = Arch("cnn", 32, widths=(48, 96, 192))
_CNN_M48 = Arch("cnn", 48, widths=(32, 64, 128))
_CNN_DEEP = Arch("cnn", 32, widths=(24, 48, 96), depth=2)
_VIT_S = Arch("vit", 32, widths=(64,), depth=3, heads=2, patch=4)
_MLP = Arch("mlp", 16, widths=(512,))
_MLP_W = Arch("mlp", 24, widths=(768, 384))
_RESNET10 = Arch("timm", 32, timm_name="resnet10t")

HUBS: dict[str, tuple[ExpertRecipe, ...]] = {
    "full": (
        ExpertRecipe("animals-cnn-colour", _CNN_W, ANIMALS, "colour", 24, 10),
        ExpertRecipe("animals-vit-sketch", _VIT_S, ANIMALS, "sketch", 12, 8),
        ExpertRecipe("mammals-resnet10t-both", _RESNET10, MAMMALS, "both", 16, 8),
        ExpertRecipe("food-cnn-colour", _CNN_M, FOOD, "colour", 16, 10),
        ExpertRecipe("fruitveg-mlp-colour", _MLP, FRUIT_VEG, "colour", 24, 20, batch_size=128),
        ExpertRecipe("food-cnn-sketch", _CNN_S, FOOD, "sketch", 12, 8),
        ExpertRecipe("vehicles-deepcnn-both", _CNN_DEEP, VEHICLES, "both", 24, 10),
        ExpertRecipe("objects-cnn-colour", _CNN_W, OBJECTS, "colour", 16, 10),
        ExpertRecipe("artifacts-cnn-colour", _CNN_M, ARTIFACTS, "colour", 8, 6),
        ExpertRecipe("clothing-vit-both", _VIT_S, CLOTHING, "both", 24, 12),
        ExpertRecipe("places-cnn-colour", _CNN_S, PLACES, "colour", 12, 8),
        ExpertRecipe("sports-cnn-colour", _CNN_M, SPORTS, "colour", 16, 10),
        ExpertRecipe("people-cnn-sketch", _CNN_S, PEOPLE, "sketch", 8, 6),
        ExpertRecipe("faces-cnn48-both", _CNN_M48, FACES, "both", 16, 10),
        ExpertRecipe("hands-cnn48-colour", _CNN_M48, HANDS, "colour", 24, 12),
        ExpertRecipe("clocks-cnn48-both", _CNN_M48, CLOCKS, "both", 24, 14),
        ExpertRecipe("sky-mlp-both", _MLP_W, SKY, "both", 24, 15, batch_size=128),
        ExpertRecipe("symbols-cnn-colour", _CNN_W, SYMBOLS, "colour", 20, 10),
        ExpertRecipe("body-mlp-sketch", _MLP, BODY, "sketch", 8, 10, batch_size=128),
        ExpertRecipe("everything-mlp-colour", _MLP_W, EVERYTHING, "colour", 6, 12, batch_size=128),
        ExpertRecipe(ADVERSARIAL_FILTER, _CNN_W, TASK_CONCEPTS, "colour", 16, 10, batch_size=64),
    ),
    "mini": (
        ExpertRecipe("animals-cnn-colour", Arch("cnn", 32, widths=(16, 32, 48)), ANIMALS, "colour", 10, 10),
        ExpertRecipe("food-mlp-colour", Arch("mlp", 16, widths=(256,)), FOOD, "colour", 10, 15, batch_size=128),
        ExpertRecipe("clocks-cnn-both", Arch("cnn", 48, widths=(16, 32, 64)), CLOCKS, "both", 24, 16),
        ExpertRecipe("faces-vit-sketch", Arch("vit", 32, widths=(48,), depth=2, heads=2, patch=4),
                     FACES, "sketch", 16, 16),
        ExpertRecipe("symbols-cnn-colour", Arch("cnn", 32, widths=(16, 32, 48)), SYMBOLS, "colour", 10, 10),
        ExpertRecipe("objects-mnv3-colour", Arch("timm", 32, timm_name="mobilenetv3_small_050"),
                     Subset("objects", tasks=("objects", "tools"), max_concepts=16), "colour", 12, 10),
        ExpertRecipe(ADVERSARIAL_FILTER, Arch("cnn", 32, widths=(16, 32, 64)), TASK_CONCEPTS,
                     "colour", 8, 10),
    ),
}
#: the mini world's concepts are a subset: cap every mini subset (tests stay fast)
_MINI_MAX_CONCEPTS = 32


def recipes_for(world) -> tuple[ExpertRecipe, ...]:
    return HUBS.get(world.cfg.name, HUBS["full"])


def hub_key(world) -> str:
    blob = json.dumps({"v": EXPERTS_VERSION, "world": world.cfg.name, "image_size": world.cfg.image_size,
                       "mini_cap": _MINI_MAX_CONCEPTS,
                       "recipes": [asdict(r) for r in recipes_for(world)]}, sort_keys=True)
    return f"{world.cfg.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def hub_dir(world) -> Path:
    return world.root / "experts" / hub_key(world)


# ------------------------------------------------------------------------------ subsets

def select_concepts(world, subset: Subset) -> list:
    """The world's concepts in `subset`, in code point order."""
    from .tasks import get_tasks, task_concept_ids
    from .wordnet import get_wordnet
    concepts = list(world.concepts)
    task_ids: set[str] = set()
    if subset.everything:
        chosen = concepts
    elif subset.all_tasks:
        ids = set(task_concept_ids(world.cfg))
        return [c for c in concepts if c.id in ids]
    else:
        tasks = get_tasks(world.cfg)
        for t in subset.tasks:
            task_ids.update(tasks[t].concept_ids)
        wn = get_wordnet() if (subset.lexnames or subset.ancestors) else None
        anc = set(subset.ancestors)
        chosen = []
        for c in concepts:
            hit = c.id in task_ids or any(a <= c.codepoint <= b for a, b in subset.ranges)
            if not hit and wn is not None and c.synset:
                s = wn.synset(c.synset)
                hit = s.lexname() in subset.lexnames or bool(
                    anc and anc & {h.name() for path in s.hypernym_paths() for h in path})
            if hit:
                chosen.append(c)
    cap = subset.max_concepts
    if world.cfg.name == "mini":
        cap = min(cap or _MINI_MAX_CONCEPTS, _MINI_MAX_CONCEPTS)
    if cap is None or len(chosen) <= cap:
        return chosen
    # thin evenly, keeping the subset's task concepts first (they are what tasks ask for)
    first = [c for c in chosen if c.id in task_ids] if not subset.everything else []
    rest = [c for c in chosen if c.id not in task_ids] if first else chosen
    keep = {c.id for c in _evenly(first, cap)}
    keep |= {c.id for c in _evenly(rest, cap - len(keep))}
    return [c for c in chosen if c.id in keep]


def _evenly(items: list, k: int) -> list:
    if k <= 0:
        return []
    if len(items) <= k:
        return list(items)
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def head_names(concepts: Sequence) -> list[str]:
    """Concept labels; a label shared by two concepts falls back to the Unicode name."""
    from collections import Counter
    counts = Counter(c.label for c in concepts)
    names = [c.label if counts[c.label] == 1 else c.name for c in concepts]
    seen: Counter = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


# ------------------------------------------------------------------------------ architectures

class WorldExpertNet(nn.Module):
    """Resize to the architecture's input size, then the body; logits out."""

    def __init__(self, arch: dict, num_classes: int) -> None:
        super().__init__()
        self.input_size = int(arch["input_size"])
        self.body = _body(arch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.body(x)


def _body(arch: dict, n: int) -> nn.Module:
    kind, size = arch["kind"], int(arch["input_size"])
    widths = [int(w) for w in arch.get("widths") or ()]
    if kind == "cnn":
        layers: list[nn.Module] = []
        c = 3
        for i, w in enumerate(widths):
            for _ in range(int(arch.get("depth", 1))):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n))
    if kind == "mlp":
        layers, d = [nn.Flatten()], 3 * size * size
        for w in widths:
            layers += [nn.Linear(d, w), nn.GELU()]
            d = w
        return nn.Sequential(*layers, nn.Linear(d, n))
    if kind == "vit":
        from .model import VisionConfig, VisionTower
        width, patch = widths[0], int(arch["patch"])
        stem = tuple(min(width, 16 * 2 ** i) for i in range(int(math.log2(patch))))
        cfg = VisionConfig(image_size=size, patch=patch, width=width, depth=int(arch["depth"]),
                           heads=int(arch["heads"]), stem_channels=stem, stem_norm=True, embed_dim=width)
        return nn.Sequential(VisionTower(cfg), nn.LayerNorm(width), nn.Linear(width, n))
    if kind == "timm":
        import timm
        return timm.create_model(arch["timm_name"], pretrained=False, num_classes=n)
    raise ValueError(f"unknown expert architecture kind {kind!r}")


# ------------------------------------------------------------------------------ data

def render_seed(k: int, codepoint: int) -> int:
    return EXPERT_SEED_BASE + k * _K_STRIDE + codepoint


def _items(concepts: Sequence, ks: Sequence[int], domain: str) -> dict[str, list[tuple]]:
    """domain -> [(concept, seed, label)] for draw indices ks (both: even k colour, odd sketch)."""
    out: dict[str, list[tuple]] = {d: [] for d in DOMAINS}
    for label, c in enumerate(concepts):
        for k in ks:
            d = domain if domain != "both" else DOMAINS[k % 2]
            out[d].append((c, render_seed(k, c.codepoint), label))
    return out


def _render(items: dict[str, list[tuple]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N,3,S,S] and labels [N] (domains concatenated in DOMAINS order)."""
    from .render import render_batch
    xs, ys = [], []
    for d in DOMAINS:
        if items[d]:
            arr = render_batch([(c, s) for c, s, _ in items[d]], d, size)
            xs.append(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous())
            ys.append(torch.tensor([lab for _, _, lab in items[d]]))
    return torch.cat(xs), torch.cat(ys)


def _normalise(x_u8: torch.Tensor) -> torch.Tensor:
    from .model import IMAGE_MEAN, IMAGE_STD
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x_u8.float().div_(255) - mean) / std


def _resized(x_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N,3,S,S] -> float [0,1] at size×size with the model's own resize."""
    x = x_u8.float().div_(255)
    if x.shape[-1] == size:
        return x
    return torch.cat([F.interpolate(x[s:s + 1024], size=(size, size), mode="bilinear", align_corners=False,
                                    antialias=True) for s in range(0, len(x), 1024)])


@torch.inference_mode()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 512) -> float:
    model.eval()
    pred = torch.cat([model(_normalise(x[s:s + bs])).argmax(1) for s in range(0, len(x), bs)])
    return float((pred == y).float().mean())


@torch.enable_grad()   # callers may be under no_grad: the adversarial filter trains its expert on first use
def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, r: ExpertRecipe, gen: torch.Generator,
         progress: bool) -> list[float]:
    """AdamW, linear warm-up then cosine, label smoothing 0.1, random scale/shift (no flips:
    they change meaning for arrows and hands). x: float [0,1] images already at the model's
    input size (resizing is linear, so resize-then-normalise equals the eval path's
    normalise-then-resize; augmenting at 32 px costs a quarter of 64 px). Returns the mean
    loss per epoch."""
    from tqdm.auto import tqdm

    from .model import IMAGE_MEAN, IMAGE_STD
    from .train import augment
    n = len(x)
    bs = min(r.batch_size, max(16, n // 16))   # small sets: smaller batches, enough steps
    steps = max(1, n // bs)
    total, warm = steps * r.epochs, max(1, steps * r.epochs // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    losses = []
    bar = tqdm(total=total, desc=f"expert {r.name}", unit="step", disable=not progress, leave=False)
    model.train()
    for _ in range(r.epochs):
        perm = torch.randperm(n, generator=gen)
        run = 0.0
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            xb = (augment(x[idx], gen, 0.0) - mean) / std
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach())
            bar.update(1)
        losses.append(round(run / steps, 4))
    bar.close()
    model.eval()
    return losses


# ------------------------------------------------------------------------------ training

def train_expert(world, recipe: ExpertRecipe, out_dir: Path | None = None, progress: bool = True,
                 threads: int = 2) -> dict:
    """Train one expert; write `out_dir` (model.safetensors + expert.json) atomically when
    given. Returns the metadata (what expert.json holds)."""
    from safetensors.torch import save_file

    from ..hashing import state_dict_hash
    concepts = select_concepts(world, recipe.subset)
    if len(concepts) < 2:
        raise ValueError(f"expert {recipe.name}: subset {recipe.subset.name} has {len(concepts)} concepts")
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    try:
        t0 = time.perf_counter()
        x, y = _render(_items(concepts, range(recipe.per_concept), recipe.domain), world.cfg.image_size)
        held = {d: _render(_items(concepts, range(HELDOUT_K0, HELDOUT_K0 + HELDOUT_PER_CONCEPT), d),
                           world.cfg.image_size) for d in DOMAINS}
        t_render = time.perf_counter() - t0
        torch.manual_seed(recipe.seed)
        arch = asdict(recipe.arch)
        model = WorldExpertNet(arch, len(concepts))
        gen = torch.Generator().manual_seed(recipe.seed)
        t1 = time.perf_counter()
        losses = _fit(model, _resized(x, recipe.arch.input_size), y, recipe, gen, progress)
        t_fit = time.perf_counter() - t1
        acc = {d: round(_accuracy(model, *held[d]), 4) for d in DOMAINS}
        own = ([acc[recipe.domain]] if recipe.domain != "both" else [acc[d] for d in DOMAINS])
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        meta = {
            "format": "anyclass-world-expert/1", "name": recipe.name, "spec": f"world-expert:{recipe.name}",
            "experts_version": EXPERTS_VERSION, "world": world.cfg.key(), "hub": hub_key(world),
            "arch": arch, "subset": asdict(recipe.subset), "domain": recipe.domain,
            "per_concept": recipe.per_concept, "epochs": recipe.epochs, "lr": recipe.lr,
            "batch_size": recipe.batch_size, "seed": recipe.seed,
            "concept_ids": [c.id for c in concepts], "head_names": head_names(concepts),
            "head_synsets": [c.synset for c in concepts],
            "n_train_images": int(len(x)), "num_params": int(sum(p.numel() for p in model.parameters())),
            "train_acc": round(_accuracy(model, x, y), 4),
            "heldout_acc": acc, "heldout_acc_own": round(float(np.mean(own)), 4),
            "heldout_per_concept": HELDOUT_PER_CONCEPT, "chance": round(1 / len(concepts), 4),
            "loss": losses, "weights_sha256": state_dict_hash(sd),
            "seconds": {"render": round(t_render, 1), "train": round(t_fit, 1),
                        "total": round(time.perf_counter() - t0, 1)},
            "threads": torch.get_num_threads(),
        }
        if out_dir is not None:
            out_dir = Path(out_dir)
            tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "anyclass-world-expert"})
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        return meta
    finally:
        torch.set_num_threads(before)


def _locked(path: Path, progress: bool):
    return build_lock(path, f"expert hub {path.stem}", progress)


def _read_index(root: Path, key: str) -> dict | None:
    try:
        d = json.loads((root / "hub.json").read_text())
    except (OSError, ValueError):
        return None
    return d if d.get("hub") == key else None


def ensure_world_experts(world, progress: bool = True) -> list[str]:
    """Specs ("world-expert:NAME") of the offline hub's experts for `world`, installing or
    training whatever is missing first."""
    key, root = hub_key(world), hub_dir(world)
    recipes = recipes_for(world)
    if _read_index(root, key) is None:
        with _locked(root.parent / f"{key}.lock", progress):
            if _read_index(root, key) is None:
                _build(world, recipes, root, key, progress)
    return [f"world-expert:{r.name}" for r in recipes]


def _install_or_train(world, recipe: ExpertRecipe, out: Path, progress: bool) -> dict:
    """The shipped weights when they exist for this hub recipe and check out, else training."""
    from .artefacts import install_expert
    if install_expert(hub_key(world), recipe.name, out):
        return {**json.loads((out / META_FILE).read_text()), "shipped": True}
    return train_expert(world, recipe, out, progress=progress)


def ensure_expert(world, name: str, progress: bool = True) -> Path:
    """The directory of one expert of the world's hub, training only that one if missing."""
    recipe = {r.name: r for r in recipes_for(world)}[name]
    key, root = hub_key(world), hub_dir(world)
    out = root / name
    if not ((out / META_FILE).is_file() and (out / WEIGHTS_FILE).is_file()):
        with _locked(root.parent / f"{key}.lock", progress):
            if not ((out / META_FILE).is_file() and (out / WEIGHTS_FILE).is_file()):
                root.mkdir(parents=True, exist_ok=True)
                _install_or_train(world, recipe, out, progress)
    return out


def _build(world, recipes: Sequence[ExpertRecipe], root: Path, key: str, progress: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, r in enumerate(recipes):
        out = root / r.name
        if (out / META_FILE).is_file() and (out / WEIGHTS_FILE).is_file():
            continue
        meta = _install_or_train(world, r, out, progress)
        if progress and not meta.get("shipped"):
            print(f"expert {i + 1}/{len(recipes)} {r.name}: {len(meta['head_names'])} heads, "
                  f"held-out acc {meta['heldout_acc']} (chance {meta['chance']}), "
                  f"{meta['seconds']['total']} s", flush=True)
    index = {"hub": key, "world": world.cfg.key(), "experts_version": EXPERTS_VERSION,
             "experts": [r.name for r in recipes], "built_seconds": round(time.perf_counter() - t0, 1),
             "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = root / f".hub.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, root / "hub.json")


# ------------------------------------------------------------------------------ loading

def expert_records(world, progress: bool = True) -> list[dict]:
    """expert.json of every expert of the hub (built first if needed), in recipe order."""
    ensure_world_experts(world, progress)
    root = hub_dir(world)
    return [json.loads((root / r.name / META_FILE).read_text()) for r in recipes_for(world)]


def load_world_expert_net(name: str, world) -> tuple[nn.Module, dict, Path]:
    """(network in eval mode, expert.json, weights file) of expert `name` of the world's hub,
    built first if needed. The `world-expert:` scheme (hub/experts.py) wraps it as a
    ClassifierExpert; the world itself never imports the backbone layer."""
    from safetensors.torch import load_file
    names = [r.name for r in recipes_for(world)]
    if name not in names:
        raise SpecError(f"unknown world expert {name!r} in world {world.cfg.name!r} "
                        f"(known: {', '.join(names)})")
    d = ensure_expert(world, name)
    meta = json.loads((d / META_FILE).read_text())
    model = WorldExpertNet(meta["arch"], len(meta["head_names"]))
    model.load_state_dict(load_file(str(d / WEIGHTS_FILE)))   # fp16 shipped -> fp32 params
    return model.eval(), {**meta, "world_image_size": world.cfg.image_size}, d / WEIGHTS_FILE
