"""Reuse: run only the selected models, put their heads on one scale, combine, fall back.

Calibration: each chosen head contributes p_m(h | x), the softmax over ALL heads of its own
model m — a posterior, so a head from a 10-class model and one from a 1,000-class model are
both probabilities of "x is this head's concept". Classes with no capable head take the
fallback vision-language model's softmax over the task's classes (also a posterior):

    score[n, c] = p_{m(h_c)}(h_c | x_n)                  (c has a head h_c)
    score[n, c] = q(c | x_n)                              (c falls back; q = VLM softmax)

and the prediction is argmax_c score[n, c]. Scores are returned as log-probabilities, so
they work as logits for acc1/acc5.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import AnyclassError
from .select import Selection


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def combine(selection: Selection, model_logits: dict[int, np.ndarray],
            fallback_probs: np.ndarray | None) -> np.ndarray:
    """[N, K] log-scores from the chosen heads' model logits and the fallback's probabilities
    (columns in task class order; needed only for the fallback classes)."""
    K = len(selection.choices)
    fb = selection.fallback
    if fb and fallback_probs is None:
        names = ", ".join(selection.classes[c] for c in fb[:10])
        raise AnyclassError(f"no head in the hub covers {len(fb)} class(es) and no fallback "
                            f"model is configured: {names}")
    N = next(iter(model_logits.values())).shape[0] if model_logits else fallback_probs.shape[0]
    score = np.zeros((N, K), dtype=np.float64)
    probs = {m: _softmax(np.asarray(l, dtype=np.float64)) for m, l in model_logits.items()}
    for ch in selection.choices:
        if ch is not None:
            score[:, ch.cls] = probs[ch.model_id][:, ch.head]
    if fb:
        score[:, fb] = np.asarray(fallback_probs, dtype=np.float64)[:, fb]
    return np.log(np.clip(score, 1e-12, None)).astype(np.float32)


def run_selected(selection: Selection, specs: dict[int, str], dataset,
                 expert_factory: Callable[[str], object] | None = None,
                 progress: bool = False) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Logits of every selected model on `dataset` (cached on disk), and the rows valid in
    all of them (unreadable images are warned about and dropped)."""
    from ..backbones.experts import create_expert, expert_logits
    factory = expert_factory or create_expert
    out: dict[int, np.ndarray] = {}
    valid = np.ones(len(dataset), dtype=bool)
    for m in selection.models:                       # only the chosen models run
        logits, ok = expert_logits(factory(specs[m]), dataset, progress=progress,
                                   with_valid=True)
        out[m] = np.asarray(logits)
        valid &= np.asarray(ok, dtype=bool)
    return out, valid


def fallback_probabilities(backbone, dataset, classnames: Sequence[str],
                           templates: str = "single", progress: bool = False
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The vision-language fallback: zero-shot softmax over the task's classes."""
    import torch

    from ..data.templates import get_templates
    from ..features.extract import extract_features
    from ..methods.classifier import build_text_classifier
    feats = extract_features(backbone, dataset, progress=progress)
    W = build_text_classifier(backbone, list(classnames), get_templates(templates), None)
    f = torch.from_numpy(np.array(feats.features, dtype=np.float32)).to(W.device)
    logits = float(backbone.logit_scale) * (f @ W.float())
    return torch.softmax(logits, dim=1).cpu().numpy(), np.asarray(feats.valid, dtype=bool)
