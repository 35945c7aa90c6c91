"""open_clip and Hugging Face backbones: the protocol, the two prompt hooks (with gradient
checks), specs, identity and weights hashes. Offline: tiny random-weight models only."""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from anyclass.backbones import openclip as oc_mod
from anyclass.backbones.base import VisionLanguageModel
from anyclass.backbones.factory import create_backbone
from anyclass.backbones.hooks import HookUnsupportedError, PromptError
from anyclass.backbones.weights import file_sha256
from anyclass.errors import AnyclassError, SpecError, UnsafeCheckpointError
from toys import clip_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights.*:UserWarning")

TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)
VISION = dict(image_size=32, layers=3, width=48, head_width=16, patch_size=8)
OC_CONFIGS = {
    "anyclass-test-vit": {"embed_dim": 24, "vision_cfg": VISION, "text_cfg": TEXT},
    "anyclass-test-vit-avg": {"embed_dim": 24, "text_cfg": TEXT,
                              "vision_cfg": {**VISION, "pool_type": "avg", "final_ln_after_pool": True}},
    "anyclass-test-vit-attnpool": {"embed_dim": 24, "text_cfg": TEXT,
                                   "vision_cfg": {**VISION, "attentional_pool": True, "attn_pooler_queries": 4,
                                                  "attn_pooler_heads": 2}},
    "anyclass-test-customtext": {"embed_dim": 24, "custom_text": True, "init_logit_bias": -10, "vision_cfg": VISION,
                                 "text_cfg": {**TEXT, "no_causal_mask": True, "pool_type": "last",
                                              "proj_bias": True}},
    "anyclass-test-rn": {"embed_dim": 24, "text_cfg": TEXT,
                         "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}},
}
TEXTS = ["X X a photo of a dog.", "X X cat", "a X X X drawing of a fish"]  # run of 3: first 2 replaced


@pytest.fixture(scope="module")
def oc_configs(tmp_path_factory):
    import open_clip
    d = tmp_path_factory.mktemp("openclip_cfg")
    for name, cfg in OC_CONFIGS.items():
        (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return d




@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor,
                              SiglipModel)
    root = tmp_path_factory.mktemp("hf")
    tok = clip_tokenizer()
    tc = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=16)
    vc = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=3)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "clip": (CLIPModel(CLIPConfig(text_config=tc, vision_config=vc, projection_dim=24)),
                     CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
            "siglip": (SiglipModel(SiglipConfig(text_config={**tc, "projection_size": 48}, vision_config=vc)),
                       SiglipImageProcessor(size={"height": 32, "width": 32})),
        }
        with torch.no_grad():  # SigLIP's random init leaves logit_scale at exp(0) = 1; make it CLIP-like
            models["siglip"][0].logit_scale.fill_(np.log(10.0))
        out = {}
        for kind, (model, proc) in models.items():
            d = root / kind
            model.save_pretrained(d)
            tok.save_pretrained(d)
            proc.save_pretrained(d)
            out[kind] = d
    return out


BACKBONE_IDS = ["oc-vit", "oc-avg", "oc-attnpool", "oc-customtext", "hf-clip", "hf-siglip"]


def _make(key: str, oc_configs, hf_dirs, device: str = "cpu"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if key.startswith("oc-"):
            name = {"oc-vit": "anyclass-test-vit", "oc-avg": "anyclass-test-vit-avg",
                    "oc-attnpool": "anyclass-test-vit-attnpool", "oc-customtext": "anyclass-test-customtext",
                    "oc-rn": "anyclass-test-rn"}[key]
            return create_backbone(f"openclip:{name}", device)
        return create_backbone(f"hf:{hf_dirs[key[3:]]}", device)


@pytest.fixture(scope="module")
def backbones(oc_configs, hf_dirs):
    return {k: _make(k, oc_configs, hf_dirs) for k in BACKBONE_IDS + ["oc-rn"]}


@pytest.fixture(params=BACKBONE_IDS)
def bb(request, backbones):
    return backbones[request.param]


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _token_embedding(bb) -> torch.nn.Embedding:
    if hasattr(bb.model, "text_model"):
        return bb.model.text_model.embeddings.token_embedding
    return bb._token_embedding(required=True)


def _placeholder_ctx(bb, n: int) -> torch.Tensor:
    return _token_embedding(bb).weight[bb._placeholder_id("X")].detach().expand(n, -1).clone()


# ------------------------------------------------------------------------------- protocol

def test_protocol_attributes_and_normalised_outputs(bb):
    assert isinstance(bb, VisionLanguageModel)
    assert bb.to("cpu") is bb and bb.device == torch.device("cpu")
    img = bb.encode_images(_images())
    txt = bb.encode_texts(["a dog", "a cat"])
    assert img.shape == (3, bb.embed_dim) and txt.shape == (2, bb.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert bb.encode_texts([]).shape == (0, bb.embed_dim)
    assert bb.logit_scale > 1 and isinstance(bb.logit_scale, float)
    assert bb.text_width == 32 and bb.vision_width == 48 and bb.vision_layers == 3 and bb.text_layers == 2
    assert len(bb.weights_hash) == 64 and bb.identity.split(":")[0] in ("openclip", "hf")


def test_preprocess_is_picklable_and_described(bb):
    rgba = Image.fromarray((np.random.RandomState(0).rand(40, 57, 4) * 255).astype("uint8"), "RGBA")
    x = bb.preprocess(rgba)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    again = pickle.loads(pickle.dumps(bb.preprocess))
    assert torch.equal(again(rgba), x)
    pid = bb.preprocess_id()
    assert "32" in pid and "mean=" in pid and "std=" in pid
    assert pid == bb.preprocess_id()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_preprocess_matches_the_image_processor(backbones, hf_dirs, kind):
    from transformers import AutoImageProcessor
    bb = backbones[f"hf-{kind}"]
    img = Image.fromarray((np.random.RandomState(1).rand(50, 70, 3) * 255).astype("uint8"))
    ref = AutoImageProcessor.from_pretrained(hf_dirs[kind])(images=img, return_tensors="pt")["pixel_values"][0]
    assert (bb.preprocess(img) - ref).abs().max() < 0.05  # resize implementations differ by a grey level


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_encoders_match_transformers(backbones, kind):
    bb = backbones[f"hf-{kind}"]
    imgs = _images()
    out = bb.model.get_image_features(pixel_values=imgs)
    ref = getattr(out, "pooler_output", out)
    assert torch.allclose(bb.encode_images(imgs), torch.nn.functional.normalize(ref, dim=-1), atol=1e-6)
    ids = bb.tokenizer(["a photo of a dog."])
    assert ids.shape == (1, 16)  # padded to the model's maximum length
    out = bb.model.get_text_features(input_ids=ids)
    ref = getattr(out, "pooler_output", out)
    assert torch.allclose(bb.encode_texts(["a photo of a dog."]), torch.nn.functional.normalize(ref, dim=-1),
                          atol=1e-6)


def test_openclip_encoders_match_open_clip(backbones):
    bb = backbones["oc-vit"]
    imgs = _images()
    assert torch.allclose(bb.encode_images(imgs), bb.model.encode_image(imgs, normalize=True), atol=1e-6)
    ref = bb.model.encode_text(bb.tokenizer(["a dog"]), normalize=True)
    assert torch.allclose(bb.encode_texts(["a dog"]), ref, atol=1e-6)


def test_openclip_text_runs_only_to_the_last_end_of_text_token_and_matches_the_full_context(backbones):
    """The causal tower is cut at the batch's last EOT (exact); the model is restored after."""
    bb = backbones["oc-vit"]
    m = bb.model
    texts = ["a dog", "a very small photo of a big red dog on a hill", "cat"]
    ids = bb.tokenizer(texts)
    seen = []
    h = m.transformer.register_forward_pre_hook(lambda mod, a, kw: seen.append(a[0].shape[1]),
                                                with_kwargs=True)
    try:
        got = bb.encode_texts(texts)
    finally:
        h.remove()
    assert seen == [int(ids.argmax(-1).max()) + 1] and seen[0] < ids.shape[1]
    assert m.positional_embedding.shape[0] == ids.shape[1] == m.attn_mask.shape[0]
    assert torch.allclose(got, m.encode_text(ids, normalize=True), atol=1e-6)
    ctx = 0.02 * torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    out = bb.encode_text_with_context(["a X X photo of a dog"], ctx)
    ref = m.token_embedding(bb.tokenizer(["a X X photo of a dog"]))
    ref[0, 2:4] = ctx
    from open_clip.transformer import text_global_pool
    x = m.transformer(ref + m.positional_embedding, attn_mask=m.attn_mask)
    ref = text_global_pool(m.ln_final(x), bb.tokenizer(["a X X photo of a dog"]), "argmax") @ m.text_projection
    assert torch.allclose(out, torch.nn.functional.normalize(ref, dim=-1), atol=1e-6)


# ------------------------------------------------------------------------- text hook (CoOp)

def test_text_hook_with_placeholder_embeddings_reproduces_encode_texts(bb):
    ref = bb.encode_texts(TEXTS)
    shared = _placeholder_ctx(bb, 2)  # [n_ctx, W]
    assert (bb.encode_text_with_context(TEXTS, shared) - ref).abs().max() < 1e-5
    per_text = _placeholder_ctx(bb, 2).unsqueeze(0).expand(3, -1, -1).clone()  # [B, n_ctx, W]
    assert (bb.encode_text_with_context(TEXTS, per_text) - ref).abs().max() < 1e-5
    assert (bb.encode_text_with_context(TEXTS[2:], _placeholder_ctx(bb, 3)) - ref[2:]).abs().max() < 1e-5


def test_text_hook_is_differentiable_and_context_matters(bb):
    g = torch.Generator().manual_seed(0)
    ctx = (0.02 * torch.randn(2, bb.text_width, generator=g)).requires_grad_(True)
    out = bb.encode_text_with_context(TEXTS[:2], ctx)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert (out - bb.encode_texts(TEXTS[:2])).abs().max() > 1e-4
    (out @ torch.randn(bb.embed_dim, generator=g)).sum().backward()
    assert ctx.grad is not None and bool((ctx.grad.abs().sum(-1) > 0).all())
    assert all(p.grad is None for p in bb.model.parameters())  # backbone frozen


def test_per_text_context_differs_per_text(bb):
    g = torch.Generator().manual_seed(1)
    ctx = 0.02 * torch.randn(2, 2, bb.text_width, generator=g)
    both = bb.encode_text_with_context(["X X dog", "X X dog"], ctx)
    one = bb.encode_text_with_context(["X X dog"], ctx[1])
    assert torch.allclose(both[1], one[0], atol=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-4


def test_openclip_text_hook_matches_a_manual_forward(backbones):
    """Independent reference: embeddings with ctx written in, then open_clip's text modules."""
    from open_clip.transformer import text_global_pool
    bb = backbones["oc-vit"]
    m = bb.model
    ctx = 0.02 * torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    ids = bb.tokenizer(["a X X photo"])
    x = m.token_embedding(ids)
    x[0, 2:4] = ctx
    x = m.transformer(x + m.positional_embedding, attn_mask=m.attn_mask)
    ref = text_global_pool(m.ln_final(x), ids, "argmax") @ m.text_projection
    out = bb.encode_text_with_context(["a X X photo"], ctx)
    assert torch.allclose(out, torch.nn.functional.normalize(ref, dim=-1), atol=1e-6)


def test_text_hook_errors_are_clear(backbones):
    bb = backbones["oc-vit"]
    with pytest.raises(PromptError, match=r"'a photo of a dog' has no run of 2 placeholder tokens 'X'"):
        bb.encode_text_with_context(["X X cat", "a photo of a dog"], torch.zeros(2, 32))
    with pytest.raises(PromptError, match=r"ctx must be \[n_ctx, 32\]"):
        bb.encode_text_with_context(["X X cat"], torch.zeros(2, 31))
    with pytest.raises(PromptError, match="not a single token"):
        bb.encode_text_with_context(["a b c"], torch.zeros(1, 32), placeholder="a b")


# ------------------------------------------------------------- deep text context (MaPLe)

DEEP_TEXTS = ["X X a photo of a dog.", "a X X cat"]
DEEP_POS = [[1, 2], [2, 3]]  # where the ctx run sits after the start token, for all three tokenizers
DEEP_IDS = ["oc-vit", "oc-customtext", "hf-clip", "hf-siglip", "builtin"]


@pytest.fixture(scope="module")
def builtin_bb():
    """The built-in backbone over a tiny random image tower and the real (frozen) MiniLM: no world."""
    from anyclass.backbones.builtin import BuiltinCLIP
    from anyclass.world.model import BuiltinModel, ModelConfig, VisionConfig
    torch.manual_seed(0)
    cfg = ModelConfig(VisionConfig(image_size=32, patch=8, width=32, depth=3, heads=2, stem_channels=(8, 16, 16)))
    return BuiltinCLIP(BuiltinModel(cfg), "builtin:test", "0" * 64)


def _deep_bb(key, backbones, builtin_bb):
    return builtin_bb if key == "builtin" else backbones[key]


def _text_blocks(bb) -> tuple[torch.nn.ModuleList, bool]:
    if hasattr(getattr(bb.model, "text", None), "bert"):  # the built-in model's MiniLM
        return bb.model.text.bert.encoder.layer, True
    if hasattr(bb.model, "text_model"):
        return bb.model.text_model.encoder.layers, True
    t = bb.model.transformer if hasattr(bb.model, "transformer") else bb.model.text.transformer
    return t.resblocks, t.batch_first


def _deep(bb, seed: int, per_text_from: int = 1) -> list[torch.Tensor | None]:
    """deep_ctx for every layer after the first: shared, None, then per-text entries."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor | None] = []
    for j in range(bb.text_layers - 1):
        shape = (2, 2, bb.text_width) if j >= per_text_from else (2, bb.text_width)
        out.append(None if j == 1 else 0.5 * torch.randn(*shape, generator=g))
    return out


def _manual_deep_text(bb, texts, ctx, deep):
    """Reference written outside the hook: record what enters block 0 in a plain CoOp call, run the
    library's own blocks one by one, writing deep[j] at the ctx positions before block j+1 by hand,
    and hand the result to the model's own tail (norm, pooling, projection) as the last block's output."""
    blocks, batch_first = _text_blocks(bb)
    seen = {}
    h = blocks[0].register_forward_pre_hook(lambda _m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    try:
        bb.encode_text_with_context(texts, ctx)
    finally:
        h.remove()
    x, rest, kwargs = seen["args"][0], seen["args"][1:], seen["kwargs"]
    for j, blk in enumerate(blocks):
        if 0 < j <= len(deep) and deep[j - 1] is not None:
            y = (x if batch_first else x.transpose(0, 1)).clone()
            for b, pos in enumerate(DEEP_POS):
                y[b, pos] = deep[j - 1] if deep[j - 1].dim() == 2 else deep[j - 1][b]
            x = y if batch_first else y.transpose(0, 1)
        x = blk(x, *rest, **kwargs)
        x = x[0] if isinstance(x, tuple) else x
    final = x
    h = blocks[-1].register_forward_hook(lambda _m, _a, out: (final, *out[1:]) if isinstance(out, tuple) else final)
    try:
        return bb.encode_text_with_context(texts, ctx)
    finally:
        h.remove()


def test_text_layers(backbones, builtin_bb):
    assert [backbones[k].text_layers for k in BACKBONE_IDS + ["oc-rn"]] == [2] * 7
    assert builtin_bb.text_layers == len(builtin_bb.model.text.bert.encoder.layer) == 6


@pytest.mark.parametrize("key", DEEP_IDS)
def test_no_deep_context_is_plain_coop(key, backbones, builtin_bb):
    bb = _deep_bb(key, backbones, builtin_bb)
    ctx = 0.1 * torch.randn(2, bb.text_width, generator=torch.Generator().manual_seed(9))
    ref = bb.encode_text_with_context(DEEP_TEXTS, ctx)
    for deep in (None, [], [None], [None] * (bb.text_layers - 1)):
        assert torch.equal(bb.encode_text_with_context(DEEP_TEXTS, ctx, deep_ctx=deep), ref)


@pytest.mark.parametrize("key", DEEP_IDS)
def test_deep_context_matches_a_manual_forward(key, backbones, builtin_bb):
    bb = _deep_bb(key, backbones, builtin_bb)
    ctx = 0.1 * torch.randn(2, bb.text_width, generator=torch.Generator().manual_seed(10))
    deep = _deep(bb, 11, per_text_from=0 if key.startswith("hf") else 1)
    out = bb.encode_text_with_context(DEEP_TEXTS, ctx, deep_ctx=deep)
    assert (out - bb.encode_text_with_context(DEEP_TEXTS, ctx)).abs().max() > 1e-4
    assert (out - _manual_deep_text(bb, DEEP_TEXTS, ctx, deep)).abs().max() < 1e-5


@pytest.mark.parametrize("key", DEEP_IDS)
def test_deep_context_gradients_and_none_keeps_the_layer_input(key, backbones, builtin_bb):
    bb = _deep_bb(key, backbones, builtin_bb)
    ctx = (0.1 * torch.randn(2, bb.text_width, generator=torch.Generator().manual_seed(12))).requires_grad_(True)
    deep = [d if d is None else d.requires_grad_(True) for d in _deep(bb, 13)]
    out = bb.encode_text_with_context(DEEP_TEXTS, ctx, deep_ctx=deep)
    (out @ torch.randn(bb.embed_dim, generator=torch.Generator().manual_seed(14))).sum().backward()
    assert ctx.grad is not None and bool((ctx.grad.abs().sum(-1) > 0).all())
    for j, d in enumerate(deep):
        assert d is None or (d.grad is not None and bool((d.grad.abs().sum(-1) > 0).all())), f"deep_ctx[{j}]"
    assert all(p.grad is None for p in bb.model.parameters())
    # writing back the very states layer 1 receives changes nothing: deep_ctx replaces, None keeps
    blocks, batch_first = _text_blocks(bb)
    seen = {}
    h = blocks[1].register_forward_pre_hook(lambda _m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True)
    try:
        ref = bb.encode_text_with_context(DEEP_TEXTS, ctx.detach())
    finally:
        h.remove()
    x = seen["x"] if batch_first else seen["x"].transpose(0, 1)
    own = torch.stack([x[b, pos] for b, pos in enumerate(DEEP_POS)])
    assert (bb.encode_text_with_context(DEEP_TEXTS, ctx.detach(), deep_ctx=[own]) - ref).abs().max() < 1e-6


def test_deep_context_hook_handles_sequence_first_blocks():
    """Older open_clip transformers run [L, B, W]; the hook must write the same rows."""
    from open_clip.transformer import Transformer

    from anyclass.backbones.hooks import deep_context
    torch.manual_seed(0)
    bf, sf = Transformer(32, 3, 2).eval(), Transformer(32, 3, 2, batch_first=False).eval()
    sf.load_state_dict(bf.state_dict())
    x, starts = torch.randn(2, 6, 32), torch.tensor([1, 3])
    deep = [torch.randn(2, 2, 32), None]
    with deep_context(bf.resblocks, starts, deep):
        a = bf(x)
    with deep_context(sf.resblocks, starts, deep, batch_first=False):
        b = sf(x)
    assert (a - b).abs().max() < 1e-5 and (a - bf(x)).abs().max() > 1e-3


def test_deep_context_errors_are_clear(backbones, builtin_bb):
    bb, ctx = backbones["oc-vit"], torch.zeros(2, 32)
    cases = [([None, None], r"2 deep_ctx entries for a text transformer of 2 layers \(at most 1"),
             ([torch.zeros(2, 31)], r"deep_ctx\[0\] must be \[2, 32\] or \[2, 2, 32\], got \[2, 31\]"),
             ([torch.zeros(3, 2, 32)], r"deep_ctx\[0\] must be .* got \[3, 2, 32\]"),
             ([torch.zeros(32)], r"deep_ctx\[0\] must be .* got \[32\]"),
             ([torch.zeros(3, 32)], r"deep_ctx\[0\] has 3 context vectors but ctx has 2"),
             (torch.zeros(1, 2, 32), "deep_ctx must be a sequence")]
    for deep, msg in cases:
        with pytest.raises(PromptError, match=msg):
            bb.encode_text_with_context(DEEP_TEXTS, ctx, deep_ctx=deep)
    with pytest.raises(PromptError, match="6 deep_ctx entries for a text transformer of 6 layers"):
        builtin_bb.encode_text_with_context(DEEP_TEXTS, torch.zeros(2, 384), deep_ctx=[None] * 6)
    with pytest.raises(PromptError, match=r"deep_ctx\[1\] has 4 context vectors but ctx has 2"):
        builtin_bb.encode_text_with_context(DEEP_TEXTS, torch.zeros(2, 384), deep_ctx=[None, torch.zeros(4, 384)])
    with pytest.raises(PromptError, match="no run of 2 placeholder tokens"):
        builtin_bb.encode_text_with_context(["a dog"], torch.zeros(2, 384), deep_ctx=[torch.zeros(2, 384)])


# --------------------------------------------------------------- vision hook (deep prompts)

def test_no_prompts_reproduce_encode_images(bb):
    imgs = _images()
    ref = bb.encode_images(imgs)
    for prompts in ([], [None], [None] * bb.vision_layers, None):
        assert torch.equal(bb.encode_images_with_prompts(imgs, prompts), ref)


def test_deep_prompts_reach_every_layer(bb):
    g = torch.Generator().manual_seed(0)
    prompts = [(0.02 * torch.randn(2, bb.vision_width, generator=g)).requires_grad_(True)
               for _ in range(bb.vision_layers)]
    imgs = _images()
    out = bb.encode_images_with_prompts(imgs, prompts)
    assert out.shape == (3, bb.embed_dim)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (out - bb.encode_images(imgs)).abs().max() > 1e-4
    (out @ torch.randn(bb.embed_dim, generator=g)).sum().backward()
    for i, p in enumerate(prompts):
        assert p.grad is not None and bool((p.grad.abs().sum(-1) > 0).all()), f"layer {i}"


def test_per_sample_prompts_equal_one_sample_at_a_time(bb):
    g = torch.Generator().manual_seed(3)
    imgs = _images()
    prompts = [0.05 * torch.randn(3, 2, bb.vision_width, generator=g), None,
               0.05 * torch.randn(3, 4, bb.vision_width, generator=g)]  # layers may change the count
    batch = bb.encode_images_with_prompts(imgs, prompts)
    for i in range(3):
        one = bb.encode_images_with_prompts(imgs[i:i + 1], [prompts[0][i], None, prompts[2][i]])
        assert (batch[i] - one[0]).abs().max() < 1e-5


def test_prompt_shape_errors(bb):
    with pytest.raises(PromptError, match=r"prompts\[0\] must be"):
        bb.encode_images_with_prompts(_images(), [torch.zeros(2, bb.vision_width + 1)])
    with pytest.raises(PromptError, match="4 prompt entries for a vision transformer of 3 layers"):
        bb.encode_images_with_prompts(_images(), [None] * 4)


def _manual_openclip_vpt(visual, images, prompts):
    """Reference VPT-deep forward written from open_clip's public modules."""
    x = visual._embeds(images)
    n = 0
    for i, blk in enumerate(visual.transformer.resblocks):
        if i < len(prompts) and prompts[i] is not None:
            p = prompts[i].expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], p, x[:, 1 + n:]], dim=1)
            n = p.shape[1]
        x = blk(x)
    x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
    pooled, _ = visual._pool(x)
    return torch.nn.functional.normalize(pooled @ visual.proj, dim=-1)


@pytest.mark.parametrize("key", ["oc-vit", "oc-avg", "oc-attnpool"])
def test_openclip_deep_prompts_match_a_manual_forward(backbones, key):
    bb = backbones[key]
    g = torch.Generator().manual_seed(4)
    prompts = [None, 0.05 * torch.randn(2, 48, generator=g), 0.05 * torch.randn(2, 48, generator=g)]
    imgs = _images()
    ref = _manual_openclip_vpt(bb.model.visual, imgs, prompts)
    assert torch.allclose(bb.encode_images_with_prompts(imgs, prompts), ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_deep_prompts_match_a_manual_forward(backbones, kind):
    bb = backbones[f"hf-{kind}"]
    vm = bb.model.vision_model
    g = torch.Generator().manual_seed(5)
    prompts = [0.05 * torch.randn(2, 48, generator=g), None, 0.05 * torch.randn(3, 48, generator=g)]
    imgs = _images()
    k = 1 if kind == "clip" else 0
    x = vm.embeddings(imgs)
    if kind == "clip":
        x = vm.pre_layrnorm(x)
    n = 0
    for i, layer in enumerate(vm.encoder.layers):
        if prompts[i] is not None:
            x = torch.cat([x[:, :k], prompts[i].expand(3, -1, -1), x[:, k + n:]], dim=1)
            n = prompts[i].shape[0]
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    x = torch.cat([x[:, :k], x[:, k + n:]], dim=1)
    if kind == "clip":
        ref = bb.model.visual_projection(vm.post_layernorm(x[:, 0]))
    else:
        ref = vm.head(vm.post_layernorm(x))
    out = bb.encode_images_with_prompts(imgs, prompts)
    assert torch.allclose(out, torch.nn.functional.normalize(ref, dim=-1), atol=1e-6)


@pytest.mark.parametrize("key", ["oc-vit", "hf-clip", "hf-siglip"])
def test_gradcheck_both_hooks(key, oc_configs, hf_dirs):
    """Finite differences agree with autograd, in float64, for ctx and for deep prompts
    (gradcheck's fast mode: random projections of the Jacobian)."""
    bb = _make(key, oc_configs, hf_dirs)
    bb.model.double()
    g = torch.Generator().manual_seed(6)
    imgs = _images(2).double()
    p0 = (0.05 * torch.randn(1, bb.vision_width, generator=g, dtype=torch.float64)).requires_grad_(True)
    p2 = (0.05 * torch.randn(1, bb.vision_width, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: bb.encode_images_with_prompts(imgs, [a, None, b]), (p0, p2),
                                    eps=1e-6, atol=1e-5, fast_mode=True)
    ctx = (0.05 * torch.randn(1, bb.text_width, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: bb.encode_text_with_context(["a X dog", "X"], c), (ctx,),
                                    eps=1e-6, atol=1e-5, fast_mode=True)
    d = (0.05 * torch.randn(1, bb.text_width, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, e: bb.encode_text_with_context(["a X dog", "X"], c, deep_ctx=[e]),
                                    (ctx, d), eps=1e-6, atol=1e-5, fast_mode=True)


def test_resnet_tower_refuses_visual_prompts_but_text_hook_works(backbones):
    bb = backbones["oc-rn"]
    assert bb.vision_layers == 0 and bb.vision_width == 0
    with pytest.raises(HookUnsupportedError, match="deep visual prompts need a ViT image tower") as ei:
        bb.encode_images_with_prompts(_images(), [torch.zeros(2, 8)])
    assert isinstance(ei.value, NotImplementedError) and isinstance(ei.value, AnyclassError)
    assert bb.encode_images(_images()).shape == (3, 24)
    ref = bb.encode_texts(TEXTS[:2])
    assert (bb.encode_text_with_context(TEXTS[:2], _placeholder_ctx(bb, 2)) - ref).abs().max() < 1e-5


# ------------------------------------------------------------- specs, identity, weights hash

def test_random_weights_are_deterministic_and_warned(oc_configs):
    with pytest.warns(UserWarning, match="random weights"):
        a = create_backbone("openclip:anyclass-test-vit", "cpu")
    with pytest.warns(UserWarning, match="random weights"):
        b = create_backbone("openclip:anyclass-test-vit@random", "cpu")
    assert a.identity == b.identity == "openclip:anyclass-test-vit@random"
    assert a.weights_hash == b.weights_hash
    assert torch.equal(a.encode_images(_images()), b.encode_images(_images()))


def _perturbed_state_dict(oc_configs) -> dict[str, torch.Tensor]:
    bb = _make("oc-vit", oc_configs, None)
    g = torch.Generator().manual_seed(7)
    return {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v).contiguous()
            for k, v in bb.model.state_dict().items()}


def test_checkpoints_in_both_formats_load_identically(oc_configs, backbones, tmp_path):
    sd = _perturbed_state_dict(oc_configs)
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "train.ckpt")
    a = create_backbone(f"openclip:anyclass-test-vit@{tmp_path / 'w.safetensors'}", "cpu")
    b = create_backbone(f"openclip:anyclass-test-vit@{tmp_path / 'w.pt'}", "cpu")
    c = create_backbone(f"openclip:anyclass-test-vit@{tmp_path / 'train.ckpt'}", "cpu")
    imgs = _images()
    for other in (b, c):
        assert torch.equal(a.encode_images(imgs), other.encode_images(imgs))
        assert torch.equal(a.encode_texts(TEXTS), other.encode_texts(TEXTS))
    assert a.identity == "openclip:anyclass-test-vit@file"
    assert a.weights_hash == file_sha256(tmp_path / "w.safetensors")
    random = backbones["oc-vit"]
    assert a.weights_hash != random.weights_hash
    assert (a.encode_images(imgs) - random.encode_images(imgs)).abs().max() > 1e-4
    again = create_backbone(f"openclip:anyclass-test-vit@{tmp_path / 'w.safetensors'}", "cpu")
    assert again.weights_hash == a.weights_hash and again.identity == a.identity


def test_unsafe_or_mismatched_checkpoints_are_refused(oc_configs, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))
    torch.save({"visual.proj": torch.zeros(2), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil\.pt: it is a pickle of arbitrary"):
        create_backbone(f"openclip:anyclass-test-vit@{tmp_path / 'evil.pt'}", "cpu")
    sd = _perturbed_state_dict(oc_configs)
    del sd["visual.proj"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(AnyclassError, match=r"does not fit open_clip model 'anyclass-test-vit': 1 missing keys "
                                            r"\(e\.g\. visual\.proj\); 1 unexpected keys"):
        create_backbone(f"openclip:anyclass-test-vit@{tmp_path / 'partial.pt'}", "cpu")


def test_spec_errors_are_clear(oc_configs, hf_dirs, tmp_path):
    with pytest.raises(SpecError, match=r"unknown open_clip model 'ViT-B-33'; did you mean ViT-B-32"):
        create_backbone("openclip:ViT-B-33", "cpu")
    with pytest.raises(SpecError, match="needs a model name"):
        create_backbone("openclip:", "cpu")
    missing = tmp_path / "nope" / "ckpt.safetensors"
    with pytest.raises(SpecError, match=f"checkpoint file not found: {missing}"):
        create_backbone(f"openclip:anyclass-test-vit@{missing}", "cpu")
    with pytest.raises(SpecError, match=r"unknown pretrained tag 'laion9b' for open_clip model 'ViT-B-32' "
                                        r"\(known tags: openai, "):
        create_backbone("openclip:ViT-B-32@laion9b", "cpu")
    with pytest.raises(SpecError, match="open_clip has no pretrained tags for it"):
        create_backbone("openclip:anyclass-test-vit@openai", "cpu")
    with pytest.raises(SpecError, match=f"hf model directory not found: {tmp_path / 'absent'}"):
        create_backbone(f"hf:{tmp_path / 'absent'}", "cpu")
    with pytest.raises(SpecError, match="needs a model id or a local directory"):
        create_backbone("hf:", "cpu")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SpecError, match=r"model type 'bert' is not supported \(supported: clip, siglip\)"):
        create_backbone(f"hf:{bert}", "cpu")


def test_pretrained_tag_path_offline(oc_configs, tmp_path, monkeypatch):
    """The @TAG flow with open_clip's download replaced by a local file: the tag's preprocessing,
    the QuickGELU warning, the file hash."""
    sd = _perturbed_state_dict(oc_configs)
    save_file(sd, tmp_path / "open_clip_model.safetensors")
    cfg = {"hf_hub": "nobody/nothing/", "quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
           "interpolation": "bilinear", "resize_mode": "squash"}
    monkeypatch.setattr(oc_mod, "_pretrained_cfg", lambda name, tag: dict(cfg))
    monkeypatch.setattr(oc_mod, "_download", lambda name, tag, c: tmp_path / "open_clip_model.safetensors")
    with pytest.warns(UserWarning, match=r"trained with QuickGELU.*use openclip:anyclass-test-vit-quickgelu@"):
        bb = create_backbone("openclip:anyclass-test-vit@faketag", "cpu")
    assert bb.identity == "openclip:anyclass-test-vit@faketag"
    assert bb.weights_hash == file_sha256(tmp_path / "open_clip_model.safetensors")
    assert "resize=squash:32x32:bilinear" in bb.preprocess_id() and "mean=(0.5,0.5,0.5)" in bb.preprocess_id()
    ref = create_backbone(f"openclip:anyclass-test-vit@{tmp_path / 'open_clip_model.safetensors'}", "cpu")
    assert torch.equal(bb.encode_texts(TEXTS), ref.encode_texts(TEXTS))
    assert bb.preprocess_id() != ref.preprocess_id()


@pytest.mark.filterwarnings("ignore:.*QuickGELU.*:UserWarning")
def test_download_failure_is_a_clear_error(oc_configs, monkeypatch):
    import open_clip

    def boom(cfg, *a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", boom)
    with pytest.raises(AnyclassError, match=r"could not download open_clip weights ViT-B-32@openai .*network "
                                            r"unreachable.*openclip:ViT-B-32@/path/to/file"):
        create_backbone("openclip:ViT-B-32@openai", "cpu")


def test_hf_identity_and_hash(backbones, hf_dirs, oc_configs):
    a = backbones["hf-clip"]
    b = _make("hf-clip", oc_configs, hf_dirs)
    assert a.identity == b.identity == "hf:clip:local/clip"
    assert a.weights_hash == b.weights_hash != backbones["hf-siglip"].weights_hash
    assert backbones["hf-siglip"].logit_scale == pytest.approx(10.0)


def test_vit_b_32_real_config(oc_configs):
    """One real open_clip architecture (random weights): sizes, preprocessing, both hooks."""
    bb = create_backbone("openclip:ViT-B-32", "cpu")
    assert (bb.embed_dim, bb.text_width, bb.vision_width, bb.vision_layers) == (512, 512, 768, 12)
    assert bb.preprocess_id().startswith("openclip-eval|rgb|resize=shortest:224x224:bicubic")
    assert bb.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)
    imgs = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = bb.encode_images_with_prompts(imgs, [0.02 * torch.randn(2, 768)] * 12)
        assert out.shape == (1, 512) and abs(float(out.norm()) - 1) < 1e-5
        ctx = _placeholder_ctx(bb, 4)
        ref = bb.encode_texts(["X X X X dog."])
        assert (bb.encode_text_with_context(["X X X X dog."], ctx) - ref).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("key", ["oc-vit", "hf-clip", "hf-siglip"])
def test_cuda_matches_cpu_and_autocast_returns_float32(backbones, oc_configs, hf_dirs, key):
    cpu = backbones[key]
    gpu = _make(key, oc_configs, hf_dirs, device="cuda")
    assert gpu.device.type == "cuda" and gpu.weights_hash == cpu.weights_hash
    imgs = _images()
    prompts = [0.05 * torch.randn(2, 48, generator=torch.Generator().manual_seed(8)).requires_grad_(True)]
    out = gpu.encode_images_with_prompts(imgs, prompts)  # CPU inputs/prompts are moved
    assert out.device.type == "cuda"
    assert (out.cpu() - cpu.encode_images_with_prompts(imgs, prompts)).abs().max() < 1e-3
    out.sum().backward()
    assert prompts[0].grad is not None and prompts[0].grad.abs().sum() > 0
    ctx = _placeholder_ctx(cpu, 2)
    t = gpu.encode_text_with_context(TEXTS, ctx)
    assert (t.cpu() - cpu.encode_texts(TEXTS)).abs().max() < 1e-3
    with torch.autocast("cuda", dtype=torch.float16):
        half = gpu.encode_images(imgs.cuda())
    assert half.dtype == torch.float32
    assert torch.allclose(half.norm(dim=-1), torch.ones(3, device="cuda"), atol=1e-3)
