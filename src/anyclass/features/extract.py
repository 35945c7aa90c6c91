"""Batched image-feature extraction, streamed into the on-disk cache.

DataLoader workers decode and preprocess while the main process runs the forward pass
(AMP on CUDA). Rows go into one preallocated file chunk by chunk, so memory holds a chunk
and the loader's prefetch queue, never the dataset; a killed run resumes from its finished
chunks and a damaged file is repaired chunk by chunk (see cache.py).

Pipeline choices (measured in docs/benchmarks.md, "Feature extraction"):

* uint8 transport. When the backbone's preprocessing ends in "to float, /255, normalise"
  (open_clip/torchvision `ToTensor()+Normalize()`, the built-in model's preprocess, or any
  preprocess offering `uint8_split()`), workers stop at the uint8 CHW image; the main
  process runs the float conversion and normalisation once per batch, on the model's device
  (after a 4x smaller host-to-device copy on a GPU). The batched ops are the same
  elementwise IEEE operations in the same order, so features are bit-identical to the
  per-image preprocess (checked on the first image of every worker; a mismatch falls back to
  the per-image path with a warning).
* Workers. CUDA: up to cores-1 workers (one core feeds the GPU), pinned memory,
  non-blocking copies, and the device-to-host copy of batch k overlapped with batch k+1.
  CPU: the forward pass already uses every core through torch's intra-op threads, and
  decoding workers running at the same priority preempt those threads inside their
  barriers (a 2-core machine measured ~0.6 of the bare forward). So on CPU the workers run
  at the lowest scheduling priority (nice 19): they soak up the cycles the forward leaves
  idle and, when the main process waits for a batch, decode on every core at once.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.base import LabeledImages
from ..data.images import (BadImageWarning, BadItem, Batch, ImageFileDataset, make_augment,
                           max_pixels_default)
from .cache import CacheEntry, feature_key

log = logging.getLogger("anyclass.features")

DEFAULT_CHUNK = 1024


class ImageEncoder(Protocol):
    """The part of the backbone protocol extraction needs."""
    identity: str
    weights_hash: str
    embed_dim: int

    def preprocess(self, img: Image.Image) -> torch.Tensor: ...
    def preprocess_id(self) -> str: ...
    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Features:
    """Image embeddings of a dataset, row i <-> ds.paths[i]. Rows of files that could not
    be read are zero and `valid` is False there; evaluation should use `valid_only()`."""
    features: np.ndarray          # [N, D] float32, L2-normalised (read-only memmap if cached)
    labels: np.ndarray            # int64 [N], -1 = unlabelled
    valid: np.ndarray             # bool [N]
    paths: list[str]
    key: str
    classnames: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    dataset: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Features":
        """Rows `indices` (in memory), e.g. a few-shot sample's meta["source_indices"]."""
        idx = np.asarray(indices, dtype=np.int64)
        keep = set(self.paths[i] for i in idx.tolist())
        return Features(np.asarray(self.features[idx]), self.labels[idx], self.valid[idx],
                        [self.paths[i] for i in idx.tolist()], self.key,
                        list(self.classnames), [s for s in self.skipped if s[0] in keep],
                        self.dataset)

    def valid_only(self) -> "Features":
        return self.subset(np.flatnonzero(self.valid))


class _PathTable(Sequence[str]):
    """Paths packed in two numpy arrays: forked DataLoader workers share them without the
    copy-on-write growth a Python list of a million str objects causes (refcounts)."""

    def __init__(self, paths: Sequence[str]) -> None:
        enc = [os.fspath(p).encode("utf-8", "surrogateescape") for p in paths]
        self.off = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in enc], out=self.off[1:])
        self.buf = np.frombuffer(b"".join(enc), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.off) - 1

    def __getitem__(self, i):  # type: ignore[override]
        i = int(i)
        return self.buf[self.off[i]:self.off[i + 1]].tobytes().decode("utf-8",
                                                                      "surrogateescape")


class _Indices(torch.utils.data.Sampler[int]):
    def __init__(self, idx: np.ndarray) -> None:
        self.idx = idx

    def __iter__(self) -> Iterator[int]:
        return (int(i) for i in self.idx)

    def __len__(self) -> int:
        return len(self.idx)


# ------------------------------------------------------------------------ uint8 transport

class Uint8Split(NamedTuple):
    """A preprocess cut in two: `to_uint8(img)` -> uint8 CHW tensor (in workers), and
    `finish(x)` -> the float tensor preprocess(img) would give, for a uint8 batch [B,3,H,W]
    on any device. Backbones may offer `preprocess.uint8_split() -> Uint8Split | None`."""
    to_uint8: Callable[[Image.Image], torch.Tensor | None]  # None: not representable
    finish: Callable[[torch.Tensor], torch.Tensor]


def _pil_rgb_to_chw_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()


class _DeviceStats:
    """mean/std copied once per device (a per-batch copy from pageable host memory would
    synchronise the CUDA stream and serialise the pipeline)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.cpu = (mean, std)
        self.by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "cpu":
            return self.cpu
        if device not in self.by_device:
            self.by_device[device] = (self.cpu[0].to(device), self.cpu[1].to(device))
        return self.by_device[device]

    def __getstate__(self):  # pickled into spawn-started workers: CPU tensors only
        return {"cpu": self.cpu, "by_device": {}}


class _TorchvisionHead:
    """Compose(head..., ToTensor, Normalize): run the head, stop at uint8."""

    def __init__(self, head) -> None:
        self.head = head

    def __call__(self, img: Image.Image) -> torch.Tensor | None:
        out = self.head(img)
        if not isinstance(out, Image.Image) or out.mode != "RGB":
            return None  # ToTensor would not take its uint8 path: use the full transform
        return _pil_rgb_to_chw_uint8(out)


class _TorchvisionFinish:
    """ToTensor's uint8 tail (`.to(default float).div(255)`) then Normalize (sub_, div_),
    broadcast over the batch: the same elementwise operations, hence the same bits."""

    def __init__(self, mean, std, dtype: torch.dtype) -> None:
        self.stats = _DeviceStats(torch.as_tensor(mean, dtype=dtype).view(1, -1, 1, 1),
                                  torch.as_tensor(std, dtype=dtype).view(1, -1, 1, 1))
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats.on(x.device)
        return x.to(dtype=self.dtype).div(255).sub_(mean).div_(std)


class _BuiltinFinish:
    """BuiltinPreprocess's tensor half: (x.float().div_(255) - mean) / std."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.stats = _DeviceStats(mean.detach().float().reshape(1, -1, 1, 1),
                                  std.detach().float().reshape(1, -1, 1, 1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats.on(x.device)
        return (x.float().div_(255) - mean) / std


def uint8_split(preprocess) -> Uint8Split | None:
    """The uint8 split of `preprocess`, or None when it has no recognised uint8 stage."""
    hook = getattr(preprocess, "uint8_split", None)
    if callable(hook):
        return hook()
    mod = type(preprocess).__module__ or ""
    if type(preprocess).__name__ == "BuiltinPreprocess" and mod.startswith("anyclass."):
        return Uint8Split(preprocess.to_uint8,
                          _BuiltinFinish(preprocess.mean, preprocess.std))
    ts = getattr(preprocess, "transforms", None)
    if not mod.startswith("torchvision") or not isinstance(ts, (list, tuple)) or len(ts) < 2:
        return None
    from torchvision import transforms as T
    *head, to_tensor, norm = ts
    tensor_ops = (T.ToTensor, T.PILToTensor, T.Normalize, T.ConvertImageDtype)
    if (not isinstance(to_tensor, T.ToTensor) or type(norm) is not T.Normalize
            or any(isinstance(t, tensor_ops) for t in head)):
        return None
    return Uint8Split(_TorchvisionHead(T.Compose(head)),
                      _TorchvisionFinish(norm.mean, norm.std, torch.get_default_dtype()))


class _SplitTransform:
    """Dataset transform: uint8 CHW when the split applies, else the full float preprocess.
    The first image each process sees is also run through the full preprocess and compared
    bit for bit; on a mismatch this process uses the full preprocess from then on."""

    def __init__(self, preprocess, split: Uint8Split) -> None:
        self.preprocess = preprocess
        self.split = split
        self.state = "unchecked"  # per process: forked workers each check their first image

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.state == "off":
            return self.preprocess(img)
        u8 = self.split.to_uint8(img)
        if u8 is None:
            return self.preprocess(img)
        if self.state == "unchecked":
            ref = self.preprocess(img)
            same = ref.shape == u8.shape and torch.equal(self.split.finish(u8[None])[0], ref)
            if not same:
                log.warning("uint8 transport does not reproduce %r exactly; using the "
                            "per-image preprocess", self.preprocess)
                self.state = "off"
                return ref
            self.state = "on"
        return u8


def _collate(finish: Callable[[torch.Tensor], torch.Tensor] | None):
    return functools.partial(_collate_batch, finish)


def _collate_batch(finish, items: list) -> Batch:
    """Like data.images.collate_skip_bad; a batch mixing uint8 and float images (a file the
    uint8 path cannot represent) is finished to float here, per image."""
    good = [x for x in items if x is not None and not isinstance(x, BadItem)]
    bad = [x for x in items if isinstance(x, BadItem)]
    if not good:
        return Batch(None, torch.empty(0, dtype=torch.long), bad)
    imgs = [g[0] for g in good]
    if finish is not None and len({t.dtype for t in imgs}) > 1:
        imgs = [finish(t[None])[0] if t.dtype == torch.uint8 else t for t in imgs]
    return Batch(torch.stack(imgs), torch.tensor([g[1] for g in good], dtype=torch.long), bad)


# ------------------------------------------------------------------------ loader plan

def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LoaderPlan(NamedTuple):
    num_workers: int
    nice: int            # added to the workers' niceness (0 = same priority as the main)
    pin_memory: bool
    prefetch_factor: int | None


def loader_plan(device: torch.device, n_items: int, batch_size: int,
                num_workers: int | None = None) -> LoaderPlan:
    """DataLoader settings for extraction (see the module docstring for the reasons).

    CUDA: min(8, cores-1) workers, pinned memory, 4 batches prefetched per worker.
    CPU: min(8, cores) workers at nice 19 so they only take cycles the forward pass leaves
    idle. Either way no workers when everything fits in one batch (start-up would dominate).
    """
    cuda = device.type == "cuda"
    if num_workers is None:
        cores = _cores()
        if n_items <= batch_size:
            num_workers = 0
        elif cuda:
            num_workers = min(8, max(1, cores - 1))
        else:
            num_workers = min(8, cores)
    num_workers = max(0, int(num_workers))
    return LoaderPlan(num_workers, 0 if cuda else 19, cuda,
                      (4 if cuda else 2) if num_workers else None)


def _worker_init(nice: int, _: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process owns the cores for forward
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass


class _MemorySink:
    """cache=False: rows land in an in-memory array (small, interactive runs)."""

    def __init__(self, n: int, dim: int) -> None:
        self.arr = np.zeros((n, dim), dtype=np.float32)
        self.recs: dict[int, dict] = {}

    def write_chunk(self, c: int, start: int, rows: np.ndarray, invalid: list) -> None:
        self.arr[start:start + len(rows)] = rows
        self.recs[c] = {"invalid": invalid}


def _precision(device: torch.device, amp: bool | None) -> torch.dtype | None:
    if device.type != "cuda" or amp is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class _Encoder:
    """Forward passes with the device-to-host copy of batch k left in flight while the
    caller fetches batch k+1 (CUDA); on CPU every call returns its own rows at once."""

    def __init__(self, backbone: ImageEncoder, device: torch.device,
                 amp_dtype: torch.dtype | None,
                 finish: Callable[[torch.Tensor], torch.Tensor] | None,
                 normalize: bool = True) -> None:
        self.backbone, self.device, self.amp_dtype, self.finish = (backbone, device,
                                                                    amp_dtype, finish)
        self.normalize = normalize
        self.cuda = device.type == "cuda"
        self.pending: tuple | None = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # pinned host memory (DataLoader pin_memory) -> asynchronous copy on CUDA
        x = x.to(self.device, non_blocking=True)
        with torch.inference_mode():
            if x.dtype == torch.uint8:
                if self.finish is None:
                    raise RuntimeError("uint8 batch without a finishing transform")
                x = self.finish(x)  # float32 normalisation, outside autocast
            if self.amp_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    f = self.backbone.encode_images(x)
            else:
                f = self.backbone.encode_images(x)
            f = f.float()
            if self.normalize:
                f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # exact unit norm after AMP
        return f

    def submit(self, x: torch.Tensor, tag) -> list[tuple[np.ndarray, object]]:
        """Run batch `x`; returns the finished (rows, tag) pairs (zero or one on CUDA)."""
        f = self._forward(x)
        if not self.cuda:
            return [(f.numpy(), tag)]
        host = torch.empty(f.shape, dtype=f.dtype, pin_memory=True)
        host.copy_(f, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        done, self.pending = self.pending, (ev, host, tag)
        return self._collect(done)

    def flush(self) -> list[tuple[np.ndarray, object]]:
        done, self.pending = self.pending, None
        return self._collect(done)

    @staticmethod
    def _collect(done) -> list[tuple[np.ndarray, object]]:
        if done is None:
            return []
        ev, host, tag = done
        ev.synchronize()
        return [(host.numpy(), tag)]


def _run(backbone: ImageEncoder, paths: _PathTable, n: int, dim: int, chunk: int,
         pending: list[int], sink, batch_size: int, num_workers: int | None,
         augment, max_pixels: int, device: torch.device, amp_dtype: torch.dtype | None,
         progress: bool, desc: str, normalize: bool = True) -> list[BadItem]:
    """Extract the rows of the `pending` chunks into `sink`, chunk by chunk, in order."""
    from tqdm.auto import tqdm
    idx = np.concatenate([np.arange(c * chunk, min(n, (c + 1) * chunk)) for c in pending])
    plan = loader_plan(device, len(idx), batch_size, num_workers)
    split = uint8_split(backbone.preprocess)
    transform = _SplitTransform(backbone.preprocess, split) if split else backbone.preprocess
    finish = split.finish if split else None
    dataset = ImageFileDataset(paths, transform, max_pixels, augment)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=_Indices(idx), num_workers=plan.num_workers,
        collate_fn=_collate(finish), pin_memory=plan.pin_memory,
        worker_init_fn=(functools.partial(_worker_init, plan.nice) if plan.num_workers
                        else None),
        prefetch_factor=plan.prefetch_factor)
    encoder = _Encoder(backbone, device, amp_dtype, finish, normalize)
    size = {c: min(n, (c + 1) * chunk) - c * chunk for c in pending}
    remaining = dict(size)
    bufs: dict[int, np.ndarray] = {}
    invalid: dict[int, list] = {}
    bad_all: list[BadItem] = []
    bar = tqdm(total=len(idx), unit="img", desc=desc, disable=not progress, leave=False)

    def store(emb: np.ndarray, ii: np.ndarray) -> None:
        if emb.shape[1] != dim:
            raise RuntimeError(f"{backbone.identity}: encode_images returned "
                               f"{emb.shape[1]}-d features, embed_dim is {dim}")
        cc = ii // chunk
        for c in np.unique(cc).tolist():
            m = cc == c
            if c not in bufs:
                bufs[c] = np.zeros((size[c], dim), dtype=np.float32)
            bufs[c][ii[m] - c * chunk] = emb[m]
            remaining[c] -= int(m.sum())
        bar.update(len(ii))

    def write_finished() -> None:
        for c in [c for c, r in remaining.items() if r == 0]:
            rows = bufs.pop(c, None)
            if rows is None:
                rows = np.zeros((size[c], dim), dtype=np.float32)
            sink.write_chunk(c, c * chunk, rows, sorted(invalid.pop(c, [])))
            del remaining[c]

    try:
        for batch in loader:
            for b in batch.bad:
                c = b.index // chunk
                invalid.setdefault(c, []).append([int(b.index), b.reason])
                remaining[c] -= 1
                bad_all.append(b)
                warnings.warn(f"skipped {b.reason}", BadImageWarning, stacklevel=3)
            bar.update(len(batch.bad))
            if batch.images is not None:
                for emb, ii in encoder.submit(batch.images, batch.indices.numpy()):
                    store(emb, ii)
            write_finished()
        for emb, ii in encoder.flush():
            store(emb, ii)
        write_finished()
    finally:
        bar.close()
    return bad_all


def extract_features(backbone: ImageEncoder, ds: LabeledImages, batch_size: int = 256,
                     num_workers: int | None = None, augment: str | None = None,
                     aug_pass: int = 0, cache: bool = True, progress: bool = True,
                     chunk_size: int = DEFAULT_CHUNK, amp: bool | None = None,
                     max_pixels: int | None = None, normalize: bool = True) -> Features:
    """Embeddings of every image of `ds` (see Features), cached unless cache=False.

    augment="flip_crop" with aug_pass=k gives the k-th seeded augmented view (Tip-Adapter's
    cache model). amp=None: autocast (bf16, else fp16) on CUDA, fp32 elsewhere.
    num_workers=None: chosen by `loader_plan` (device and cores; none for a single batch).
    Unreadable files are skipped with a BadImageWarning naming each, then a count.
    normalize=False keeps the encoder's raw outputs (expert classifiers' logits); it is part
    of the cache key only when False, so existing entries keep their keys.
    """
    n = len(ds)
    device = torch.device(getattr(backbone, "device", "cpu"))
    amp_dtype = _precision(device, amp)
    mp = max_pixels_default() if max_pixels is None else int(max_pixels)
    aug = make_augment(augment, aug_pass)
    dim = int(backbone.embed_dim)
    key = feature_key(backbone.identity, backbone.weights_hash, backbone.preprocess_id(),
                      ds.paths, augment, aug_pass,
                      {"precision": str(amp_dtype or "fp32"), "max_pixels": mp,
                       **({} if normalize else {"normalize": False})})
    labels = np.asarray(ds.labels, dtype=np.int64)
    desc = f"features {ds.name}" + (f" [{augment} #{aug_pass}]" if augment else "")
    run_args = dict(batch_size=batch_size, num_workers=num_workers, augment=aug,
                    max_pixels=mp, device=device, amp_dtype=amp_dtype, progress=progress,
                    desc=desc, normalize=normalize)
    if n == 0:
        return Features(np.zeros((0, dim), np.float32), labels, np.zeros(0, bool), [], key,
                        list(ds.classnames), [], ds.name)
    if not cache:
        chunk = max(1, chunk_size)
        sink = _MemorySink(n, dim)
        fresh = _run(backbone, _PathTable(ds.paths), n, dim, chunk,
                     list(range((n + chunk - 1) // chunk)), sink, **run_args)
        arr, recs = sink.arr, sink.recs
    else:
        entry = CacheEntry(key)
        with entry.locked():
            meta, recs = entry.check(n)
            if meta is None:
                chunk = max(1, chunk_size)
                entry.create(n, dim, chunk, {
                    "identity": backbone.identity, "weights_hash": backbone.weights_hash,
                    "preprocess": backbone.preprocess_id(), "augment": augment,
                    "aug_pass": aug_pass if augment else 0, "dataset": ds.name})
            else:
                chunk = int(meta["chunk_size"])
                if int(meta["dim"]) != dim:
                    raise RuntimeError(f"cache {entry.dir} holds {meta['dim']}-d features, "
                                       f"backbone says {dim}")
            pending = [c for c in range((n + chunk - 1) // chunk) if c not in recs]
            fresh = []
            if pending:
                if recs:
                    log.info("resuming %s: %d of %d chunks left", entry.dir, len(pending),
                             (n + chunk - 1) // chunk)
                fresh = _run(backbone, _PathTable(ds.paths), n, dim, chunk, pending, entry,
                             **run_args)
                entry.close()
                entry.consolidate()
                recs = entry.records()
        arr = entry.open_features()
    valid = np.ones(n, dtype=bool)
    skipped: list[tuple[str, str]] = []
    for c in sorted(recs):
        for i, reason in recs[c]["invalid"]:
            valid[i] = False
            skipped.append((ds.paths[i], reason))
    warned = {int(b.index) for b in fresh}
    for c in sorted(recs):  # files skipped by an earlier (cached or interrupted) run
        for i, reason in recs[c]["invalid"]:
            if int(i) not in warned:
                warnings.warn(f"skipped {reason}", BadImageWarning, stacklevel=2)
    if skipped:
        k = len(skipped)
        warnings.warn(f"skipped {k} unreadable image{'s' if k != 1 else ''} of {n} "
                      f"(see warnings)", BadImageWarning, stacklevel=2)
    return Features(arr, labels, valid, list(ds.paths), key, list(ds.classnames), skipped,
                    ds.name)
