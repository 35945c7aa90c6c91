"""The protocol every vision-language backbone implements.

Methods see only this interface, so the offline built-in model, open_clip and Hugging Face
models are interchangeable. Prompt-learning methods (CoOp, MaPLe/VPT, APEX, TPT,
PromptAlign) use the two hooks `encode_text_with_context` and `encode_images_with_prompts`.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image


@runtime_checkable
class VisionLanguageModel(Protocol):
    #: spec-independent identity, e.g. "openclip:ViT-B-32@openai"; part of every cache key
    identity: str
    #: sha256 (hex, may be truncated to 16 chars) of the weights actually loaded
    weights_hash: str
    #: multiplier applied to cosine similarities to get logits (CLIP: 100)
    logit_scale: float
    #: additive logit bias (SigLIP's; 0 for CLIP-style models)
    logit_bias: float
    #: PIL image -> CHW float tensor, the model's own eval preprocessing
    preprocess: Callable[[Image.Image], torch.Tensor]
    #: list of strings -> token tensor (whatever encode_text needs)
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    #: joint embedding dimension
    embed_dim: int
    #: width of the text transformer's token embeddings (size of a context vector)
    text_width: int
    #: number of text transformer blocks (deep_ctx has at most text_layers - 1 entries);
    #: 0 for text towers without block support, whose deep_ctx raises
    text_layers: int
    #: width and depth of the vision transformer (size/number of deep visual prompts);
    #: 0 for towers without prompt support (ResNets), whose prompt hook raises
    vision_width: int
    vision_layers: int
    device: torch.device

    def to(self, device: torch.device | str) -> "VisionLanguageModel": ...

    def preprocess_id(self) -> str:
        """A string describing preprocessing exactly (for cache keys)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch [B,3,H,W] -> L2-normalised embeddings [B,embed_dim]."""

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> L2-normalised embeddings [len(texts), embed_dim]."""

    def embed_words(self, text: str) -> torch.Tensor:
        """[n, text_width] token embeddings of the words of `text` (no special tokens): the
        initial value of context vectors initialised from a phrase ("a photo of a")."""

    def encode_text_with_context(self, texts: Sequence[str], ctx: torch.Tensor, placeholder: str = "X",
                                 deep_ctx: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """CoOp-style hook: each text holds a run of n_ctx placeholder words (e.g.
        "X X X X dog."); the token embeddings of the first such run are replaced by `ctx`
        ([n_ctx, text_width] shared, or [len(texts), n_ctx, text_width] per text) and the
        text encoded from those embeddings. MaPLe-style deep text prompts: deep_ctx[j] (same
        shapes and n_ctx as ctx) replaces the hidden states at those same positions at the input
        of text layer j+1; None keeps the layer's own states; len(deep_ctx) <= text_layers - 1;
        deep_ctx=None or [] is plain CoOp. Differentiable in ctx and deep_ctx. Returns normalised
        [len(texts), embed_dim]."""

    def encode_images_with_prompts(self, images: torch.Tensor,
                                   prompts: Sequence[torch.Tensor | None] | None) -> torch.Tensor:
        """VPT/MaPLe-style deep prompts: prompts[i] ([n, vision_width] or [B, n, vision_width])
        are the prompt tokens entering layer i (inserted after the class token at the first
        prompted layer; at later layers they replace the previous layer's prompt outputs).
        None at index i keeps the previous layer's prompt outputs; len(prompts) <=
        vision_layers; prompts=None or [] is the plain encoder. Differentiable in prompts. Returns normalised [B, embed_dim]."""
