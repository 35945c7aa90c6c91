"""Pieces the prompt-learning methods share: context templates, context initialisation from
words, frozen image features and the zero-shot text classifier."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

PLACEHOLDER = "X"


def context_template(n_ctx: int, ctx_init: str | None) -> str:
    """The text with `n_ctx` placeholders for the learned words and "{}" for the class.

    No init: "X X ... X {}." (CoOp's class token at the end). With an init phrase, the first
    n_ctx of its words become learned and the rest stay literal, as MaPLe/APEX do with "a photo
    of a" and 2 tokens: "X X of a {}."."""
    words = (ctx_init or "").split()
    if ctx_init and n_ctx > len(words):
        raise ValueError(f"ctx_init {ctx_init!r} has {len(words)} words for n_ctx={n_ctx}")
    rest = " ".join(words[n_ctx:])
    return " ".join([PLACEHOLDER] * n_ctx + ([rest] if rest else [])) + " {}."


def init_context(backbone, n_ctx: int, ctx_init: str | None) -> torch.Tensor:
    """[n_ctx, text_width]: the word embeddings of ctx_init's first words, else N(0, 0.02²)."""
    if ctx_init:
        words = " ".join(ctx_init.split()[:n_ctx])
        emb = backbone.embed_words(words).detach().float().cpu()
        if emb.shape[0] != n_ctx:
            raise ValueError(f"{words!r} is {emb.shape[0]} tokens for this tokenizer, not {n_ctx}; "
                             f"choose another ctx_init or n_ctx")
        return emb.clone()
    return torch.randn(n_ctx, backbone.text_width) * 0.02


def texts_for(template: str, classnames: Sequence[str]) -> list[str]:
    return [template.format(c.replace("_", " ")) for c in classnames]


def image_features(backbone, images: torch.Tensor,
                   prompts: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Normalised image features; without prompts the frozen tower runs without autograd."""
    if not prompts:
        with torch.no_grad():
            return backbone.encode_images(images).float()
    return backbone.encode_images_with_prompts(images, prompts).float()


_ZS_MEMO: dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def zeroshot_text(backbone, classnames: Sequence[str], template: str = "a photo of a {}.") -> torch.Tensor:
    """Frozen zero-shot class embeddings [K, D] (one template, as the papers' baselines);
    memoised, since a training loop asks for them at every step."""
    key = (backbone.identity, backbone.weights_hash, str(backbone.device), template, tuple(classnames))
    if key not in _ZS_MEMO:
        if len(_ZS_MEMO) > 64:
            _ZS_MEMO.clear()
        _ZS_MEMO[key] = backbone.encode_texts(texts_for(template, classnames)).float()
    return _ZS_MEMO[key]


def prompt_params(n_layers: int, n_tokens: int, width: int) -> nn.ParameterList:
    """Deep prompt tokens, N(0, 0.02²) as VPT/MaPLe/APEX initialise them."""
    return nn.ParameterList([nn.Parameter(torch.randn(n_tokens, width) * 0.02)
                             for _ in range(n_layers)])


def cosine_logits(backbone, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """s · f tᵀ with the backbone's logit scale (and bias, zero for CLIP)."""
    return backbone.logit_scale * f @ t.t() + backbone.logit_bias
