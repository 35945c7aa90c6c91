"""Test-time tuning (TPT, PromptAlign, PromptSync): the batched engine against the
one-image reference loop, episodic independence, robustness, statistics and their checks, the
eval/CLI path — on the mini world's built-in model and tiny random open_clip / HF CLIP."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anyclass.methods import create_method
from anyclass.methods import training as T
from anyclass.methods.tta import (TTAError, avg_entropy, confident, image_seeds, make_views,
                                  prompt_init)
from anyclass.methods.tta_stats import SourceStats, compute_stats
from test_prompt_methods import synthetic, tiny  # noqa: F401  (shared tiny CLIPs + PNGs)

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights.*:UserWarning")

#: small but real: 16 views, the 4 most confident kept
SMALL = dict(n_views=16, ratio=0.25)


@pytest.fixture(scope="module")
def bb(mini_world):
    from anyclass.backbones.factory import create_backbone
    return create_backbone("builtin")


@pytest.fixture(scope="module")
def animals(mini_world):
    from anyclass.data.sources import load_dataset
    train, test = load_dataset("world:animals", "train"), load_dataset("world:animals@sketch", "test")
    return dict(train=train, test=test, names=list(train.classnames))


@pytest.fixture(scope="module")
def x(bb, animals):
    x, _ = T.load_images(bb, animals["test"].subset(range(0, 60, 10)))
    return x                                                              # 6 images


def _saved(name: str, bb, names, path: Path, **kw) -> Path:
    """A prompt file of `name` at its (seeded) initialisation: training is not under test."""
    m = create_method(name, **kw)
    torch.manual_seed(3)
    m.prepare(bb, names)
    with torch.no_grad():                      # move off the init so the file matters
        for p in m.module_.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.save(path)


@pytest.fixture(scope="module")
def files(bb, animals, tmp_path_factory):
    d = tmp_path_factory.mktemp("tta")
    maple = _saved("maple", bb, animals["names"], d / "maple.safetensors", depth=3)
    coop = _saved("coop", bb, animals["names"], d / "coop.safetensors", n_ctx=4, ctx_init="a photo of a")
    vpt = _saved("vpt", bb, animals["names"], d / "vpt.safetensors")
    src = animals["train"].subset(range(0, len(animals["train"]), 4))
    stats = compute_stats(bb, prompt_init(bb, maple), src, 3, "animals/4", progress=False)
    return dict(maple=maple, coop=coop, vpt=vpt, src=src, stats=stats.save(d / "stats.safetensors"),
                dir=d)


def tuner(name, bb, names, files, **kw):
    extra = {"tpt": {}, "promptalign": dict(init=str(files["maple"]), stats=str(files["stats"])),
             "promptsync": dict(init=str(files["maple"]), stats=str(files["stats"]))}[name]
    return create_method(name, **{**SMALL, **extra, **kw}).prepare(bb, names)


# ------------------------------------------------------------------- 1. the loss pieces

def test_confident_and_avg_entropy_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, 7, generator=g) * 3
    p = logits.double().softmax(-1).numpy()
    ent = -(p * np.log(p)).sum(-1)                                        # [3, 20]
    sel = confident(logits, 0.1)
    assert sel.shape == (3, 2)
    assert (sel.numpy() == np.argsort(ent, 1, kind="stable")[:, :2]).all()
    pbar = p[:, :5].mean(1)
    want = -(pbar * np.log(pbar)).sum(-1)
    assert np.allclose(avg_entropy(logits[:, :5]).numpy(), want, atol=1e-5)


def test_views_are_the_image_then_seeded_crops_of_it(x):
    seeds = image_seeds(x, 1)
    v = make_views(x, seeds, 8, (0.3, 1.0))
    assert v.shape == (x.shape[0], 8, *x.shape[1:])
    assert torch.equal(v[:, 0], x)
    assert torch.equal(make_views(x[2:3], seeds[2:3], 8, (0.3, 1.0))[0], v[2])   # alone = in batch
    assert image_seeds(x[2:3], 1) == seeds[2:3]
    assert image_seeds(x, 2) != seeds
    assert not torch.equal(make_views(x, image_seeds(x, 2), 8, (0.3, 1.0)), v)
    assert all(not torch.equal(v[0, i], v[0, 0]) for i in range(1, 8))


def test_augmix_views_are_seeded_and_differ_from_plain_crops(bb, x):
    from anyclass.methods.tta import normalisation
    norm = normalisation(bb)
    assert norm is not None
    seeds = image_seeds(x[:2], 1)
    a = make_views(x[:2], seeds, 4, augmix=True, norm=norm)
    b = make_views(x[:2], seeds, 4, augmix=True, norm=norm)
    plain = make_views(x[:2], seeds, 4)
    assert torch.equal(a, b) and torch.equal(a[:, 0], x[:2])
    assert not torch.equal(a[:, 1:], plain[:, 1:])


# ------------------------------------------------------ 2. batched == the reference loop

@pytest.mark.parametrize("name,init", [("tpt", None), ("tpt", "coop"), ("tpt", "maple"),
                                       ("promptalign", None), ("promptsync", None)])
def test_batched_equals_the_one_image_reference_loop(name, init, bb, animals, files, x):
    kw = {} if init is None else dict(init=str(files[init]))
    m = tuner(name, bb, animals["names"], files, **kw)
    got, ref = m.predict(bb, x), m.tune_reference(bb, x)
    assert torch.allclose(got.logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.logits.argmax(1), ref.logits.argmax(1))
    assert torch.allclose(got.untuned, ref.untuned, atol=1e-4)
    assert not got.failed.any()
    assert (got.logits - got.untuned).abs().max() > 1e-3                 # tuning did something


@pytest.mark.parametrize("batched", [True, False])
def test_shared_first_step_gives_each_image_its_own_gradient(batched, bb, animals, files, monkeypatch):
    """One forward at θ_0 pulled back with B cotangents = B separate forward+backward passes,
    by vmap or (an encoder op without a batching rule) one backward per image."""
    from anyclass.methods.tta import batched_params, shared_vjp, text_features, text_params
    init = prompt_init(bb, files["maple"])
    names = animals["names"]
    if not batched:
        grad = torch.autograd.grad

        def no_vmap(*a, **kw):
            if kw.get("is_grads_batched"):
                raise RuntimeError("vmap: no batching rule")
            return grad(*a, **kw)
        monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    one = text_params(batched_params(init, 1, "cpu", True, False))
    t0 = text_features(bb, init, one, names)
    cot = torch.randn(3, *t0.shape[1:], generator=torch.Generator().manual_seed(0))
    got = shared_vjp(t0, one, cot)
    for b in range(3):
        mine = text_params(batched_params(init, 1, "cpu", True, False))
        want = torch.autograd.grad((text_features(bb, init, mine, names) * cot[b]).sum(),
                                   list(mine.values()))
        for k, w in zip(mine, want):
            assert torch.allclose(got[k][b], w[0], atol=1e-6), (k, b)
    assert set(got) == {"ctx", "deep0", "deep1"}


@pytest.mark.parametrize("name", ["tpt", "promptsync"])
def test_result_does_not_depend_on_batch_size_order_or_neighbours(name, bb, animals, files, x):
    m = tuner(name, bb, animals["names"], files)
    full = m.predict(bb, x).logits
    m.set_params(batch_size=4)
    rev = m.predict(bb, x.flip(0)).logits.flip(0)
    assert torch.allclose(full, rev, atol=1e-5)
    m.set_params(batch_size=None)
    other = torch.cat([x[:1], x[1:].flip(-1)])                          # same first image
    assert torch.allclose(m.predict(bb, other).logits[0], full[0], atol=1e-5)


def test_zero_steps_is_zero_shot_with_the_starting_prompt(bb, animals, files, x):
    from anyclass.methods.prompt_parts import context_template, texts_for
    m = tuner("tpt", bb, animals["names"], files, init=str(files["coop"]), steps=0)
    init = prompt_init(bb, files["coop"])
    t = bb.encode_text_with_context(texts_for(context_template(4, "a photo of a"), animals["names"]),
                                    init.ctx)
    want = bb.logit_scale * bb.encode_images(x) @ t.t()
    r = m.predict(bb, x)
    assert torch.allclose(r.logits, want.detach(), atol=1e-4) and torch.equal(r.logits, r.untuned)


def test_one_tpt_step_is_adamw_on_the_confident_views_entropy(bb, animals, files, x):
    """Independent of the engine: views, filter, loss and AdamW's first step written out."""
    from anyclass.methods.prompt_parts import context_template, texts_for
    m = tuner("tpt", bb, animals["names"], files, lr=0.01)
    init = prompt_init(bb, None)
    xi = x[:1]
    views = make_views(xi, image_seeds(xi, 1), 16)[0]
    with torch.no_grad():
        f = bb.encode_images(views)
    texts = texts_for(context_template(4, "a photo of a"), animals["names"])
    ctx = init.ctx.clone().requires_grad_(True)
    logits = bb.logit_scale * f @ bb.encode_text_with_context(texts, ctx).t()
    ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    keep = ent.detach().argsort(stable=True)[:4]
    p = logits[keep].softmax(1).mean(0)
    (-(p * p.log()).sum()).backward()
    g = ctx.grad
    new = init.ctx * (1 - 0.01 * 0.01) - 0.01 * g / (g.abs() + 1e-8)       # AdamW step 1
    with torch.no_grad():
        want = bb.logit_scale * f[:1] @ bb.encode_text_with_context(texts, new).t()
    assert torch.allclose(m.predict(bb, xi).logits, want, atol=1e-4)


# ----------------------------------------------------------------- 3. robustness

def test_a_non_finite_loss_falls_back_for_that_image_only(bb, animals, files, x):
    m = tuner("promptsync", bb, animals["names"], files)
    clean = m.predict(bb, x)
    orig = m.extra_loss

    def poisoned(step):
        terms = orig(step)
        bad = torch.zeros(step.logits.shape[0])
        bad[1] = float("nan")
        return {**terms, "poison": bad}
    m.extra_loss = poisoned
    r = m.predict(bb, x)
    assert r.failed.tolist() == [False, True] + [False] * (len(x) - 2)
    assert torch.equal(r.logits[1], r.untuned[1])
    keep = [0] + list(range(2, len(x)))
    assert torch.allclose(r.logits[keep], clean.logits[keep], atol=1e-5)


def test_fewer_views_than_the_filter_keeps_is_refused_at_start(bb, animals, files):
    with pytest.raises(TTAError, match=r"n_views=5 with confidence ratio 0.1 keeps no view"):
        create_method("tpt", n_views=5).prepare(bb, animals["names"])


def test_bad_starting_points_and_missing_statistics_are_named(bb, animals, files):
    with pytest.raises(TTAError, match="not from a 'vpt' file"):
        create_method("tpt", init=str(files["vpt"])).prepare(bb, animals["names"])
    with pytest.raises(TTAError, match="start it from a MaPLe prompt file"):
        create_method("promptalign", stats=str(files["stats"])).prepare(bb, animals["names"])
    with pytest.raises(TTAError, match="pass stats=FILE"):
        create_method("promptalign", init=str(files["maple"])).prepare(bb, animals["names"])


# ----------------------------------------------------------------- 4. statistics

def test_statistics_match_an_independent_computation(bb, files):
    st = SourceStats.load(files["stats"])
    init = prompt_init(bb, files["maple"])
    x, y = T.load_images(bb, files["src"])
    vp = [F.linear(p, w, b) for p, (w, b) in zip([init.ctx, *init.deep], init.couple)]
    with torch.no_grad():
        f, lay = bb.encode_images_with_layer_inputs(x, [v.expand(len(x), -1, -1) for v in vp])
    h = torch.stack(lay[:3]).double()                                    # [L, N, T, W]
    assert torch.allclose(st.mean.double(), h.mean(1), atol=1e-5)
    assert torch.allclose(st.var.double(), h.var(1, unbiased=False), atol=1e-4)
    for c in (0, 3):
        hc = h[:, y == c]                                                 # [L, n_c, T, W]
        assert torch.allclose(st.class_mean[c].double(), hc.mean((1, 2)), atol=1e-5)
        assert torch.allclose(st.class_var[c].double(), hc.var((1, 2), unbiased=False), atol=1e-4)
        assert torch.allclose(st.class_feat[c], F.normalize(f[y == c].mean(0), dim=0), atol=1e-5)
        assert int(st.class_count[c]) == int((y == c).sum())


def test_statistics_for_another_prompt_file_or_backbone_are_refused(bb, animals, files, tmp_path):
    other = _saved("maple", bb, animals["names"], tmp_path / "other.safetensors", depth=3)
    with pytest.raises(TTAError, match="computed for prompts file:.* not for the prompts being tuned"):
        create_method("promptalign", init=str(other), stats=str(files["stats"])).prepare(bb, animals["names"])
    st = SourceStats.load(files["stats"])
    st.backbone_identity = "openclip:ViT-B-16"
    st.save(tmp_path / "foreign.safetensors")
    with pytest.raises(TTAError, match="computed on backbone openclip:ViT-B-16"):
        create_method("promptalign", init=str(files["maple"]),
                      stats=str(tmp_path / "foreign.safetensors")).prepare(bb, animals["names"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(TTAError, match="junk.safetensors is not a safetensors test-time statistics file"):
        SourceStats.load(tmp_path / "junk.safetensors")


def test_promptsync_names_a_class_the_source_lacks(bb, animals, files):
    names = animals["names"][:3] + ["unicorn"]
    with pytest.raises(TTAError, match=r"no prototype for 1 class\(es\) of the task: unicorn"):
        tuner("promptsync", bb, names, files)
    tuner("promptalign", bb, names, files)                    # class-agnostic: fine


def test_promptsync_terms_switch_off(bb, animals, files, x):
    from anyclass.methods.tta import Step
    m = tuner("promptsync", bb, animals["names"], files)
    k, d = len(animals["names"]), bb.embed_dim
    lay = [torch.randn(2, 4, 19, bb.vision_width) for _ in range(3)]
    step = Step(torch.randn(2, 4, k), torch.randn(2, k), F.normalize(torch.randn(2, 4, d), dim=-1), lay)
    assert set(m.extra_loss(step)) == {"align", "disc"}
    m.set_params(disc=0.0)
    assert set(m.extra_loss(step)) == {"align"}
    m.set_params(class_aware=False)                  # PromptAlign's class-agnostic alignment
    assert torch.allclose(m.extra_loss(step)["align"], m.beta * m.global_alignment(step))



def test_alignment_and_discrimination_terms_match_a_numpy_loop(bb, animals, files):
    """PromptAlign's and PromptSync's loss terms against the formulas of docs/methods.md,
    written as plain loops over images, layers and classes in float64."""
    from anyclass.methods.tta import Step
    g = torch.Generator().manual_seed(3)
    k, d, n, t = len(animals["names"]), bb.embed_dim, 4, 19
    lay = [torch.randn(2, n, t, bb.vision_width, generator=g) for _ in range(3)]
    lg, lg0 = torch.randn(2, n, k, generator=g), torch.randn(2, k, generator=g)
    step = Step(lg, lg0, F.normalize(torch.randn(2, n, d, generator=g), dim=-1), lay)
    L = [x.double().numpy() for x in lay]
    pa = tuner("promptalign", bb, animals["names"], files)
    mean, var = pa.stats_.mean.double().numpy(), pa.stats_.var.double().numpy()
    want = [pa.beta * np.mean([0.5 * np.abs(h[b].mean(0) - mean[l]).mean()
                               + 0.5 * np.abs(h[b].var(0) - var[l]).mean()
                               for l, h in enumerate(L)]) for b in range(2)]
    np.testing.assert_allclose(pa.extra_loss(step)["align"].double().numpy(), want, rtol=1e-4)

    ps = tuner("promptsync", bb, animals["names"], files)
    cm, cv, cf = (x.double().numpy() for x in ps.protos_)
    got = ps.extra_loss(step)
    for b in range(2):
        both = np.concatenate([lg0[b:b + 1].double().numpy(), lg[b].double().numpy()])
        e = np.exp(both - both.max(1, keepdims=True))
        p_bar = (e / e.sum(1, keepdims=True)).mean(0)
        pooled = [h[b].reshape(n * t, -1) for h in L]
        dist = [np.mean([0.5 * np.abs(x.mean(0) - cm[c, l]).mean()
                         + 0.5 * np.abs(x.var(0) - cv[c, l]).mean()
                         for l, x in enumerate(pooled)]) for c in range(k)]
        assert got["align"][b].item() == pytest.approx(ps.beta * float(p_bar @ dist), rel=1e-4)
        z = step.feats[b].double().numpy().mean(0)
        z = z / np.linalg.norm(z)
        sims = cf @ z / ps.tau
        ce = -(sims[p_bar.argmax()] - sims.max() - np.log(np.exp(sims - sims.max()).sum()))
        assert got["disc"][b].item() == pytest.approx(ps.disc * ce, rel=1e-4)


# ------------------------------------------------------------ 5. other backbones

@pytest.mark.parametrize("which", ["oc-vit", "hf-clip"])
def test_layer_inputs_on_open_clip_and_hf_include_the_prompts(which, tiny):
    bb = tiny[which]
    x = torch.randn(2, 3, 32, 32)                                         # the tiny CLIPs' size
    p = [torch.randn(2, bb.vision_width) * 0.1 for _ in range(2)]
    f, lay = bb.encode_images_with_layer_inputs(x, p, layers=2)
    assert len(lay) == 2 and lay[0].shape[0] == 2
    n_plain = bb.encode_images_with_layer_inputs(x, None, layers=1)[1][0].shape[1]
    assert lay[0].shape[1] == n_plain + 2
    assert torch.allclose(lay[0][:, 1:3], p[0].expand(2, -1, -1))        # after the class token
    assert torch.allclose(f, bb.encode_images_with_prompts(x, p), atol=1e-5)


@pytest.mark.parametrize("which", ["oc-vit", "hf-clip"])
def test_promptsync_runs_on_open_clip_and_hf(which, tiny, synthetic, tmp_path):
    bb = tiny[which]
    names = list(synthetic.classnames)
    maple = _saved("maple", bb, names, tmp_path / "m.safetensors", depth=2, ctx_init=None)
    st = compute_stats(bb, prompt_init(bb, maple), synthetic, 2, "synthetic", progress=False)
    st.save(tmp_path / "s.safetensors")
    m = create_method("promptsync", init=str(maple), stats=str(tmp_path / "s.safetensors"), layers=2,
                      **SMALL).prepare(bb, names)
    xs, _ = T.load_images(bb, synthetic)
    got, ref = m.predict(bb, xs[:3]), m.tune_reference(bb, xs[:3])
    assert torch.allclose(got.logits, ref.logits, atol=1e-4) and not got.failed.any()


# ------------------------------------------------------------ 6. eval and CLI

@pytest.mark.parametrize("name,dataset,given,want", [
    ("tpt", "world:animals", None, True), ("tpt", "world:animals@sketch", None, True),
    ("tpt", "world:source", None, False), ("tpt", "world:source@rendition", None, False),
    ("tpt", "world:animals", False, False), ("tpt", "world:source@v2", True, True),
    ("promptalign", "world:animals", None, False), ("promptsync", "world:animals", None, False),
    ("promptsync", "world:animals", True, True)])
def test_augmix_follows_each_reference_code_unless_set(name, dataset, given, want, bb, files):
    """TPT's code augments its fine-grained sets, not ImageNet or its variants; PromptAlign's
    never; an explicit value wins."""
    from anyclass.eval.tta import world_defaults
    extra = {} if name == "tpt" else dict(init=str(files["maple"]), stats=str(files["stats"]))
    m = create_method(name, **extra, **({} if given is None else dict(augmix=given)))
    assert m.augmix is given
    world_defaults(m, dataset, bb, ["cat", "dog"], 1, progress=False)
    assert m.augmix is want


def test_eval_and_cli_on_the_world_with_no_further_flags(mini_world, monkeypatch, tmp_path, capsys):
    """`anyclass eval --method promptsync` builds and caches the source MaPLe and statistics,
    and a decoding failure mid-run is warned about, skipped and counted."""
    import anyclass.eval.tta as E
    from anyclass.cli.main import main
    monkeypatch.setattr(E, "WORLD_MAPLE", dict(depth=3, epochs=1, warmup_epochs=0, batch_size=32, lr=0.02,
                                               crop_scale=[0.5, 1.0], select="last"))
    monkeypatch.setattr(E, "_home", lambda: tmp_path / "tta")
    out = tmp_path / "r.json"
    argv = ["eval", "--dataset", "world:hearts@sketch", "--method", "promptsync", "--hparam",
            "n_views=16", "--hparam", "ratio=0.25", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["tta"]["failed_images"] == 0 and res["num_images"] > 0
    assert Path(res["tta"]["init"]).exists() and Path(res["tta"]["stats"]).exists()
    made = sorted(p.name for p in (tmp_path / "tta").rglob("*.safetensors"))
    assert main(argv) == 0                                         # cached: nothing rebuilt
    assert sorted(p.name for p in (tmp_path / "tta").rglob("*.safetensors")) == made
    assert json.loads(out.read_text())["metrics"] == res["metrics"]
    # the CLI's stats command writes what the eval path computed for the same source
    st = tmp_path / "cli.safetensors"
    assert main(["tta", "stats", "--source", "world:source", "--prompts", res["tta"]["init"],
                 "--out", str(st), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out


def test_a_test_image_that_fails_to_decode_is_skipped_and_counted(bb, animals, files, tmp_path):
    from anyclass.data.base import LabeledImages
    from anyclass.eval.tta import tta_predict
    ds = animals["test"].subset(range(0, 30, 10))
    bad = tmp_path / "broken.png"
    bad.write_bytes(Path(ds.paths[0]).read_bytes()[:40])
    mixed = LabeledImages("mixed", [ds.paths[0], str(bad), *ds.paths[1:]],
                          [ds.labels[0], 0, *ds.labels[1:]], list(ds.classnames))
    m = tuner("tpt", bb, animals["names"], files)
    with pytest.warns(UserWarning, match="broken.png"):
        logits, _, failed, idx = tta_predict(m, bb, mixed, progress=False)
    assert idx.tolist() == [0, 2, 3] and logits.shape[0] == 3 and not failed.any()


def test_an_interrupted_run_resumes_where_it_stopped(bb, animals, files, tmp_path):
    from anyclass.eval.tta import tta_predict
    ds = animals["test"].subset(range(0, 60, 10))
    m = tuner("tpt", bb, animals["names"], files, batch_size=2)
    whole = tta_predict(m, bb, ds, progress=False)
    ckpt = tmp_path / "partial.safetensors"
    real, calls = m.predict, []

    def dies_on_third(backbone, x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(backbone, x)
    m.predict = dies_on_third
    with pytest.raises(KeyboardInterrupt):
        tta_predict(m, bb, ds, progress=False, checkpoint=ckpt, every_s=0)
    assert ckpt.exists()
    calls.clear()
    m.predict = lambda backbone, x: (calls.append(len(x)), real(backbone, x))[1]
    again = tta_predict(m, bb, ds, progress=False, checkpoint=ckpt, every_s=0)
    assert calls == [2]                                   # only the last 2 of 6 images
    assert not ckpt.exists()
    for a, b in zip(whole, again):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
