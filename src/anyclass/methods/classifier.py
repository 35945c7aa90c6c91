"""Text classifiers: class names × templates (and CuPL sentences) → W (D×K)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..backbones.base import VisionLanguageModel


@torch.no_grad()
def encode_texts_batched(backbone: VisionLanguageModel, texts: Sequence[str],
                         batch_size: int = 256) -> torch.Tensor:
    return torch.cat([backbone.encode_texts(list(texts[i:i + batch_size])).float()
                      for i in range(0, len(texts), batch_size)])


def build_text_classifier(backbone: VisionLanguageModel, classnames: Sequence[str],
                          templates: Sequence[str] = ("a photo of a {}.",),
                          descriptions: dict[str, list[str]] | None = None,
                          with_templates: bool = True, cache: bool = True) -> torch.Tensor:
    """W[:, k] = normalise(mean_s normalise(enc(s))) over class k's sentences.

    Sentences of class k: every template filled with its name (if `with_templates`), plus its
    CuPL descriptions (if given) — CuPL alone is `with_templates=False`, "CuPL+e" both.
    All sentences go through the encoder in batches, then one segment mean.

    Cached on disk (features/textcache.py) for backbones that carry a `text_id` (those made
    by `create_backbone`): a cached run then never runs — or even loads — the text tower.
    """
    text_id = getattr(backbone, "text_id", None) if cache else None
    if not text_id:
        return _encode_classifier(backbone, classnames, templates, descriptions, with_templates)
    from ..features.textcache import classifier_key, load_classifier, save_classifier
    key = classifier_key(backbone.identity, backbone.weights_hash, text_id, classnames,
                         templates, descriptions, with_templates)
    hit = load_classifier(key)
    if hit is not None:
        return torch.from_numpy(hit).to(backbone.device)
    W = _encode_classifier(backbone, classnames, templates, descriptions, with_templates)
    try:
        save_classifier(key, W.detach().cpu().numpy(),
                        {"identity": backbone.identity, "classes": len(classnames)})
    except OSError:
        pass                                          # a read-only cache costs a re-encode
    return W


@torch.no_grad()
def _encode_classifier(backbone: VisionLanguageModel, classnames: Sequence[str],
                       templates: Sequence[str], descriptions: dict[str, list[str]] | None,
                       with_templates: bool) -> torch.Tensor:
    texts: list[str] = []
    owner: list[int] = []
    for k, name in enumerate(classnames):
        sents = [t.format(name) for t in templates] if with_templates else []
        if descriptions is not None:
            sents += descriptions.get(name, [])
        if not sents:
            raise ValueError(f"class {name!r} has no sentences")
        texts += sents
        owner += [k] * len(sents)
    emb = encode_texts_batched(backbone, texts)                          # [S, D], normalised
    idx = torch.tensor(owner, device=emb.device)
    sums = torch.zeros(len(classnames), emb.shape[1], device=emb.device).index_add_(0, idx, emb)
    return F.normalize(sums, dim=-1).T.contiguous()                      # [D, K]
