"""Classify a user's images into free-form class names (the practitioner's first command)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..backbones.base import VisionLanguageModel
from ..data.base import LabeledImages
from ..data.templates import get_templates
from ..features.extract import extract_features
from ..methods.classifier import build_text_classifier

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Files as given; directories walked recursively (every regular file, so that unreadable
    ones are reported rather than silently ignored)."""
    out: list[str] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            out += sorted(str(q.resolve()) for q in p.rglob("*") if q.is_file()
                          and not q.name.startswith("."))
        else:
            out.append(str(p.resolve()))
    return out


def classify(paths: Sequence[str], classnames: Sequence[str],
             backbone: VisionLanguageModel | None, templates: str = "single", top_k: int = 5,
             batch_size: int = 64, progress: bool = False, method: str = "zeroshot",
             hub: str | None = None, prompts: str | None = None,
             new_classes: bool = False) -> list[dict]:
    """Top-k (class, probability) per readable image; unreadable ones are warned and skipped.
    method "zeroshot" uses `backbone`; "hub" selects expert heads from the hub (default: the
    offline world's) and uses `backbone` only for classes no head covers. `prompts`: a
    learned-prompt file (`anyclass eval --save-prompts`), checked against the backbone and
    the class names (other classes only with `new_classes`)."""
    ds = LabeledImages("classify", list(paths), [-1] * len(paths), list(classnames))
    if prompts is not None:
        from ..methods.prompted import load_prompts
        from .fitting import predict_images
        m = load_prompts(prompts, backbone, classnames, allow_new_classes=new_classes)
        logits, _, rows = predict_images(m, backbone, ds, progress)
        valid = torch.zeros(len(paths), dtype=torch.bool)
        valid[rows] = True
        probs = logits[rows.argsort()].softmax(dim=-1)
    elif method == "hub":
        from ..methods import create_method
        from .image_level import hub_predict
        m = create_method("hub", hub=hub)
        scores, valid_np, _ = hub_predict(m, ds, backbone, progress)
        valid = torch.from_numpy(valid_np)
        probs = torch.from_numpy(scores[valid_np]).softmax(dim=-1)
    else:
        feats = extract_features(backbone, ds, batch_size=batch_size, cache=False,
                                 progress=progress)
        W = build_text_classifier(backbone, classnames, get_templates(templates))
        valid = torch.from_numpy(np.asarray(feats.valid, dtype=bool))
        x = torch.from_numpy(np.array(feats.features, dtype=np.float32))[valid]
        probs = (float(backbone.logit_scale) * x.to(W.device) @ W).softmax(dim=-1).cpu()
    k = min(top_k, len(classnames))
    top = probs.topk(k, dim=1)
    kept = [p for p, v in zip(paths, valid.tolist()) if v]
    return [{"image": p, "top": [{"class": classnames[j], "score": round(float(s), 4)}
                                 for s, j in zip(sv.tolist(), iv.tolist())]}
            for p, sv, iv in zip(kept, top.values, top.indices)]
