"""Test-time prompt tuning (TPT and its successors): the engine the three methods share.

Per test image x, episodically (θ_x reset to θ_0 for every image):

    views   x_0 = x, x_1 … x_{V-1} = random resized crops + flips of x (AugMix on top, optional)
    keep    S = the ⌊ρ·V⌋ views of lowest prediction entropy under θ_0
    tune    `steps` AdamW steps on  L(θ_x) = H(p̄_S) + method terms,  p̄_S = mean_{v∈S} softmax
    predict softmax(s · f(x_0; θ_x) · t(θ_x)ᵀ)

Batched: B images tune at once, each with its own copy of θ along a leading batch dimension.
AdamW is elementwise, so one optimiser over [B, …] tensors *is* B independent optimisers, and
the gradient of Σ_b L_b reaches each copy from its own image only. Each image's views come
from a generator seeded by (seed, the image's pixels), so its result does not depend on the
batch size, the order or its neighbours (tested against `tune_reference`, the one-image loop
of the reference code). Where θ cannot change the image features (text-only tuning) the V view
features are encoded once; where it can, the views outside S are encoded once without
gradients (they only choose S) and the steps run on S ∪ {x_0}. At the first step every image's
θ is θ_0, so the K class texts are encoded once for the batch and each image's gradient is
pulled back through that one graph (`shared_vjp`): one text forward instead of B.

A non-finite loss or prediction for one image falls back to that image's untuned prediction
and is counted; the batch goes on.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import AnyclassError
from .base import FeatureMethod, params_with, set_defaults
from .prompt_parts import context_template, image_features, init_context, texts_for

#: at most this many class texts per text-encoder call (B images × K classes are chunked);
#: a CPU gains nothing from bigger batches and pays for their activations in cache misses
MAX_TEXTS = 4096
MAX_TEXTS_CPU = 1024
#: TPT's hand-written starting prompt: 4 learned words initialised from it
HANDWRITTEN = "a photo of a"


class TTAError(AnyclassError, ValueError):
    """Bad test-time-tuning set-up (views, starting prompts, statistics)."""


# ------------------------------------------------------------------------ starting point θ_0

@dataclass
class PromptInit:
    """θ_0: the hand-written prompt or a learned CoOp/MaPLe prompt file, as plain tensors.

    ctx [M, Wt] (text context P_0), deep [J-1 × [M, Wt]] (MaPLe's deeper text prompts),
    couple [J × (W [Wv, Wt], b [Wv])] (MaPLe's text→vision maps F_j); `key` names θ_0 for the
    statistics files (the prompt file's sha256, or the hand-written phrase)."""
    template: str
    ctx: torch.Tensor
    deep: list[torch.Tensor] = field(default_factory=list)
    couple: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    key: str = f"handwritten:{HANDWRITTEN}"
    source: str | None = None              # the prompt file

    @property
    def multimodal(self) -> bool:
        return bool(self.couple)


def prompt_init(backbone, init: str | Path | None = None) -> PromptInit:
    """θ_0 from `init`: None → TPT's "a photo of a" (4 learned words); a CoOp or MaPLe
    prompt file learned on this backbone (any class list: the context is class-agnostic)."""
    if init is None:
        return PromptInit(context_template(4, HANDWRITTEN), init_context(backbone, 4, HANDWRITTEN))
    from ..hashing import file_sha256
    from .prompted import load_prompts
    m = load_prompts(init, backbone, allow_new_classes=True)
    name = m.registry_name()
    key = f"file:{file_sha256(init)}"
    mod = m.module_
    sd = {k: v.detach().float().cpu() for k, v in mod.state_dict().items()}
    if name == "coop":
        return PromptInit(context_template(m.n_ctx, m.ctx_init), sd["ctx"], key=key, source=str(init))
    if name == "maple":
        deep = [sd[f"deep.{j}"] for j in range(len(mod.deep))]
        couple = [(sd[f"couple.{j}.weight"], sd[f"couple.{j}.bias"]) for j in range(len(mod.couple))]
        return PromptInit(context_template(m.n_ctx, m.ctx_init), sd["ctx"], deep, couple, key,
                          str(init))
    raise TTAError(f"{init}: test-time tuning starts from the hand-written prompt or a CoOp/MaPLe "
                   f"prompt file, not from a {name!r} file")


def batched_params(init: PromptInit, b: int, device, text: bool, vision: bool
                   ) -> dict[str, torch.Tensor]:
    """B copies of θ_0 (leaf tensors [B, …]); the text and/or vision parts require grad."""
    def copies(t: torch.Tensor, grad: bool) -> torch.Tensor:
        return t.to(device).unsqueeze(0).repeat(b, *[1] * t.dim()).requires_grad_(grad)
    p = {"ctx": copies(init.ctx, text)}
    p.update({f"deep{j}": copies(d, text) for j, d in enumerate(init.deep)})
    for j, (w, bias) in enumerate(init.couple):
        p[f"cw{j}"], p[f"cb{j}"] = copies(w, vision), copies(bias, vision)
    return p


def text_params(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parts of θ the text tower reads: the context and MaPLe's deeper text prompts."""
    return {k: v for k, v in p.items() if k == "ctx" or k.startswith("deep")}


def text_features(backbone, init: PromptInit, p: dict[str, torch.Tensor],
                  classnames: Sequence[str]) -> torch.Tensor:
    """t_k(θ_b) for every image b and class k: [B, K, D], B·K texts in chunks."""
    texts = texts_for(init.template, classnames)
    k, b = len(texts), p["ctx"].shape[0]
    deep = [p[f"deep{j}"] for j in range(len(init.deep))]
    step = max(1, MAX_TEXTS // k)
    out = []
    for s in range(0, b, step):
        n = min(step, b - s)
        ctx = p["ctx"][s:s + n].repeat_interleave(k, 0)                       # [n·K, M, Wt]
        dc = [d[s:s + n].repeat_interleave(k, 0) for d in deep] or None
        out.append(backbone.encode_text_with_context(texts * n, ctx, deep_ctx=dc).float()
                   .view(n, k, -1))
    return torch.cat(out)


def vision_prompts(init: PromptInit, p: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
    """MaPLe's coupled visual prompts P̃_j = F_j(P_j) per image: [B, M, Wv] per layer."""
    if not init.multimodal:
        return None
    src = [p["ctx"], *[p[f"deep{j}"] for j in range(len(init.deep))]]
    return [torch.baddbmm(p[f"cb{j}"].unsqueeze(1), src[j], p[f"cw{j}"].transpose(1, 2))
            for j in range(len(init.couple))]


def shared_vjp(t0: torch.Tensor, leaves: dict[str, torch.Tensor], cot: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """Per-image gradients ∂L_b/∂θ = J(θ_0)ᵀ · ∂L_b/∂t_b from one shared forward t0 = t(θ_0)
    [1, K, D] and B cotangents `cot` [B, K, D]: the B images' first step costs one text
    forward instead of B (the Jacobian is the same for all of them). Exact, whichever way the
    backward runs: batched (vmap) where the encoder's ops allow it, else one pass per image."""
    names, xs = list(leaves), list(leaves.values())
    cot = cot.to(t0.dtype)[:, None]                                       # [B, 1, K, D]
    try:
        gs = torch.autograd.grad(t0, xs, grad_outputs=cot, retain_graph=True, is_grads_batched=True)
        gs = [g[:, 0] for g in gs]
    except RuntimeError:                       # an op without a batching rule
        per = [torch.autograd.grad(t0, xs, grad_outputs=c, retain_graph=True) for c in cot]
        gs = [torch.cat([g[i] for g in per]) for i in range(len(xs))]
    return dict(zip(names, gs))


# ------------------------------------------------------------------------------------ views

def image_seeds(x: torch.Tensor, seed: int) -> list[int]:
    """One generator seed per image from (seed, its preprocessed pixels): the same image gets
    the same views wherever it sits in a batch."""
    out = []
    for img in x.detach().cpu().float().contiguous():
        h = hashlib.blake2b(img.numpy().tobytes(), digest_size=8, key=str(seed).encode())
        out.append(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))
    return out


def make_views(x: torch.Tensor, seeds: Sequence[int], n_views: int,
               scale: Sequence[float] = (0.08, 1.0), augmix: bool = False,
               norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, V, 3, H, W]: each image itself, then V−1 random resized crops + flips of it drawn
    from its own generator (one batched roi_align), AugMix on top if asked."""
    from .training import crop_boxes, resized_crops
    b, _, h, w = x.shape
    if n_views == 1:
        return x[:, None]
    draws = [crop_boxes(n_views - 1, h, w, torch.Generator().manual_seed(s), scale) for s in seeds]
    rows = torch.arange(b).repeat_interleave(n_views - 1)
    crops = resized_crops(x, rows, torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws]))
    crops = crops.view(b, n_views - 1, *x.shape[1:])
    if augmix:
        crops = _augmix(crops, seeds, norm)
    return torch.cat([x[:, None], crops], 1)


def _augmix(crops: torch.Tensor, seeds: Sequence[int], norm) -> torch.Tensor:
    """AugMix (torchvision's, severity 1 as TPT) on every crop, seeded per image and view; the
    ops work on [0, 1] pixels, so the backbone's normalisation is undone and redone."""
    from torchvision.transforms import v2
    if norm is None:
        raise TTAError("AugMix needs the backbone's normalisation mean/std (not found on its preprocess)")
    mean, std = (t.to(crops.device).view(1, 3, 1, 1) for t in norm)
    aug = v2.AugMix(severity=1)
    out = torch.empty_like(crops)
    for i, s in enumerate(seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            px = (crops[i] * std + mean).clamp(0, 1)
            out[i] = (torch.stack([aug(v) for v in px]) - mean) / std
    return out


def normalisation(backbone) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) of the backbone's preprocessing, where it can be found."""
    pre = getattr(backbone, "_preprocess", None) or getattr(backbone, "preprocess", None)
    if hasattr(pre, "mean") and hasattr(pre, "std"):
        return torch.as_tensor(pre.mean).flatten().float(), torch.as_tensor(pre.std).flatten().float()
    for t in getattr(pre, "transforms", []):
        if type(t).__name__ == "Normalize":
            return torch.as_tensor(t.mean).float(), torch.as_tensor(t.std).float()
    return None


# ------------------------------------------------------------------------ the loss pieces

def confident(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices [B, n] of the ⌊ρ·V⌋ lowest-entropy views of logits [B, V, K] (TPT's filter)."""
    n = int(logits.shape[1] * ratio)
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    return ent.argsort(dim=1, stable=True)[:, :n]


def avg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(p̄) of the mean softmax over views: logits [B, n, K] → [B] (TPT's loss)."""
    logp = logits.log_softmax(-1).logsumexp(1) - math.log(logits.shape[1])
    logp = logp.clamp_min(torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(-1)


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b]] for x [B, V, …] and idx [B, n]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx.to(x.device)]


@dataclass
class Step:
    """What one tuning step knows about the views S ∪ {x_0} under the current θ."""
    logits: torch.Tensor                   # [B, n, K] confident views S
    logits0: torch.Tensor                  # [B, K] the image itself
    feats: torch.Tensor                    # [B, n, D] normalised features of S
    layers: list[torch.Tensor] | None      # [B, n, T, W] inputs of the aligned blocks, over S


# ------------------------------------------------------------------------ the method contract

#: hyperparameters every test-time method takes (TPT's values; a method overrides `defaults`).
#: augmix None: the method's protocol decides (`augments_fine_grained`; on the world,
#: eval/tta.world_defaults), elsewhere off unless asked
TTA_COMMON = dict(steps=1, lr=5e-3, weight_decay=0.01, n_views=64, ratio=0.1,
                  crop_scale=(0.08, 1.0), augmix=None, seed=1, batch_size=None, amp=None)


class TestTimeMethod(FeatureMethod):
    """Test-time tuning: hyperparameters in `__init__`, nothing learned before test time.

    A method says which parts of θ it tunes (`tunes_vision`), how many vision blocks' inputs
    its loss reads (`align_layers`) and its extra loss terms (`extra_loss`); `prepare` loads
    θ_0 (and statistics), `predict` tunes and scores a batch of preprocessed images.
    `init`: None (the hand-written prompt) or a CoOp/MaPLe prompt file."""
    tunes_at_test = True
    transfers = True
    tunes_vision = False
    #: AugMix on the views of fine-grained sets (TPT's code) when augmix is left to the
    #: protocol; PromptAlign's code never augments (crops and flips only)
    augments_fine_grained = False
    #: the paper's values of TTA_COMMON keys, where they differ from TPT's
    defaults: dict = {}

    def __init__(self, init: str | None = None, **common) -> None:
        self.init = init
        self._init_common(common)

    def _init_common(self, given: dict) -> None:
        set_defaults(self, given, {**TTA_COMMON, **type(self).defaults})

    def get_params(self) -> dict:
        return params_with(self, TTA_COMMON)

    # ------------------------------------------------------------------ what a method adds
    @property
    def align_layers(self) -> int:
        return 0

    def extra_loss(self, step: Step) -> dict[str, torch.Tensor]:
        """Terms added to H(p̄) (each [B], already weighted), by name."""
        return {}

    def check_setup(self, backbone, classnames: Sequence[str]) -> None:
        """Refuse a set-up that cannot work before any image is tuned."""
        if int(self.n_views * self.ratio) < 1:
            raise TTAError(f"n_views={self.n_views} with confidence ratio {self.ratio} keeps no "
                           f"view (needs n_views × ratio ≥ 1, e.g. n_views ≥ {math.ceil(1 / self.ratio)})")
        if self.steps < 0:
            raise TTAError(f"steps must be ≥ 0, got {self.steps}")
        if self.tunes_vision and not self.init_.multimodal:
            raise TTAError(f"{type(self).__name__} tunes MaPLe's multimodal prompts: start it from a "
                           f"MaPLe prompt file (init=...), not from {self.init_.key.split(':')[0]} prompts")

    # ------------------------------------------------------------------ the estimator
    def prepare(self, backbone, classnames: Sequence[str]) -> "TestTimeMethod":
        """Load θ_0 (and whatever the method reads offline) for `classnames` on `backbone`."""
        self.init_ = prompt_init(backbone, self.init)
        self.classnames_ = list(classnames)
        self.check_setup(backbone, classnames)
        return self

    def fit(self, *args, **kwargs) -> "TestTimeMethod":
        raise AnyclassError(f"{type(self).__name__} learns nothing before test time: call "
                            f"prepare(backbone, classnames), then predict(backbone, images)")

    def images_per_batch(self, n_classes: int, device="cpu") -> int:
        """Images tuned at once: bounded by the B·K texts one step encodes."""
        cap = MAX_TEXTS if torch.device(device).type == "cuda" else MAX_TEXTS_CPU
        return self.batch_size or max(1, cap // max(1, n_classes))

    def predict(self, backbone, x: torch.Tensor) -> "TuneResult":
        """Tune and score preprocessed images x [N, 3, H, W] (any N: chunked)."""
        b = self.images_per_batch(len(self.classnames_), backbone.device)
        return TuneResult.cat([self._tune(backbone, x[s:s + b]) for s in range(0, len(x), b)])

    # ------------------------------------------------------------------ one batch
    def _encode(self, backbone, views: torch.Tensor, vp: list[torch.Tensor] | None
                ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Features [N, D] (and aligned blocks' inputs) of views [N, 3, H, W] under prompts vp."""
        if self.align_layers:
            f, lay = backbone.encode_images_with_layer_inputs(views, vp, self.align_layers)
            return f.float(), [t.float() for t in lay]
        return image_features(backbone, views, vp), None

    def _views(self, backbone, x: torch.Tensor) -> torch.Tensor:
        seeds = image_seeds(x, self.seed)
        norm = normalisation(backbone) if self.augmix else None
        return make_views(x, seeds, self.n_views, self.crop_scale, self.augmix, norm)

    def _tune(self, backbone, x: torch.Tensor) -> "TuneResult":
        from .training import _autocast
        init, names, dev = self.init_, self.classnames_, backbone.device
        x = x.to(dev)
        b, v = x.shape[0], self.n_views if self.steps else 1    # no step: no view needed
        views = self._views(backbone, x) if self.steps else x[:, None]      # [B, V, 3, H, W]
        flat = views.flatten(0, 1)
        p = batched_params(init, b, dev, text=True, vision=self.tunes_vision)
        tuned = [t for t in p.values() if t.requires_grad]
        opt = torch.optim.AdamW(tuned, lr=self.lr, weight_decay=self.weight_decay)
        s, bias = backbone.logit_scale, backbone.logit_bias
        bad = torch.zeros(b, dtype=torch.bool, device=dev)
        with torch.no_grad(), _autocast(dev, self.amp):                     # θ_0, all views
            vp0 = vision_prompts(init, p)
            vp0 = None if vp0 is None else [t.repeat_interleave(v, 0) for t in vp0]
            f_all = image_features(backbone, flat, vp0).view(b, v, -1)
        sel = None
        untuned = None
        for step in range(max(self.steps, 1)):
            with _autocast(dev, self.amp):
                if step == 0:                   # θ_0 is every image's: its K texts once
                    shared = {k: v[:1].detach().requires_grad_(bool(self.steps))
                              for k, v in text_params(p).items()}
                    t0 = text_features(backbone, init, shared, names)      # [1, K, D]
                    t = t0.detach().expand(b, -1, -1)
                    if self.steps:              # each image's ∂L/∂t, pulled back through t0 below
                        t = t.clone().requires_grad_()
                    with torch.no_grad():
                        logits_all = s * torch.einsum("bvd,bkd->bvk", f_all, t) + bias
                        sel = confident(logits_all, self.ratio) if self.steps else None
                        untuned = logits_all[:, 0].float().clone()
                else:
                    t = text_features(backbone, init, p, names)             # [B, K, D]
                if self.steps == 0:
                    break
                if self.tunes_vision:                                       # re-encode S ∪ {x_0}
                    idx = torch.cat([torch.zeros_like(sel[:, :1]), sel], 1)
                    vp = [t_.repeat_interleave(idx.shape[1], 0) for t_ in vision_prompts(init, p)]
                    f, lay = self._encode(backbone, take(views, idx).flatten(0, 1), vp)
                    f = f.view(b, idx.shape[1], -1)
                    lay = None if lay is None else [l.view(b, idx.shape[1], *l.shape[1:])[:, 1:] for l in lay]
                    f0, fs = f[:, 0], f[:, 1:]
                else:
                    f0, fs, lay = f_all[:, 0], take(f_all, sel), None
                logits = s * torch.einsum("bnd,bkd->bnk", fs, t) + bias
                logits0 = s * torch.einsum("bd,bkd->bk", f0, t) + bias
                st = Step(logits.float(), logits0.float(), fs.float(), lay)
                terms = {"entropy": avg_entropy(st.logits), **self.extra_loss(st)}
                loss = sum(terms.values())
            bad |= ~torch.isfinite(loss)
            opt.zero_grad(set_to_none=False)
            torch.where(bad, torch.zeros_like(loss), loss).sum().backward()
            if step == 0:
                t.grad[bad] = 0
                for k, g in shared_vjp(t0, shared, t.grad).items():
                    p[k].grad = g if p[k].grad is None else p[k].grad + g
                t0 = shared = None                      # free the shared graph
            for t_ in tuned:                                    # a bad image moves nothing
                t_.grad[bad] = 0
            opt.step()
        with torch.no_grad(), _autocast(dev, self.amp):                     # predict on x_0
            if self.steps == 0:
                logits = untuned
            else:
                t = text_features(backbone, init, p, names)
                if self.tunes_vision:
                    f0 = image_features(backbone, x, vision_prompts(init, p))
                else:
                    f0 = f_all[:, 0]
                logits = (s * torch.einsum("bd,bkd->bk", f0.float(), t.float()) + bias).float()
        bad |= ~torch.isfinite(logits).all(1)
        logits = torch.where(bad[:, None], untuned, logits)
        return TuneResult(logits.cpu(), untuned.cpu(), bad.cpu())

    # ------------------------------------------------------------------ the reference loop
    def tune_reference(self, backbone, x: torch.Tensor) -> "TuneResult":
        """The reference code's order of operations, one image at a time: re-initialise θ
        and the optimiser, encode all V views at every step (image features included), filter,
        step, then encode the image again to predict. For the speed comparison and to check
        the batched path (same views: the same per-image seeds)."""
        trim = getattr(backbone, "trim_text", None)
        if trim is not None:              # the reference encodes CLIP's whole 77-token context
            backbone.trim_text = False
        try:
            return self._reference(backbone, x)
        finally:
            if trim is not None:
                backbone.trim_text = trim

    def _reference(self, backbone, x: torch.Tensor) -> "TuneResult":
        out = []
        init, names, dev = self.init_, self.classnames_, backbone.device
        s, bias = backbone.logit_scale, backbone.logit_bias
        for i in range(x.shape[0]):                    # the reference: one image per batch
            xi = x[i:i + 1].to(dev)
            views = self._views(backbone, xi).flatten(0, 1)                 # [V, 3, H, W]
            p = batched_params(init, 1, dev, text=True, vision=self.tunes_vision)
            tuned = [t for t in p.values() if t.requires_grad]
            opt = torch.optim.AdamW(tuned, lr=self.lr, weight_decay=self.weight_decay)
            sel, untuned, bad = None, None, False
            frozen_vp = vision_prompts(init, p)        # text-only tuning: F_j(P_j) stay at θ_0
            frozen_vp = None if frozen_vp is None else [t.detach() for t in frozen_vp]
            for step in range(self.steps):
                vp = vision_prompts(init, p) if self.tunes_vision else frozen_vp
                if vp is not None:
                    vp = [t.repeat_interleave(len(views), 0) for t in vp]
                if self.tunes_vision:
                    f, lay = self._encode(backbone, views, vp)
                else:
                    with torch.no_grad():
                        f, lay = self._encode(backbone, views, vp)
                t = text_features(backbone, init, p, names)[0]
                logits = s * f @ t.t() + bias                                # [V, K]
                if sel is None:
                    sel = confident(logits.detach()[None], self.ratio)[0]
                    untuned = logits[0].detach().float()
                st = Step(logits[sel][None].float(), logits[:1].float(), f[sel][None].float(),
                          None if lay is None else [l[sel][None] for l in lay])
                loss = avg_entropy(st.logits) + sum(self.extra_loss(st).values(), torch.zeros(1))
                if not torch.isfinite(loss).all():
                    bad = True
                    break
                opt.zero_grad()
                loss.sum().backward()
                opt.step()
            with torch.no_grad():
                vp = vision_prompts(init, p) if self.tunes_vision else frozen_vp
                t = text_features(backbone, init, p, names)[0]
                logit = (s * image_features(backbone, xi, vp) @ t.t() + bias)[0].float()
                if untuned is None:
                    untuned = logit
            bad = bad or not bool(torch.isfinite(logit).all())
            out.append(TuneResult((untuned if bad else logit)[None].cpu(), untuned[None].cpu(),
                                  torch.tensor([bad])))
        return TuneResult.cat(out)


@dataclass
class TuneResult:
    logits: torch.Tensor                   # [N, K] after tuning (untuned where failed)
    untuned: torch.Tensor                  # [N, K] under θ_0
    failed: torch.Tensor                   # [N] bool: non-finite loss/prediction, fell back

    @staticmethod
    def cat(parts: Sequence["TuneResult"]) -> "TuneResult":
        return TuneResult(torch.cat([r.logits for r in parts]), torch.cat([r.untuned for r in parts]),
                          torch.cat([r.failed for r in parts]))
