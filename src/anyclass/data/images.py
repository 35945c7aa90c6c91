"""Robust image loading: every file a user points at either becomes an RGB image or is
refused with a one-line reason, so a bad file in a folder of 10,000 never stops a run.

Mode handling is explicit because Pillow's own conversions are lossy in surprising ways
(`I;16 -> L` clips instead of scaling; `RGBA -> RGB` drops alpha onto black).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import AnyclassError, ImageTooLargeError

#: default decompression-bomb guard; override per call or with $ANYCLASS_MAX_PIXELS
DEFAULT_MAX_PIXELS = 64_000_000


class BadImageError(AnyclassError):
    """A file that cannot be decoded as an image (corrupt, empty, not an image)."""


class BadImageWarning(UserWarning):
    """A file skipped during a run; the run goes on."""


def max_pixels_default() -> int:
    """The pixel limit in force: $ANYCLASS_MAX_PIXELS, else DEFAULT_MAX_PIXELS."""
    env = os.environ.get("ANYCLASS_MAX_PIXELS")
    return int(env) if env else DEFAULT_MAX_PIXELS


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _white_composite(im: Image.Image) -> Image.Image:
    """Alpha-composite on white: transparent backgrounds of icons/PNGs become white, the
    convention of photo viewers (black would change what the model sees)."""
    rgba = im.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _high_bit_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float greyscale -> 8-bit RGB by scaling, not clipping.

    I;16* and I are read as 0..65535 (16-bit PNG/TIFF are loaded as one or the other);
    F is read as 0..1 when its maximum is <= 1, else 0..255.
    """
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float32)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
    else:
        a = a.astype(np.float32) / 257.0
    a = np.nan_to_num(a, nan=0.0)
    u8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(u8, "L").convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (8-bit), alpha/transparency composited on white."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I") or mode == "F":
        return _high_bit_to_rgb(im)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        return _white_composite(im)
    return im.convert("RGB")  # L, 1, P, CMYK (Adobe-inverted handled by the decoder), YCbCr...


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Decode `path` into an RGB PIL image.

    Raises ImageTooLargeError (size read from the header, before decoding) when width*height
    exceeds `max_pixels`, and BadImageError with a one-line reason for missing, empty,
    corrupt or non-image files.
    """
    path = os.fspath(path)
    limit = max_pixels_default() if max_pixels is None else int(max_pixels)
    try:
        st = os.stat(path)
    except OSError as e:
        raise BadImageError(f"{path}: cannot read ({_one_line(e)})") from None
    if not os.path.isfile(path):
        raise BadImageError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise BadImageError(f"{path}: empty file (0 bytes)")
    try:
        im = Image.open(path)  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{path}: image too large ({_one_line(e)})") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image (unrecognised format, "
                            f"{st.st_size} bytes)") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        raise BadImageError(f"{path}: corrupt image ({_one_line(e)})") from None
    with im:
        w, h = im.size
        if w * h > limit:
            raise ImageTooLargeError(
                f"{path}: {w}x{h} = {w * h:,} pixels exceeds the limit of {limit:,} "
                f"(raise it with max_pixels or $ANYCLASS_MAX_PIXELS)")
        if w == 0 or h == 0:
            raise BadImageError(f"{path}: image has zero size ({w}x{h})")
        try:
            im.seek(0)  # first frame of GIF/TIFF stacks
            im.load()
            out = to_rgb(im)
            out = im.copy() if out is im else out  # `im` dies with the with-block
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"{path}: image too large ({_one_line(e)})") from None
        except Exception as e:  # noqa: BLE001
            raise BadImageError(f"{path}: corrupt image ({_one_line(e)})") from None
    return out


class BadItem(NamedTuple):
    """What ImageFileDataset yields for a file it could not load. (Not a bare None: warnings
    raised inside DataLoader worker processes never reach the user, so the reason travels
    with the batch and the main process warns.)"""
    index: int
    path: str
    reason: str


class ImageFileDataset(torch.utils.data.Dataset):
    """Decodes files for a DataLoader: item i -> (transform(image), i), or BadItem.

    `augment(img, index)` runs on the PIL image before `transform` (see augment.flip_crop).
    """

    def __init__(self, paths: Sequence[str], transform: Callable[[Image.Image], torch.Tensor],
                 max_pixels: int | None = None,
                 augment: Callable[[Image.Image, int], Image.Image] | None = None) -> None:
        self.paths = paths
        self.transform = transform
        self.max_pixels = max_pixels_default() if max_pixels is None else max_pixels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | BadItem:
        p = self.paths[i]
        try:
            img = load_image(p, self.max_pixels)
        except AnyclassError as e:  # BadImageError, ImageTooLargeError
            return BadItem(i, p, str(e))
        if self.augment is not None:
            img = self.augment(img, i)
        return self.transform(img), i


class Batch(NamedTuple):
    images: torch.Tensor | None  # [B,3,H,W], None when every file in the batch was bad
    indices: torch.Tensor        # int64 [B]
    bad: list[BadItem]


def collate_skip_bad(items: list) -> Batch:
    """Collate that drops unreadable files (BadItem or None) and keeps their reasons."""
    good = [x for x in items if x is not None and not isinstance(x, BadItem)]
    bad = [x for x in items if isinstance(x, BadItem)]
    if not good:
        return Batch(None, torch.empty(0, dtype=torch.long), bad)
    return Batch(torch.stack([g[0] for g in good]),
                 torch.tensor([g[1] for g in good], dtype=torch.long), bad)


def _strip_path(path: str, reason: str) -> str:
    return reason[len(path) + 2:] if reason.startswith(path + ": ") else reason


def warn_skipped(bad: Sequence[BadItem], total: int | None = None, limit: int = 50,
                 stacklevel: int = 2) -> None:
    """One warning per skipped file (first `limit`), then the count."""
    for b in list(bad)[:limit]:
        warnings.warn(f"skipped {b.path}: {_strip_path(b.path, b.reason)}", BadImageWarning,
                      stacklevel=stacklevel + 1)
    if len(bad) > limit:
        warnings.warn(f"... and {len(bad) - limit} more unreadable images", BadImageWarning,
                      stacklevel=stacklevel + 1)
    if bad:
        of = f" of {total}" if total is not None else ""
        n = len(bad)
        warnings.warn(f"skipped {n} unreadable image{'s' if n != 1 else ''}{of} "
                      f"(see warnings)", BadImageWarning, stacklevel=stacklevel + 1)


# ---------------------------------------------------------------------------------------
# Augmentation hook (Tip-Adapter's cache-model augmentation)

def _crop_params(w: int, h: int, rng: np.random.Generator,
                 scale: tuple[float, float], ratio: tuple[float, float]
                 ) -> tuple[int, int, int, int]:
    """Random-resized-crop box (left, top, width, height): area fraction in `scale`,
    log-uniform aspect in `ratio`, 10 tries, then the largest centred box in range."""
    area = w * h
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = float(np.exp(rng.uniform(lo, hi)))
        cw = int(round(np.sqrt(target * ar)))
        ch = int(round(np.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


class FlipCrop:
    """RandomResizedCrop(scale 0.5-1, ratio 3/4-4/3) to a square + horizontal flip (p=0.5),
    seeded by (aug_pass, index) so pass k of an augmented cache is reproducible and
    independent of worker scheduling. Picklable (for spawn-started workers)."""

    def __init__(self, aug_pass: int, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.aug_pass = int(aug_pass)
        self.scale = scale
        self.ratio = ratio

    def __call__(self, img: Image.Image, index: int) -> Image.Image:
        rng = np.random.default_rng([0xA11C1A55, self.aug_pass, int(index)])
        w, h = img.size
        x, y, cw, ch = _crop_params(w, h, rng, self.scale, self.ratio)
        side = min(w, h)
        out = img.resize((side, side), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out


AUGMENTATIONS: dict[str, type] = {"flip_crop": FlipCrop}


def make_augment(name: str | None, aug_pass: int
                 ) -> Callable[[Image.Image, int], Image.Image] | None:
    """Name -> seeded augmentation callable (None -> no augmentation)."""
    if name is None:
        return None
    if name not in AUGMENTATIONS:
        from ..errors import SpecError
        raise SpecError(f"unknown augmentation {name!r} (known: {', '.join(AUGMENTATIONS)})")
    return AUGMENTATIONS[name](aug_pass)
