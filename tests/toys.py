"""A tiny protocol-satisfying image backbone for tests that must not depend on real models:
8x8 downsample, fixed random affine map, tanh, L2 norm. Counts forward calls and can fail or
sleep on demand (interruption and concurrency tests)."""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image


class ToyBackbone:
    identity = "toy:affine8"
    weights_hash = "0123456789abcdef"
    embed_dim = 16
    logit_scale = 100.0
    logit_bias = 0.0
    device = torch.device("cpu")

    def __init__(self, fail_after: int | None = None, sleep: float = 0.0,
                 resample: Image.Resampling = Image.Resampling.BILINEAR) -> None:
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(3 * 8 * 8, self.embed_dim, generator=g)
        self.b = torch.randn(self.embed_dim, generator=g)
        self.calls = 0
        self.fail_after = fail_after
        self.sleep = sleep
        self.resample = resample

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        a = np.asarray(img.convert("RGB").resize((8, 8), self.resample), dtype=np.float32) / 255.0
        return torch.from_numpy(a).permute(2, 0, 1).contiguous()

    def preprocess_id(self) -> str:
        return f"toy:resize8-{self.resample.name.lower()}"

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        f = torch.tanh(x.flatten(1) @ self.W + self.b)
        return f / f.norm(dim=-1, keepdim=True)


def clip_tokenizer():
    """A real CLIP BPE tokenizer for transformers from open_clip's bundled vocabulary."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    st = SimpleTokenizer()
    vocab = dict(st.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)
