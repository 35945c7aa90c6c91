"""Source statistics and class prototypes for PromptAlign and PromptSync, computed once
offline on a proxy source set and saved as one safetensors file.

For the inputs h_l [T, W] of the first L vision blocks (class token, patches and prompt
tokens, under θ_0's visual prompts) over the N source images:

    PromptAlign   μ̂_l = mean_n h_l,  σ̂²_l = var_n h_l           [L, T, W]  (per token position)
    PromptSync    μ̂_{l,c}, σ̂²_{l,c}: mean / variance over the images of class c *and* their
                  tokens                                          [C, L, W]
                  z̄_c = normalise(mean of the normalised image features of class c)   [C, D]

The class prototypes pool over token positions: positional prototypes would cost C·L·T·W
numbers (1.8 GB for ImageNet's 1,000 classes on ViT-B/16); pooled they are C·L·W. Sums are
accumulated in float64 (one pass, no cancellation at these sizes). The file names the backbone
(identity + weights hash), θ_0 (`PromptInit.key`) and the classes; the methods refuse
statistics made for anything else.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .. import __version__
from .tta import PromptInit, TTAError, batched_params, vision_prompts

FORMAT = "anyclass-tta-stats"


@dataclass
class SourceStats:
    mean: torch.Tensor               # [L, T, W]
    var: torch.Tensor                # [L, T, W]
    class_mean: torch.Tensor         # [C, L, W]
    class_var: torch.Tensor          # [C, L, W]
    class_feat: torch.Tensor         # [C, D]
    class_count: torch.Tensor        # [C] images per class
    classnames: list[str]
    backbone_identity: str
    weights_hash: str
    prompts_key: str
    source: str

    @property
    def layers(self) -> int:
        return self.mean.shape[0]

    def check(self, backbone, init: PromptInit, layers: int, path: str = "statistics") -> None:
        """Refuse statistics of another backbone, another θ_0 or too few blocks."""
        if (self.backbone_identity, self.weights_hash) != (backbone.identity, backbone.weights_hash):
            raise TTAError(f"{path} was computed on backbone {self.backbone_identity} (weights "
                           f"{self.weights_hash[:16]}), not on {backbone.identity} (weights "
                           f"{backbone.weights_hash[:16]})")
        if self.prompts_key != init.key:
            raise TTAError(f"{path} was computed for prompts {self.prompts_key}, not for the "
                           f"prompts being tuned ({init.key}{f', {init.source}' if init.source else ''}); "
                           f"recompute it with `anyclass tta stats --prompts ...`")
        if layers > self.layers:
            raise TTAError(f"{path} holds {self.layers} blocks' statistics; {layers} are aligned")

    def prototypes(self, classnames: Sequence[str], path: str = "statistics"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class_mean, class_var, class_feat) rows in the order of `classnames`; a class the
        source set lacks (or has no image of) is an error naming it."""
        index = {c: i for i, c in enumerate(self.classnames)}
        missing = [c for c in classnames if c not in index or int(self.class_count[index[c]]) == 0]
        if missing:
            raise TTAError(f"{path} has no prototype for {len(missing)} class(es) of the task: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (compute "
                           f"statistics on a source set with these classes, e.g. retrieved from a "
                           f"pool: `anyclass tta stats --source POOL --for-dataset TASK`)")
        rows = torch.tensor([index[c] for c in classnames])
        return self.class_mean[rows], self.class_var[rows], self.class_feat[rows]

    def to(self, device) -> "SourceStats":
        for k in ("mean", "var", "class_mean", "class_var", "class_feat"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from ..locks import atomic_path
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "classnames": json.dumps(self.classnames),
                "backbone_identity": self.backbone_identity, "weights_hash": self.weights_hash,
                "prompts_key": self.prompts_key, "source": self.source,
                "anyclass_version": __version__}
        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in
                   ("mean", "var", "class_mean", "class_var", "class_feat", "class_count")}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SourceStats":
        from .prompted import read_tagged_file
        t, meta = read_tagged_file(path, FORMAT, "test-time statistics", TTAError)
        return cls(t["mean"], t["var"], t["class_mean"], t["class_var"], t["class_feat"],
                   t["class_count"], json.loads(meta["classnames"]), meta["backbone_identity"],
                   meta["weights_hash"], meta["prompts_key"], meta.get("source", ""))


@torch.no_grad()
def compute_stats(backbone, init: PromptInit, dataset, layers: int = 3, source: str = "",
                  batch_size: int = 128, progress: bool = True) -> SourceStats:
    """Statistics of `dataset` (LabeledImages) under θ_0's visual prompts (see module doc).
    Unreadable images are skipped with a warning naming them."""
    from .training import iter_batches
    names = list(dataset.classnames)
    labels_all = torch.as_tensor(list(dataset.labels), dtype=torch.long)
    p = batched_params(init, 1, backbone.device, text=False, vision=False)
    vp = vision_prompts(init, p)
    c = len(names)
    s1 = s2 = cs1 = cs2 = fsum = None
    n_img, tok = 0, 0
    ccount = torch.zeros(c, dtype=torch.float64)
    ctok = torch.zeros(c, dtype=torch.float64)
    for x, idx in iter_batches(backbone, dataset, batch_size, progress=progress):
        b = x.shape[0]
        ps = None if vp is None else [t.expand(b, -1, -1) for t in vp]
        f, lay = backbone.encode_images_with_layer_inputs(x, ps, layers)
        h = torch.stack([t.double() for t in lay])                         # [L, B, T, W]
        y = labels_all[idx].to(h.device)
        if s1 is None:
            L, _, T, W = h.shape
            s1 = torch.zeros(L, T, W, dtype=torch.float64, device=h.device)
            s2 = torch.zeros_like(s1)
            cs1 = torch.zeros(c, L, W, dtype=torch.float64, device=h.device)
            cs2 = torch.zeros_like(cs1)
            fsum = torch.zeros(c, f.shape[1], dtype=torch.float64, device=h.device)
        s1 += h.sum(1)
        s2 += (h * h).sum(1)
        cs1.index_add_(0, y, h.sum(2).transpose(0, 1))                       # [B, L, W] by class
        cs2.index_add_(0, y, (h * h).sum(2).transpose(0, 1))
        fsum.index_add_(0, y, f.double())
        ccount += torch.bincount(y.cpu(), minlength=c).double()
        n_img += b
        tok = h.shape[2]
    if n_img == 0:
        raise TTAError(f"{dataset.name}: no readable image to compute statistics from")
    mean = s1 / n_img
    var = (s2 / n_img - mean ** 2).clamp_min(0)
    per = (ccount * tok).clamp_min(1).to(cs1.device)[:, None, None]
    cmean = cs1 / per
    cvar = (cs2 / per - cmean ** 2).clamp_min(0)
    cfeat = torch.nn.functional.normalize(fsum, dim=-1)
    return SourceStats(mean.float().cpu(), var.float().cpu(), cmean.float().cpu(), cvar.float().cpu(),
                       cfeat.float().cpu(), ccount.float(), names, backbone.identity,
                       backbone.weights_hash, init.key, source)
