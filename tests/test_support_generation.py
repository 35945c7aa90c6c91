"""SuS by generation, with a tiny randomly initialised Stable Diffusion pipeline built here
(no download), saved with save_pretrained and loaded back through anyclass's loader."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from anyclass.errors import AnyclassError
from anyclass.support import build_support

pytest.importorskip("diffusers")


def _tiny_tokenizer(d):
    from transformers import CLIPTokenizer
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(" .,'-0123456789")
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(c, len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")          # characters only, no merges
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16), vocab


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel
    d = tmp_path_factory.mktemp("tinysd")
    tok, vocab = _tiny_tokenizer(d)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4,
        sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(d / "model")
    return d / "model"


def _pixels(root, rel):
    return np.asarray(Image.open(root / rel))


def test_generation_builds_a_seeded_folder_dataset(tiny_generator, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYCLASS_HOME", str(tmp_path / "home"))
    kw = dict(strategy="generation", generator=str(tiny_generator), per_class=2, steps=2,
              progress=False)
    s = build_support(None, ["dog", "cat"], seed=3, **kw)
    assert s.counts == {"dog": 2, "cat": 2}
    m = s.manifest
    assert m["strategy"] == "generation" and m["guidance"] == 9.5 and m["steps"] == 2
    assert [lab for _, lab in m["items"]] == [0, 0, 1, 1]
    assert s.dataset.classnames == ["dog", "cat"] and s.dataset.labels == [0, 0, 1, 1]
    imgs = [_pixels(s.root, rel) for rel, _ in m["items"]]
    assert imgs[0].shape == (16, 16, 3)
    assert not np.array_equal(imgs[0], imgs[1])           # each image its own seed
    # a rebuild from scratch (other folder, so not the cached one) gives identical pixels
    again = build_support(None, ["dog", "cat"], seed=3, out_dir=tmp_path / "again", **kw)
    assert not again.reused
    for rel, _ in m["items"]:
        assert np.array_equal(_pixels(s.root, rel), _pixels(again.root, rel))
    assert build_support(None, ["dog", "cat"], seed=3, **kw).reused


def test_cupl_prompts_and_bad_generator_folder(tiny_generator, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYCLASS_HOME", str(tmp_path / "home"))
    desc = {"dog": ["a dog barks.", "a small dog."], "cat": ["a cat sleeps."]}
    s = build_support(None, ["dog", "cat"], strategy="generation", prompts="cupl",
                      descriptions=desc, generator=str(tiny_generator), per_class=1,
                      steps=2, progress=False)
    assert s.manifest["prompts"] == "cupl" and s.counts == {"dog": 1, "cat": 1}
    with pytest.raises(AnyclassError, match="no description sentences.*'cat'"):
        build_support(None, ["dog", "cat"], strategy="generation", prompts="cupl",
                      descriptions={"dog": ["x"]}, generator=str(tiny_generator))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnyclassError, match="not a diffusers model folder"):
        build_support(None, ["dog", "cat"], strategy="generation",
                      generator=str(tmp_path / "empty"), progress=False)


def test_image_seeds_depend_on_seed_class_and_index():
    from anyclass.support.generate import image_seed
    seeds = {image_seed(s, k, i) for s in (1, 2) for k in range(3) for i in range(4)}
    assert len(seeds) == 24
