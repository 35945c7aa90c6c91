"""The one training loop of every method that learns inside the frozen backbone.

No trainer hierarchy: a method supplies its module and its forward (methods/prompted.py);
this loop supplies what CoOp-style code spreads over a framework —
- the few-shot images decoded and preprocessed once, then CoOp's augmentation (random
  resized crop, scale 0.08–1, + horizontal flip) drawn per step from a seeded generator on
  the preprocessed tensors (batched with roi_align, on the device);
- the paper's optimiser (SGD / Adadelta / AdamW) with a constant warm-up epoch then cosine;
- AMP (bfloat16) and pinned host memory on CUDA; deterministic fp32 on CPU unless
  amp=True asks for bfloat16 there too;
- the learned parameters checkpointed atomically after every epoch and, inside a long epoch,
  every `checkpoint_every` seconds (with the epoch's data order and the step reached), with
  the optimiser and generator state, so an interrupted fit resumes at the step it stopped at
  and ends bit-identical to an uninterrupted one;
- the epoch (or the early stop) chosen on val accuracy, never on test; a NaN loss stops
  with a clear error and leaves the last good checkpoint in place.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.base import LabeledImages
from ..errors import AnyclassError
from ..locks import atomic_path

#: recipe hyperparameters every prompt method takes (the paper's values are per method)
COMMON_RECIPE = dict(epochs=10, batch_size=32, lr=0.002, optimizer="sgd", momentum=0.9,
                     weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5, select="val",
                     patience=None, seed=1, amp=None, crop_scale=(0.08, 1.0))
OPTIMIZERS = ("sgd", "adadelta", "adamw")


class NaNLossError(AnyclassError, FloatingPointError):
    """The loss stopped being finite; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------ images

def load_images(backbone, ds: LabeledImages, batch_size: int = 128, num_workers: int | None = None,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images [N,3,H,W] (float32, CPU) and labels [N] of every readable file of
    `ds` (unreadable ones are skipped with a warning naming each)."""
    chunks = list(iter_batches(backbone, ds, batch_size, num_workers, progress, to_device=False))
    if not chunks:
        raise AnyclassError(f"{ds.name}: no readable image")
    x = torch.cat([c[0] for c in chunks])
    idx = torch.cat([c[1] for c in chunks])
    return x, torch.as_tensor(np.asarray(ds.labels, dtype=np.int64))[idx]


def iter_batches(backbone, ds: LabeledImages, batch_size: int = 128, num_workers: int | None = None,
                 progress: bool = False, to_device: bool = True
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(preprocessed batch, row indices) over `ds`, decoding in DataLoader workers."""
    from ..data.images import ImageFileDataset, collate_skip_bad, warn_skipped
    from ..features.extract import loader_plan
    device = torch.device(backbone.device)
    plan = loader_plan(device, len(ds), batch_size, num_workers)
    loader = torch.utils.data.DataLoader(
        ImageFileDataset(ds.paths, backbone.preprocess), batch_size=batch_size, shuffle=False,
        num_workers=plan.num_workers, collate_fn=collate_skip_bad, pin_memory=plan.pin_memory,
        prefetch_factor=plan.prefetch_factor)
    bad = []
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=f"images {ds.name}", unit="batch", leave=False)
    for b in it:
        bad.extend(b.bad)
        if b.images is None:
            continue
        x = b.images.to(device, non_blocking=True) if to_device else b.images
        yield x, b.indices
    warn_skipped(bad, len(ds), stacklevel=3)


def crop_boxes(n: int, h: int, w: int, gen: torch.Generator, scale: Sequence[float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop box draw (+ a flip coin) for `n` crops of an h×w image,
    vectorised: boxes [n, 4] (x0, y0, x1, y1) and flips [n] bool, all draws from `gen` (CPU)."""
    area = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=gen) * (h * w)
    logr = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    cw, ch = (area * logr.exp()).sqrt(), (area / logr.exp()).sqrt()
    ok = (cw <= w) & (ch <= h)
    first = ok.int().argmax(1)
    rows = torch.arange(n)
    cw, ch = cw[rows, first], ch[rows, first]
    none = ~ok.any(1)
    cw[none], ch[none] = float(w), float(h)                          # fallback: the whole image
    u = torch.rand(n, 2, generator=gen)
    x0, y0 = u[:, 0] * (w - cw), u[:, 1] * (h - ch)
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.stack([x0, y0, x0 + cw, y0 + ch], 1), flip


def resized_crops(x: torch.Tensor, rows: torch.Tensor, boxes: torch.Tensor,
                  flip: torch.Tensor) -> torch.Tensor:
    """Crop boxes[i] of image x[rows[i]], resized back to x's size, flipped where flip[i]:
    one batched roi_align on x's device."""
    from torchvision.ops import roi_align
    h, w = x.shape[-2:]
    boxes = torch.cat([rows.float()[:, None], boxes], 1).to(x.device, x.dtype)
    # one bilinear sample at each output pixel's centre = a bilinear resize of the crop (the
    # crop is never larger than the input); more samples per bin would blur every image
    out = roi_align(x, boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return torch.where(flip.to(x.device)[:, None, None, None], out.flip(-1), out)


def augment(x: torch.Tensor, gen: torch.Generator, scale: Sequence[float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """CoOp's train augmentation on a preprocessed batch: a random resized crop back to the
    input size and a horizontal flip with probability ½, all draws from `gen` (CPU)."""
    b, _, h, w = x.shape
    boxes, flip = crop_boxes(b, h, w, gen, scale, ratio, tries)
    return resized_crops(x, torch.arange(b), boxes, flip)


# ------------------------------------------------------------------------------ optimiser

def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise AnyclassError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")


def epoch_lr(epoch: int, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Dassl's schedule: constant `warmup_lr` for the warm-up epochs, then cosine to 0."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))


# ------------------------------------------------------------------------------ checkpoint

def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():                       # "<param id>.<state name>"
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, module: torch.nn.Module, opt: torch.optim.Optimizer,
                    gen: torch.Generator, best: dict | None, progress: dict,
                    perm: torch.Tensor | None = None) -> None:
    """`perm`: the data order of an epoch saved part-way (progress["step"] steps done)."""
    from safetensors.torch import save_file
    sd = {f"module.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if perm is not None:
        sd["rng.perm"] = perm.contiguous()
    if best is not None:
        sd.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best["state"].items()})
    ot, ometa = _flatten_optimizer(opt.state_dict())
    sd.update(ot)
    sd["rng.gen"] = gen.get_state()
    meta = {"progress": json.dumps(progress), "optimizer": json.dumps(ometa),
            "best": json.dumps({k: v for k, v in (best or {}).items() if k != "state"})}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), {k: json.loads(v) for k, v in meta.items()}


def _split(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}


def fit_key(method, backbone, train: LabeledImages, val: LabeledImages | None) -> str:
    """What a checkpoint belongs to: method, hyperparameters, backbone, the exact images."""
    h = hashlib.sha256()
    h.update(json.dumps([method.registry_name(), method.get_params(), backbone.identity,
                         backbone.weights_hash, train.classnames], sort_keys=True,
                        default=str).encode())
    for ds in (train, val):
        if ds is not None:
            h.update(json.dumps([ds.paths, ds.labels]).encode())
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------ the loop

def check_train_set(train: LabeledImages) -> None:
    """Every class needs at least one training image (its text is trained against none)."""
    counts = np.bincount(np.asarray(train.labels, dtype=np.int64), minlength=len(train.classnames))
    empty = [train.classnames[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise AnyclassError(f"{train.name}: class {empty[0]!r} has no training image"
                            + (f" ({len(empty)} classes have none)" if len(empty) > 1 else ""))


@torch.no_grad()
def accuracy(method, backbone, x: torch.Tensor, y: torch.Tensor, classnames: Sequence[str],
             batch_size: int = 256) -> float:
    classes = method.encode_classes(backbone, classnames)
    hits = 0
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].to(backbone.device, non_blocking=True)
        with _autocast(backbone.device, method.amp):
            pred = method.forward(backbone, xb, classes).argmax(1).cpu()
        hits += int((pred == y[s:s + batch_size]).sum())
    return hits / max(1, len(x))


def _autocast(device: torch.device | str, amp: bool | None):
    """bfloat16 autocast: on CUDA by default (amp=None), anywhere with amp=True (on CPUs
    with bf16 units it halves the text tower's cost), never with amp=False."""
    dev = torch.device(device)
    on = dev.type == "cuda" if amp is None else bool(amp)
    if on and dev.type == "cpu" and not cpu_has_bf16():
        warnings.warn("amp=True on a CPU without bfloat16 units (no AVX512-BF16/AMX): bf16 is "
                      "emulated and 6-9x slower than float32 here; run without amp",
                      RuntimeWarning, stacklevel=3)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on)


def bf16_pays(device: torch.device | str | None = None) -> bool:
    """Whether bfloat16 autocast speeds `device` (default: CUDA if present, else the CPU) up:
    CUDA, or a CPU with bf16 units. Recipes that want bf16 wherever it pays set
    amp=bf16_pays(device), and key their caches on the result."""
    dev = torch.device(device if device is not None else
                       "cuda" if torch.cuda.is_available() else "cpu")
    return dev.type == "cuda" or (dev.type == "cpu" and cpu_has_bf16())


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (else autocast to bf16 is a slowdown)."""
    cpu = torch.cpu
    return any(bool(getattr(cpu, f, lambda: False)())
               for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


#: seconds between checkpoints inside an epoch (a one-epoch CoCoOp fit on the CPU is an hour)
CHECKPOINT_EVERY_S = 300.0


def fit_prompts(method, backbone, train: LabeledImages, val: LabeledImages | None,
                checkpoint: str | Path | None = None, progress: bool = True,
                checkpoint_every: float = CHECKPOINT_EVERY_S):
    """Fit `method.module_` (see the module docstring); returns `method`."""
    names = list(train.classnames)
    if len(train) == 0:
        raise AnyclassError(f"{train.name}: empty training set")
    check_train_set(train)
    val_ds = None
    if val is not None and len(val):
        val_ds = val
    if method.select == "val" and val_ds is None:
        raise AnyclassError(f"{train.name}: the val split is empty, but the epoch must be chosen "
                            f"on val (pass a val split, or select='last')")
    if int(method.epochs) <= int(method.warmup_epochs):
        raise AnyclassError(f"epochs={method.epochs} <= warmup_epochs={method.warmup_epochs}: every "
                            f"epoch would run at warmup_lr={method.warmup_lr}, never at "
                            f"lr={method.lr}; set warmup_epochs=0 or train more epochs")
    if method.select not in ("val", "last"):
        raise AnyclassError(f"select must be 'val' or 'last', got {method.select!r}")
    device = torch.device(backbone.device)
    torch.manual_seed(method.seed)
    method.prepare(backbone, names)
    module = method.module_
    params = [p for p in module.parameters() if p.requires_grad]
    x, y = load_images(backbone, train, progress=progress)
    xv, yv = (load_images(backbone, val_ds, progress=progress) if val_ds is not None
              and method.select == "val" else (None, None))
    if device.type == "cuda":
        x = x.pin_memory()
    opt = make_optimizer(method.optimizer, params, method.lr, method.momentum, method.weight_decay)
    gen = torch.Generator().manual_seed(method.seed)
    ckpt = Path(checkpoint) if checkpoint else None
    key = fit_key(method, backbone, train, val_ds)
    start, best, history = 0, None, []
    step0, total0, perm0 = 0, 0.0, None        # an epoch checkpointed part-way
    if ckpt is not None and ckpt.exists():
        try:
            sd, meta = load_checkpoint(ckpt)
            if meta["progress"]["key"] == key:
                module.load_state_dict(_split(sd, "module"))
                opt.load_state_dict(_unflatten_optimizer(_split(sd, "opt"), meta["optimizer"]))
                gen.set_state(sd["rng.gen"])
                start, history = meta["progress"]["epoch"], meta["progress"]["history"]
                if meta["progress"].get("step"):
                    step0, total0 = meta["progress"]["step"], meta["progress"]["loss_sum"]
                    perm0 = sd["rng.perm"]
                if meta["best"]:
                    best = {**meta["best"], "state": _split(sd, "best")}
            else:
                warnings.warn(f"{ckpt} belongs to another fit; starting afresh", stacklevel=2)
        except Exception as e:  # a corrupt checkpoint must not stop a fit
            warnings.warn(f"{ckpt} is unreadable ({type(e).__name__}: {e}); starting afresh",
                          stacklevel=2)
    n, bs = len(x), int(method.batch_size)
    steps = math.ceil(n / bs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=(method.epochs - start) * steps - step0,
                   desc=f"fit {method.registry_name()}", unit="step", leave=False)
    t0, seen = time.perf_counter(), 0
    stale, saved_at, last_good = 0, time.perf_counter(), "none saved"
    if start or step0:
        last_good = f"{ckpt} (epoch {start}" + (f", step {step0})" if step0 else ")")
    for epoch in range(start, method.epochs):
        lr = epoch_lr(epoch, method.lr, method.epochs, method.warmup_epochs, method.warmup_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        module.train()
        if perm0 is not None:               # resume inside this epoch: same order, same draws
            perm, total, first, perm0 = perm0, total0, step0, None
        else:
            perm, total, first = torch.randperm(n, generator=gen), 0.0, 0
        for s in range(first, steps):
            idx = perm[s * bs:(s + 1) * bs]
            xb = augment(x[idx].to(device, non_blocking=True), gen, method.crop_scale)
            yb = y[idx].to(device)
            with _autocast(device, method.amp):
                classes = method.encode_classes(backbone, names)     # once per step
                logits = method.forward(backbone, xb, classes)
            loss = F.cross_entropy(logits.float(), yb)
            if not torch.isfinite(loss):
                raise NaNLossError(f"the loss became {loss.item()} at epoch {epoch + 1} step "
                                   f"{s + 1}: lower the learning rate (lr={method.lr}); last good "
                                   f"checkpoint: {last_good}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", ips=f"{seen / (time.perf_counter() - t0):.0f}")
            if ckpt is not None and s + 1 < steps and time.perf_counter() - saved_at >= checkpoint_every:
                save_checkpoint(ckpt, module, opt, gen, best,
                                {"key": key, "epoch": epoch, "history": history, "step": s + 1,
                                 "loss_sum": total}, perm=perm)
                saved_at, last_good = time.perf_counter(), f"{ckpt} (epoch {epoch}, step {s + 1})"
        module.eval()
        rec = {"epoch": epoch + 1, "loss": total / n, "lr": lr}
        if xv is not None:                    # only with select="val": "last" chooses nothing
            rec["val_acc1"] = accuracy(method, backbone, xv, yv, names)
        history.append(rec)
        improved = best is None or (method.select == "val" and rec["val_acc1"] > best["val_acc1"]) \
            or method.select == "last"
        if improved:
            best = {"epoch": epoch + 1, "val_acc1": rec.get("val_acc1"),
                    "state": copy.deepcopy({k: v.detach().cpu() for k, v in module.state_dict().items()})}
            stale = 0
        else:
            stale += 1
        start = epoch + 1
        if ckpt is not None:
            save_checkpoint(ckpt, module, opt, gen, best,
                            {"key": key, "epoch": epoch + 1, "history": history})
            saved_at, last_good = time.perf_counter(), f"{ckpt} (epoch {epoch + 1})"
        if method.patience is not None and stale >= int(method.patience):
            break
    if bar is not None:
        bar.close()
    if best is not None:
        module.load_state_dict({k: v.to(device) for k, v in best["state"].items()})
    module.eval()
    method.history_ = history
    method.chosen_ = {"epoch": best["epoch"] if best else 0,
                      "val_acc1": best.get("val_acc1") if best else None,
                      "select": method.select}
    method.recipe_ = {"fit_key": key, "train": train.name, "train_images": int(n),
                      "val_images": 0 if xv is None else int(len(xv)), "epochs_run": len(history)}
    method.train_seconds_ = time.perf_counter() - t0
    return method
