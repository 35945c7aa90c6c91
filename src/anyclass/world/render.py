"""Seeded rendering of concepts in five domains, each a different kind of shift (like
ImageNet's variants):

- "colour"      Noto Color Emoji on varied backgrounds: the "photo" domain;
- "sketch"      Symbola's monochrome glyphs as ink on paper (another artist, no colour;
                like ImageNet-Sketch);
- "rendition"   renditions of the colour glyph: silhouettes, outlines, posterised cartoons
                with ink contours, pixel art (a mix; like ImageNet-R);
- "v2"          the colour distribution re-sampled with fresh seeds and slightly different
                framing (smaller, more off-centre, more blur; like ImageNet-V2);
- "adversarial" hard colour scenes (small off-centre object, cluttered by other glyphs,
                occluded, low contrast) from which `world.adversarial` keeps the ones an
                independent world expert gets wrong (like ImageNet-A).

`render(concept, domain, seed, size)` is a pure function of its arguments: the same
(concept, domain, seed, size) gives identical pixels on every run and in every process.
Seed convention: seeds below 2**32 belong to the built-in model's pretraining renders; the
task splits use seeds at or above 2**32 (see `TASK_SEED_BASE`), so the two never share an
image.
"""
from __future__ import annotations

import colorsys
import math
import os
import random
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

DOMAINS = ("colour", "sketch", "rendition", "v2", "adversarial")
SHIFTED_DOMAINS = DOMAINS[1:]
RENDITION_STYLES = ("silhouette", "outline", "cartoon", "pixel")
TASK_SEED_BASE = 2**32          # task-split seeds live at or above this; pretraining below
_BASE = 128                      # cached glyph side (Noto's bitmaps are 136×128)
_NOTO_SIZE = 109                 # the only size Noto Color Emoji's bitmap strike renders at


class HasGlyph(Protocol):
    codepoint: int


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        from ..errors import SpecError
        raise SpecError(f"unknown domain {domain!r} (known: {', '.join(DOMAINS)})")


def _font_of(domain: str) -> str:
    """Which glyph set a domain draws from: Symbola for sketch, Noto for the rest."""
    return "sketch" if domain == "sketch" else "colour"


@lru_cache(maxsize=2)
def _font(domain: str) -> ImageFont.FreeTypeFont:
    from .concepts import noto_font_path, symbola_font_path
    if domain == "colour":
        return ImageFont.truetype(str(noto_font_path()), _NOTO_SIZE)
    return ImageFont.truetype(str(symbola_font_path()), 160)


@lru_cache(maxsize=4096)
def base_glyph(codepoint: int, domain: str) -> Image.Image:
    """The un-augmented glyph, cropped to its ink and scaled so its longer side is 128 px.

    colour: RGBA as the font draws it; sketch: RGBA black strokes whose alpha is the ink.
    Other domains draw the colour glyph.
    """
    _check_domain(domain)
    domain = _font_of(domain)
    ch = chr(codepoint)
    font = _font(domain)
    l, t, r, b = font.getbbox(ch)
    w, h = max(r, 1) + 8, max(b, 1) + 8
    if domain == "colour":
        im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        ImageDraw.Draw(im).text((4, 4), ch, font=font, embedded_color=True)
    else:
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).text((4, 4), ch, font=font, fill=255)
        im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        im.putalpha(mask)
    bbox = im.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError(f"U+{codepoint:04X} has no ink in the {domain} font")
    im = im.crop(bbox)
    s = _BASE / max(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                     Image.LANCZOS)


def _rand_colour(rng: random.Random, v: tuple[float, float], s: tuple[float, float]
                 ) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*s), rng.uniform(*v))
    return int(r * 255), int(g * 255), int(b * 255)


@lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
    return np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)


def _background(rng: random.Random, domain: str, size: int) -> np.ndarray:
    """Plain colour, linear gradient or plain + light noise; paper-like for sketches."""
    v, s = ((0.82, 1.0), (0.0, 0.12)) if domain == "sketch" else ((0.35, 1.0), (0.0, 0.6))
    weights = (0.2, 0.4, 0.4) if domain == "v2" else (0.4, 0.35, 0.25)
    kind = rng.choices(("plain", "gradient", "noise"), weights=weights)[0]
    c1 = np.array(_rand_colour(rng, v, s), np.float32)
    if kind == "gradient":
        c2 = np.array(_rand_colour(rng, v, s), np.float32)
        a = rng.uniform(0, 2 * math.pi)
        y, x = _grid(size)
        t = x * math.cos(a) + y * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        bg = c1 + (c2 - c1) * t[..., None]
    else:
        bg = np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
    if kind == "noise":
        nrng = np.random.default_rng(rng.getrandbits(64))
        bg = bg + nrng.normal(0.0, rng.uniform(4, 14), (size, size, 1 if rng.random() < .5 else 3))
    return np.clip(bg, 0, 255).astype(np.uint8)


def _jitter_colour(glyph: Image.Image, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation jitter; no hue shift (red vs green apple matters).

    All three are linear, so they fold into one affine map: out = A·(s·x + (1−s)·grey) + B.
    """
    b, c, s = rng.uniform(0.75, 1.2), rng.uniform(0.75, 1.25), rng.uniform(0.6, 1.3)
    a = np.asarray(glyph, dtype=np.float32)
    x, alpha = a[..., :3], a[..., 3]
    grey = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    mean = b * float((grey * alpha).sum()) / max(float(alpha.sum()), 1.0)
    out = np.empty_like(a)
    out[..., :3] = (c * b) * (s * x + (1.0 - s) * grey[..., None]) + (1.0 - c) * mean
    out[..., 3] = alpha
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGBA")


def _ink(glyph: Image.Image, rng: random.Random, size: int) -> Image.Image:
    """Sketch strokes: dark pencil/ink colour, pressure (alpha) and occasional thickening."""
    alpha = glyph.getchannel("A")
    if rng.random() < 0.3 and size >= 32:
        alpha = alpha.filter(ImageFilter.MaxFilter(3))
    k = rng.uniform(0.7, 1.0)
    alpha = Image.fromarray((np.asarray(alpha, np.float32) * k).astype(np.uint8), "L")
    ink = Image.new("RGBA", glyph.size, _rand_colour(rng, (0.0, 0.35), (0.0, 0.5)) + (0,))
    ink.putalpha(alpha)
    return ink


def _rendition(glyph: Image.Image, rng: random.Random) -> Image.Image:
    """One rendition style of an RGBA colour glyph (ImageNet-R's mix of art forms)."""
    style = rng.choice(RENDITION_STYLES)
    a = np.asarray(glyph, np.float32)
    alpha = a[..., 3]
    if style == "silhouette":                 # one flat colour, the outline shape only
        rgb = np.broadcast_to(np.array(_rand_colour(rng, (0.1, 0.9), (0.3, 1.0)), np.float32),
                              a[..., :3].shape)
    elif style == "outline":                  # the contour of the shape, no fill
        m = glyph.getchannel("A")
        k = 3 if max(glyph.size) < 48 else 5
        edge = np.asarray(m.filter(ImageFilter.MaxFilter(k)), np.float32) - \
            np.asarray(m.filter(ImageFilter.MinFilter(k)), np.float32)
        alpha = np.clip(edge * 1.5, 0, 255)
        rgb = np.broadcast_to(np.array(_rand_colour(rng, (0.0, 0.5), (0.0, 1.0)), np.float32),
                              a[..., :3].shape)
    elif style == "cartoon":                  # posterised colours with dark ink contours
        levels = rng.choice((2, 3))
        rgb = np.round(a[..., :3] / 255 * (levels - 1)) / (levels - 1) * 255
        m = glyph.getchannel("A")
        edge = np.asarray(m, np.float32) - np.asarray(m.filter(ImageFilter.MinFilter(3)), np.float32)
        rgb = rgb * (1 - np.clip(edge[..., None] / 255 * 1.5, 0, 1))
    else:                                     # pixel art: few big square pixels
        side = rng.randint(9, 14)
        small = glyph.resize((side, max(1, round(side * glyph.height / glyph.width))), Image.BOX)
        return small.resize(glyph.size, Image.NEAREST)
    out = np.dstack([rgb, alpha])
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGBA")


def _clutter(img: Image.Image, rng: random.Random, size: int, codepoint: int) -> None:
    """Paste 1-3 other concepts' glyphs (smaller than the object's range) around the scene."""
    others = _clutter_codepoints()
    for _ in range(rng.randint(1, 3)):
        cp = others[rng.randrange(len(others))]
        if cp == codepoint:
            continue
        g = base_glyph(cp, "colour")
        k = size * rng.uniform(0.2, 0.35) / max(g.size)
        g = g.resize((max(1, round(g.width * k)), max(1, round(g.height * k))), Image.BILINEAR)
        img.paste(g, (rng.randrange(-g.width // 3, size - g.width // 2),
                      rng.randrange(-g.height // 3, size - g.height // 2)), g)


@lru_cache(maxsize=1)
def _clutter_codepoints() -> tuple[int, ...]:
    from .concepts import all_concepts
    return tuple(c.codepoint for c in all_concepts())


#: per-domain framing: (object side as a fraction of the image, rotation degrees, position
#: slack as a fraction, occlusion probability, blur probability)
_FRAMING = {
    "colour": ((0.55, 0.9), 25, 0.08, 0.2, 0.3),
    "sketch": ((0.55, 0.9), 25, 0.08, 0.2, 0.3),
    "rendition": ((0.55, 0.9), 25, 0.08, 0.1, 0.2),
    "v2": ((0.45, 0.85), 30, 0.12, 0.25, 0.45),
    "adversarial": ((0.4, 0.65), 40, 0.15, 0.6, 0.4),
}


def render(concept: HasGlyph, domain: str, seed: int, size: int, with_mask: bool = False
           ) -> Image.Image | tuple[Image.Image, Image.Image]:
    """One augmented RGB image (size×size) of `concept` in `domain`, a pure function of seed.

    Augmentations: scale, rotation, position (slight crop allowed), background, colour jitter
    (colour) or ink colour/pressure/thickness (sketch), a small occluding patch, blur; the
    domain decides the style and the ranges (`_FRAMING`).
    No flips: they would change meaning (left vs right arrow, pointing hands).
    `with_mask` also returns the object's alpha on the canvas ("L"), which pretraining's
    shape augmentations (silhouettes of colour renders) need.
    """
    _check_domain(domain)
    scale, rot, slack_frac, p_occ, p_blur = _FRAMING[domain]
    rng = random.Random(f"{domain}:{concept.codepoint}:{seed}")
    img = Image.fromarray(_background(rng, domain, size), "RGB")
    if domain == "adversarial":
        _clutter(img, rng, size, concept.codepoint)
    glyph = base_glyph(concept.codepoint, domain)
    side = size * rng.uniform(*scale)
    k = side / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * k)), max(1, round(glyph.height * k))),
                         Image.BILINEAR, reducing_gap=2.0)
    if domain == "sketch":
        glyph = _ink(glyph, rng, size)
    elif domain == "rendition":
        glyph = _rendition(glyph, rng)
    else:
        glyph = _jitter_colour(glyph, rng)
    glyph = glyph.rotate(rng.uniform(-rot, rot), resample=Image.BICUBIC, expand=True)
    slack = slack_frac * size
    x = rng.uniform(-slack, max(size - glyph.width + slack, -slack))
    y = rng.uniform(-slack, max(size - glyph.height + slack, -slack))
    img.paste(glyph, (round(x), round(y)), glyph)
    mask = None
    if with_mask:
        mask = Image.new("L", (size, size), 0)
        mask.paste(glyph.getchannel("A"), (round(x), round(y)))
    if rng.random() < p_occ:                                            # occlusion
        w, h = (round(size * rng.uniform(0.12, 0.25)) for _ in range(2))
        ox, oy = rng.randrange(0, size - w + 1), rng.randrange(0, size - h + 1)
        fill = _rand_colour(rng, (0.2, 1.0), (0.0, 0.8))
        ImageDraw.Draw(img).rectangle((ox, oy, ox + w - 1, oy + h - 1), fill=fill)
    if rng.random() < p_blur:                                           # blur
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.1) * size / 64))
    if domain == "adversarial" and rng.random() < 0.5:                  # low contrast / cast
        a = np.asarray(img, np.float32)
        cast = np.array(_rand_colour(rng, (0.3, 1.0), (0.3, 1.0)), np.float32)
        w = rng.uniform(0.3, 0.55)
        img = Image.fromarray(np.clip(a * (1 - w) + cast * w, 0, 255).astype(np.uint8), "RGB")
    return (img, mask) if with_mask else img


# ---------------------------------------------------------------------------------------------
# Bulk rendering over processes (2 cores here). Items are grouped by concept so each worker
# rasterises a glyph once (the lru_cache lives per process).

def _workers(n_items: int, workers: int | None) -> int:
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    return 1 if n_items < 64 else max(1, workers)


def _chunks(n: int, order: Sequence[int], n_chunks: int) -> list[list[int]]:
    size = max(1, math.ceil(n / n_chunks))
    return [list(order[i:i + size]) for i in range(0, n, size)]


def _render_chunk(args: tuple[list[tuple[int, int, int]], str, int, bool]
                  ) -> tuple[list[int], bytes]:
    items, domain, size, with_mask = args
    out = np.empty((len(items), size, size, 4 if with_mask else 3), np.uint8)
    for j, (_, cp, seed) in enumerate(items):
        if with_mask:
            img, mask = render(_CP(cp), domain, seed, size, with_mask=True)
            out[j, ..., :3], out[j, ..., 3] = np.asarray(img), np.asarray(mask)
        else:
            out[j] = np.asarray(render(_CP(cp), domain, seed, size))
    return [i for i, _, _ in items], out.tobytes()


def _save_chunk(args: tuple[list[tuple[int, int, str]], str, int]) -> int:
    items, domain, size = args
    for cp, seed, path in items:
        tmp = f"{path}.tmp{os.getpid()}"
        render(_CP(cp), domain, seed, size).save(tmp, format="PNG", compress_level=2)
        os.replace(tmp, path)  # a file that exists is always complete (resumable builds)
    return len(items)


class _CP:
    """A picklable stand-in for a concept: rendering needs only the code point."""

    __slots__ = ("codepoint",)

    def __init__(self, codepoint: int) -> None:
        self.codepoint = codepoint


def _pool(n: int):
    import multiprocessing as mp
    # fork: the workers only use PIL/numpy, and spawn would re-import the caller's __main__
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ctx.Pool(n)


def _run(fn: Callable, jobs: list, workers: int, progress: bool, desc: str, total: int,
         weight: Callable[[object], int]):
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        if workers <= 1:
            for job in jobs:
                res = fn(job)
                bar.update(weight(res))
                yield res
        else:
            with _pool(workers) as pool:
                for res in pool.imap_unordered(fn, jobs):
                    bar.update(weight(res))
                    yield res
    finally:
        bar.close()


def render_batch(items: Sequence[tuple[HasGlyph, int]], domain: str, size: int,
                 workers: int | None = None, progress: bool = False,
                 with_mask: bool = False) -> np.ndarray:
    """Render (concept, seed) pairs to a uint8 array [N, size, size, 3], in item order
    (`with_mask`: [N, size, size, 4], the object's alpha as the 4th channel)."""
    _check_domain(domain)
    n = len(items)
    c = 4 if with_mask else 3
    out = np.empty((n, size, size, c), np.uint8)
    if n == 0:
        return out
    w = _workers(n, workers)
    order = sorted(range(n), key=lambda i: (items[i][0].codepoint, i))
    chunks = _chunks(n, order, w * 8)
    jobs = [([(i, items[i][0].codepoint, int(items[i][1])) for i in ch], domain, size, with_mask)
            for ch in chunks]
    for idx, buf in _run(_render_chunk, jobs, w, progress, f"render {domain}", n,
                         lambda r: len(r[0])):
        out[idx] = np.frombuffer(buf, np.uint8).reshape(len(idx), size, size, c)
    return out


def render_to_files(items: Sequence[tuple[HasGlyph, int, Path]], domain: str, size: int,
                    workers: int | None = None, progress: bool = False,
                    desc: str | None = None) -> int:
    """Render (concept, seed, path) triples straight to PNG files (parent dirs must exist)."""
    _check_domain(domain)
    n = len(items)
    if n == 0:
        return 0
    w = _workers(n, workers)
    order = sorted(range(n), key=lambda i: (items[i][0].codepoint, i))
    chunks = _chunks(n, order, w * 8)
    jobs = [([(items[i][0].codepoint, int(items[i][1]), str(items[i][2])) for i in c],
             domain, size) for c in chunks]
    return sum(_run(_save_chunk, jobs, w, progress, desc or f"render {domain}", n,
                    lambda r: r))


def render_many(items: Sequence[tuple[HasGlyph, int]], domain: str, size: int,
                workers: int | None = None) -> list[Image.Image]:
    """Like `render_batch`, as PIL images."""
    return [Image.fromarray(a) for a in render_batch(items, domain, size, workers)]
