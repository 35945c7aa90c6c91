"""LiT-style training of the built-in model's image tower against the frozen MiniLM.

Data (`pretrain_plan`; the no-leak rule of docs/design.md):
- `cfg.pretrain_per_concept` colour renders of every concept (seeds from PRETRAIN_SEED_BASE,
  below the task seeds, so no task image is ever seen);
- `sketch_per_concept` Symbola (sketch) renders of the concepts that no task uses: a web
  corpus holds drawings of many things, but never a render of a task concept in any domain
  other than colour;
- style augmentations of the colour renders in the training loop (greyscale, edge line-art,
  ink silhouettes of the object's mask) — for every concept, as web photos come in every
  style.
Each image is paired with a *noisy* caption:
- clean: a template over one of the concept's names/keywords ("a photo of a dog.");
- partial: a template over a single word of the name ("a photo of a face.") — web alt-text
  is often that vague, and it is what makes look-alike classes (clock faces, smileys, hand
  gestures) hard to tell apart, as they are for real CLIP;
- wrong: a fixed fraction of images carry another concept's caption (mislabelled web data).
Captions are encoded once by the frozen text tower; the loss is the symmetric in-batch
contrastive loss with the learnt temperature, where every pair whose captions describe the
same concept counts as a positive (soft targets), so repeats of a concept in a batch are not
pushed apart. No task concept is seen as a sketch, rendition, v2 or adversarial render, so
zero-shot there measures transfer.

Everything is seeded; one run on one machine with the same thread count gives identical
weights, but other thread counts need not (float reductions): the full world's model ships
with the package as a versioned artefact (`world.artefacts`), so every machine uses the same.
The model directory is written to a temporary sibling and renamed into place.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import WorldConfig
from .model import IMAGE_MEAN, IMAGE_STD, BuiltinModel, ModelConfig, VisionConfig

#: bump when training changes what it produces (part of the world's cache key via the builder)
TRAIN_VERSION = "2"
#: pretraining render seeds: PRETRAIN_SEED_BASE + k * SEED_STRIDE + code point (< 2**32)
PRETRAIN_SEED_BASE = 10_000_000
SEED_STRIDE = 1_000_000

CLEAN_TEMPLATES = (
    "{}", "a photo of a {}.", "a picture of a {}.", "an emoji of a {}.", "a {} emoji.",
    "a close-up photo of the {}.", "a bright photo of a {}.", "an icon of a {}.",
    "a rendering of the {}.", "the {}.", "a small {}.", "a cartoon {}.",
)
PARTIAL_TEMPLATES = ("{}", "a photo of a {}.", "an emoji of a {}.", "a picture of the {}.")
_STOP = {"a", "an", "the", "of", "with", "and", "in", "on", "to", "for", "at", "by", "or",
         "from", "up", "down", "left", "right", "black", "white", "person", "man", "woman",
         "symbol", "sign", "face"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes the built-in model besides the world itself."""
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 12
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    captions_per_concept: int = 6     # clean captions drawn per concept (encoded once)
    p_wrong: float = 0.15             # images whose caption belongs to another concept
    p_partial: float = 0.2            # per-step chance a caption is a vague one-word one
    p_grey: float = 0.0               # per-step chance an image is shown in greyscale
    p_lineart: float = 0.0            # per-step chance it is shown as a dark-on-light edge map
    p_silhouette: float = 0.0         # per-step chance it is shown as ink on paper (its mask)
    p_drawing: float = 0.0            # per-step chance it is an ink drawing (contour + edges)
    sketch_per_concept: int = 0       # Symbola renders per concept that no task uses
    loss: str = "bank"                # "bank": against every caption; "inbatch": CLIP's
    seed: int = 0
    max_threads: int = 8

    def to_json(self) -> dict:
        return asdict(self)


_FULL_MODEL = ModelConfig(VisionConfig(patch=16, width=128, depth=6, heads=4,
                                       stem_channels=(16, 32, 64, 128), stem_norm=True),
                          init_logit_scale=30.0)
_RECIPE = dict(batch_size=64, lr=1e-3, p_wrong=0.03, p_partial=0.1, p_grey=0.05,
               p_lineart=0.0, p_silhouette=0.1, p_drawing=0.35, loss="bank")
TRAIN_CONFIGS: dict[str, TrainConfig] = {
    "full": TrainConfig(model=_FULL_MODEL, epochs=18, sketch_per_concept=16, **_RECIPE),
    "mini": TrainConfig(model=_FULL_MODEL, epochs=12, sketch_per_concept=3, **_RECIPE),
}


def train_config_for(cfg: WorldConfig) -> TrainConfig:
    """The training recipe of a world configuration (unknown names use the full recipe)."""
    base = TRAIN_CONFIGS.get(cfg.name, TRAIN_CONFIGS["full"])
    vis = replace(base.model.vision, image_size=cfg.image_size)
    return replace(base, model=replace(base.model, vision=vis), seed=base.seed + cfg.seed)


def model_key(cfg: WorldConfig) -> str:
    """The built-in model's recipe: what its training reads (versions, training
    configuration, the world fields pretraining depends on). Shipped weights carry it."""
    import hashlib
    from .config import WORLD_VERSION
    blob = json.dumps({"v": WORLD_VERSION, "train": TRAIN_VERSION,
                       "recipe": train_config_for(cfg).to_json(),
                       "image_size": cfg.image_size, "max_concepts": cfg.max_concepts,
                       "pretrain_per_concept": cfg.pretrain_per_concept,
                       "max_classes_per_task": cfg.max_classes_per_task,
                       "seed": cfg.seed}, sort_keys=True)
    return f"{cfg.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
# captions

def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z'\-]*", text.lower())
            if w not in _STOP and len(w) > 2]


def concept_captions(concept, n_clean: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(clean, partial) caption strings for one concept; deterministic given rng."""
    names = list(dict.fromkeys([concept.label, concept.name, *concept.keywords]))
    pool = [t.format(n) for n in names for t in CLEAN_TEMPLATES]
    clean = [CLEAN_TEMPLATES[1].format(concept.label)]          # the CLIP prompt, always
    rest = [c for c in pool if c != clean[0]]
    clean += rng.sample(rest, min(len(rest), max(0, n_clean - 1)))
    words = list(dict.fromkeys(_words(concept.label) + _words(concept.name)))
    partial = [rng.choice(PARTIAL_TEMPLATES).format(w) for w in words[:3]]
    return clean, partial or clean[:1]


@dataclass
class CaptionBank:
    embeddings: torch.Tensor          # [S, D] unique caption embeddings
    clean: list[list[int]]            # per concept: indices into embeddings
    partial: list[list[int]]


def build_captions(concepts: Sequence, tcfg: TrainConfig, progress: bool,
                   cache: bool = True) -> CaptionBank:
    """Caption strings per concept, encoded once (through the on-disk sentence cache)."""
    from .textenc import shared_text_tower, text_cache
    rng = random.Random(f"captions:{tcfg.seed}")
    texts: dict[str, int] = {}
    clean_idx, partial_idx = [], []
    for c in concepts:
        clean, partial = concept_captions(c, tcfg.captions_per_concept, rng)
        clean_idx.append([texts.setdefault(t, len(texts)) for t in clean])
        partial_idx.append([texts.setdefault(t, len(texts)) for t in partial])
    tower = shared_text_tower()
    emb = (text_cache().encode(tower, list(texts), progress=progress) if cache
           else tower.encode(list(texts), progress=progress))
    return CaptionBank(emb, clean_idx, partial_idx)


# ---------------------------------------------------------------------------------------------
# images

def pretrain_items(concepts: Sequence, per_concept: int) -> list[tuple[object, int]]:
    """(concept, seed) pairs of k = 0..per_concept-1 renders; a seed depends only on (code
    point, k), so the mini world's renders are a subset of the full world's."""
    top = PRETRAIN_SEED_BASE + per_concept * SEED_STRIDE
    if top >= 2 ** 32:
        raise ValueError("pretrain_per_concept too large for the pretraining seed range")
    return [(c, PRETRAIN_SEED_BASE + k * SEED_STRIDE + c.codepoint)
            for k in range(per_concept) for c in concepts]


def pretrain_plan(cfg: WorldConfig, concepts: Sequence) -> dict[str, list[tuple[object, int]]]:
    """domain → (concept, seed) of every pretraining render: colour renders of every concept,
    sketch renders of the concepts no task uses (the no-leak rule; tested)."""
    from .tasks import task_concept_ids
    used = set(task_concept_ids(cfg))
    free = [c for c in concepts if c.id not in used]
    return {"colour": pretrain_items(concepts, cfg.pretrain_per_concept),
            "sketch": pretrain_items(free, train_config_for(cfg).sketch_per_concept)}


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGE_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _line_art(grey: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] grey -> dark strokes on white: inverted, contrast-stretched Sobel magnitude."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    g = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    mag = (F.conv2d(g, kx) ** 2 + F.conv2d(g, kx.transpose(2, 3)) ** 2).sqrt()
    mag = mag / mag.amax((2, 3), keepdim=True).clamp_min(1e-6)
    return (1 - 1.5 * mag).clamp(0, 1)


_LUMA = (0.299, 0.587, 0.114)


def _drawing(grey: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] grey and object mask -> stroke strength in [0,1]: the mask's contour plus
    the object's inner edges, as a pen drawing of the object would have them."""
    contour = F.max_pool2d(mask, 3, 1, 1) + F.max_pool2d(-mask, 3, 1, 1)   # dilate − erode
    inner = 1 - _line_art(grey)                                            # edge magnitude
    return (contour + 1.2 * (inner > 0.35).float() * inner * mask).clamp(0, 1)


def augment(x: torch.Tensor, gen: torch.Generator, p_grey: float,
            p_lineart: float = 0.0, p_silhouette: float = 0.0,
            p_drawing: float = 0.0) -> torch.Tensor:
    """Cheap batched augmentation on [B,C,H,W] in [0,1] (C = 4: the 4th channel is the
    object's mask, 0 where unknown): random scale (0.87–1.15) and shift (±8%),
    border-replicated; then at most one style per image — greyscale, line-art (edges of the
    grey image), an ink silhouette of the mask on paper, or an ink drawing (contour and
    inner edges) on paper. Renders already vary pose,
    background and colour; this keeps epochs over the same renders from memorising pixels,
    and the colourless views stand in for the drawings and renditions of web data."""
    b = x.shape[0]
    s = torch.empty(b).uniform_(0.87, 1.15, generator=gen)
    t = torch.empty(b, 2).uniform_(-0.08, 0.08, generator=gen)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if p_grey + p_lineart + p_silhouette + p_drawing <= 0:
        return x[:, :3]
    mask = x[:, 3:4] if x.shape[1] == 4 else torch.zeros_like(x[:, :1])
    x = x[:, :3]
    u = torch.rand(b, generator=gen)
    paper = torch.empty(b, 3, 1, 1).uniform_(0.82, 1.0, generator=gen)
    ink = torch.empty(b, 3, 1, 1).uniform_(0.0, 0.3, generator=gen)
    grey = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    g = (u < p_grey).view(b, 1, 1, 1)
    la = ((u >= p_grey) & (u < p_grey + p_lineart)).view(b, 1, 1, 1)
    has_mask = mask.flatten(1).amax(1) > 0.5
    c1 = p_grey + p_lineart
    sil = ((u >= c1) & (u < c1 + p_silhouette) & has_mask).view(b, 1, 1, 1)
    dra = ((u >= c1 + p_silhouette) & (u < c1 + p_silhouette + p_drawing)
           & has_mask).view(b, 1, 1, 1)
    out = torch.where(g, grey.expand_as(x), x)
    if bool(la.any()):
        out = torch.where(la, _line_art(grey).expand_as(x), out)
    if bool(sil.any()):
        out = torch.where(sil, paper + (ink - paper) * mask, out)
    if bool(dra.any()):
        out = torch.where(dra, paper + (ink - paper) * _drawing(grey, mask), out)
    return out


# ---------------------------------------------------------------------------------------------
# training

def _soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def _bank_targets(cap: np.ndarray, partial: np.ndarray, text_concept: np.ndarray,
                  clean: list[np.ndarray], n_captions: int) -> torch.Tensor:
    """Soft targets over the caption bank: uniform over the clean captions of the caption's
    concept (they all describe the image equally well), or the one vague caption drawn."""
    target = torch.zeros(len(cap), n_captions)
    for r, (c, p, k) in enumerate(zip(cap, partial, text_concept)):
        if p:
            target[r, c] = 1.0
        else:
            target[r, clean[k]] = 1.0 / len(clean[k])
    return target


def fit(model: BuiltinModel, images: torch.Tensor, concept_of: torch.Tensor,
        bank: CaptionBank, tcfg: TrainConfig, progress: bool = True) -> dict:
    """Train model.visual (and the logit scale) in place. images: uint8 [N,3,H,W];
    concept_of: [N] concept index per image. Returns a small training log."""
    from tqdm.auto import tqdm
    gen = torch.Generator().manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    n, n_concepts = images.shape[0], len(bank.clean)
    # fixed mislabelled images: their caption comes from another concept, every epoch
    wrong = rng.random(n) < tcfg.p_wrong
    text_concept = concept_of.numpy().copy()
    shift = rng.integers(1, max(n_concepts, 2), n)
    text_concept[wrong] = (text_concept[wrong] + shift[wrong]) % n_concepts
    clean = [np.asarray(c) for c in bank.clean]
    partial = [np.asarray(p) for p in bank.partial]
    bs = min(tcfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = steps_per_epoch * tcfg.epochs
    warm = max(1, int(total * tcfg.warmup_frac))
    decay, no_decay = [], []
    for name, p in model.visual.named_parameters():
        (no_decay if p.ndim < 2 or name in ("cls", "pos") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                             {"params": no_decay + [model.log_logit_scale], "weight_decay": 0.0}],
                            lr=tcfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    model.train()
    log: dict = {"steps": total, "loss": []}
    bar = tqdm(total=total, desc="training built-in model", unit="step", disable=not progress)
    for epoch in range(tcfg.epochs):
        perm = torch.randperm(n, generator=gen).numpy()
        # caption of every image this epoch: a clean or partial caption of its text concept
        is_partial = rng.random(n) < tcfg.p_partial
        choice = rng.random(n)
        cap = np.empty(n, np.int64)
        for i in range(n):
            pool = partial[text_concept[i]] if is_partial[i] else clean[text_concept[i]]
            cap[i] = pool[int(choice[i] * len(pool))]
        run = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * bs:(s + 1) * bs]
            x = _normalise(augment(images[idx].float().div_(255), gen, tcfg.p_grey,
                                   tcfg.p_lineart, tcfg.p_silhouette, tcfg.p_drawing))
            v = F.normalize(model.visual(x), dim=-1)
            if tcfg.loss == "bank":
                logits = model.logit_scale * v @ bank.embeddings.T
                loss = _soft_ce(logits, _bank_targets(cap[idx], is_partial[idx], text_concept[idx],
                                              clean, bank.embeddings.shape[0]))
            else:
                t = bank.embeddings[cap[idx]]
                group = torch.from_numpy(text_concept[idx])
                logits = model.logit_scale * v @ t.T
                pos = (group[:, None] == group[None, :]).float()
                target = pos / pos.sum(1, keepdim=True)
                loss = 0.5 * (_soft_ce(logits, target) + _soft_ce(logits.T, target))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}",
                            scale=f"{float(model.logit_scale.detach()):.1f}")
        log["loss"].append(round(run / steps_per_epoch, 4))
    bar.close()
    model.eval()
    log["logit_scale"] = float(model.logit_scale.detach())
    return log


@torch.inference_mode()
def layer_statistics(model: BuiltinModel, images: torch.Tensor, batch_size: int = 256
                     ) -> dict[str, torch.Tensor]:
    """Mean and variance over images and tokens of every block's input ([L, width] each):
    the "source statistics" distribution-alignment test-time methods (PromptAlign) need."""
    sums, sq, count = None, None, 0
    for s in range(0, images.shape[0], batch_size):
        x = _normalise(images[s:s + batch_size, :3].float().div_(255))
        _, inputs = model.visual(x, return_layer_inputs=True)
        h = torch.stack([i.flatten(0, 1) for i in inputs])       # [L, B*T, W]
        sums = h.sum(1) if sums is None else sums + h.sum(1)
        sq = (h * h).sum(1) if sq is None else sq + (h * h).sum(1)
        count += h.shape[1]
    mean = sums / count
    return {"mean": mean, "var": (sq / count - mean ** 2).clamp_min(0)}


def train_builtin_model(cfg: WorldConfig, concepts: list, out_dir: Path,
                        progress: bool = True) -> Path:
    """Render the pretraining set, train the image tower, write `out_dir` (model.safetensors,
    config.json, layer_stats.safetensors) atomically. Returns out_dir."""
    from safetensors.torch import save_file

    from .render import render_batch
    from .textenc import shared_text_tower

    out_dir = Path(out_dir)
    tcfg = train_config_for(cfg)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(tcfg.max_threads, threads_before)))   # honours OMP_NUM_THREADS
    t0 = time.time()
    try:
        torch.manual_seed(tcfg.seed)
        plan = pretrain_plan(cfg, concepts)
        arrs = [render_batch(plan["colour"], "colour", cfg.image_size, progress=progress,
                             with_mask=True)]
        if plan["sketch"]:
            sk = render_batch(plan["sketch"], "sketch", cfg.image_size, progress=progress)
            arrs.append(np.concatenate([sk, np.zeros_like(sk[..., :1])], -1))  # no mask
        arr = np.concatenate(arrs)
        del arrs
        t_render = time.time() - t0
        images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        index = {c.id: i for i, c in enumerate(concepts)}
        items = plan["colour"] + plan["sketch"]
        concept_of = torch.tensor([index[c.id] for c, _ in items])
        t1 = time.time()
        bank = build_captions(concepts, tcfg, progress)
        t_text = time.time() - t1
        model = BuiltinModel(tcfg.model, text=shared_text_tower())
        t2 = time.time()
        log = fit(model, images, concept_of, bank, tcfg, progress)
        t_fit = time.time() - t2
        stats = layer_statistics(model, images[:: max(1, images.shape[0] // 2048)])
        meta = {"world": cfg.key(), "world_config": asdict(cfg), "train": tcfg.to_json(),
                "train_version": TRAIN_VERSION, "n_concepts": len(concepts),
                "n_images": int(images.shape[0]),
                "n_images_by_domain": {d: len(v) for d, v in plan.items()}, "n_captions": int(bank.embeddings.shape[0]),
                "seconds": {"render": round(t_render, 1), "captions": round(t_text, 1),
                            "fit": round(t_fit, 1), "total": round(time.time() - t0, 1)},
                "log": log}
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save(tmp, meta=meta)
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp / "layer_stats.safetensors"))
        (tmp / "train_log.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        return out_dir
    finally:
        torch.set_num_threads(threads_before)
