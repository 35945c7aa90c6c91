"""Prompt-learning methods (CoOp, CoCoOp, VPT, MaPLe, APEX), their one training loop and
`eval.fitting`: behaviour on the built-in model (mini world) and on tiny random-weight
open_clip / Hugging Face CLIP models, checked against independent computations."""
from __future__ import annotations

import json
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from anyclass.data.base import LabeledImages
from anyclass.data.fewshot import base_new_split, sample_few_shot
from anyclass.errors import AnyclassError
from anyclass.methods import cocoop as cocoop_mod
from anyclass.methods import create_method
from anyclass.methods import training as T
from anyclass.methods.apex import ensemble_weights
from anyclass.methods.prompt_parts import image_features
from anyclass.methods.prompted import PromptFileError, PromptMethod, load_prompts, read_prompt_file
from toys import clip_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights.*:UserWarning")

METHOD_NAMES = ["coop", "cocoop", "vpt", "maple", "apex"]
#: one short epoch at the full learning rate (no warm-up), small batches
FAST = dict(epochs=1, batch_size=5, warmup_epochs=0)
EXTRA = {"coop": dict(n_ctx=4)}


def make(name: str, **kw) -> PromptMethod:
    return create_method(name, **{**FAST, **EXTRA.get(name, {}), **kw})


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def init_state(name: str, bb, names, **kw) -> dict[str, torch.Tensor]:
    """The module a fit starts from (the loop seeds torch, then calls prepare)."""
    m = make(name, **kw)
    torch.manual_seed(m.seed)
    m.prepare(bb, names)
    return state(m.module_)


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def bb(mini_world):
    from anyclass.backbones.factory import create_backbone
    return create_backbone("builtin")


@pytest.fixture(scope="module")
def animals(mini_world):
    from anyclass.data.sources import load_dataset
    train, val, test = (load_dataset("world:animals", s) for s in ("train", "val", "test"))
    return dict(full=train, train=sample_few_shot(train, 2, 1), val=val.subset(range(0, 20, 2)),
                test=test, names=list(train.classnames))


@pytest.fixture(scope="module")
def x_test(bb, animals):
    """8 preprocessed test images of several classes."""
    x, _ = T.load_images(bb, animals["test"].subset(range(0, 60, 8)))
    return x


@pytest.fixture(scope="module")
def fitted(bb, animals):
    """Each method fitted once (1 epoch, 2 shots); the backbone's state before and after."""
    before = state(bb.model)
    out = {}
    for name in METHOD_NAMES:
        m = make(name)
        out[name] = (m, m.fit(bb, animals["train"], animals["val"], progress=False))
    return dict(methods=out, before=before, after=state(bb.model))


# ------------------------------------------------------------- 1. every method on the builtin

@pytest.mark.parametrize("name", METHOD_NAMES)
def test_fit_learns_only_its_module_and_is_deterministic(name, fitted, bb, animals, x_test):
    m, ret = fitted["methods"][name]
    assert ret is m
    before, after = fitted["before"], fitted["after"]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the backbone changed"
    assert all(not p.requires_grad for p in bb.model.parameters())
    init = init_state(name, bb, animals["names"])
    learned = state(m.module_)
    assert init.keys() == learned.keys() and len(learned) > 0
    unchanged = [k for k in init if torch.equal(init[k], learned[k])]
    assert not unchanged, f"{name}: tensors never trained: {unchanged}"
    assert m.n_learned() == sum(v.numel() for v in learned.values())
    logits = m.predict_logits(bb, x_test)
    assert logits.shape == (len(x_test), 10) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert m.classnames_ == animals["names"] and m.backbone_identity_ == bb.identity
    assert [h["epoch"] for h in m.history_] == [1] and m.chosen_["epoch"] == 1
    # the same seed gives bit-identical learned tensors; another seed does not
    again = make(name).fit(bb, animals["train"], animals["val"], progress=False)
    assert all(torch.equal(learned[k], v) for k, v in state(again.module_).items())
    assert torch.equal(again.predict_logits(bb, x_test), logits)


def test_other_seed_gives_other_prompts(bb, animals, fitted):
    m = make("vpt", seed=2).fit(bb, animals["train"], animals["val"], progress=False)
    ref = fitted["methods"]["vpt"][0]
    assert not torch.equal(m.module_.prompts[0], ref.module_.prompts[0])


# ------------------------------------------------------------- 2. tiny open_clip / HF CLIP

TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)
VISION = dict(image_size=32, layers=3, width=48, head_width=16, patch_size=8)
TINY = ["oc-vit", "hf-clip"]




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from anyclass.backbones.factory import create_backbone
    d = tmp_path_factory.mktemp("tiny")
    (d / "cfg").mkdir()
    (d / "cfg" / "anyclass-ptest-vit.json").write_text(
        json.dumps({"embed_dim": 24, "vision_cfg": VISION, "text_cfg": TEXT}))
    open_clip.add_model_config(d / "cfg")
    tc = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=16)
    vc = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=3)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CLIPModel(CLIPConfig(text_config=tc, vision_config=vc, projection_dim=24)).save_pretrained(d / "hf")
        clip_tokenizer().save_pretrained(d / "hf")
        CLIPImageProcessor(size={"shortest_edge": 32},
                           crop_size={"height": 32, "width": 32}).save_pretrained(d / "hf")
        return {"oc-vit": create_backbone("openclip:anyclass-ptest-vit", "cpu"),
                "hf-clip": create_backbone(f"hf:{d / 'hf'}", "cpu")}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """6 PNGs of 2 classes (reddish / bluish noise) and a LabeledImages over them."""
    d = tmp_path_factory.mktemp("pngs")
    rs = np.random.RandomState(0)
    paths, labels = [], []
    for i in range(6):
        a = rs.randint(0, 120, size=(40, 44, 3)).astype(np.uint8)
        a[..., 0 if i % 2 == 0 else 2] += 130
        p = d / f"img{i}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
        labels.append(i % 2)
    return LabeledImages("synthetic", paths, labels, ["red square", "blue circle"], meta={"root": str(d)})


@pytest.mark.parametrize("which", TINY)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_each_method_fits_on_tiny_random_clip(name, which, tiny, synthetic):
    bb = tiny[which]
    names = synthetic.classnames
    before = state(bb.model)
    m = make(name, batch_size=3, select="last")
    init = init_state(name, bb, names, batch_size=3, select="last")
    assert m.fit(bb, synthetic, None, progress=False) is m
    after = state(bb.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    learned = state(m.module_)
    assert [k for k in init if torch.equal(init[k], learned[k])] == []
    x, _ = T.load_images(bb, synthetic)
    logits = m.predict_logits(bb, x)
    assert logits.shape == (6, 2) and torch.isfinite(logits).all()
    assert m.chosen_ == {"epoch": 1, "val_acc1": None, "select": "last"}
    assert m.history_[0]["epoch"] == 1 and "val_acc1" not in m.history_[0]


# ------------------------------------------------------------- 3. save / load

@pytest.mark.parametrize("name", METHOD_NAMES)
def test_save_load_round_trip(name, fitted, bb, animals, x_test, tmp_path):
    m = fitted["methods"][name][0]
    path = m.save(tmp_path / f"{name}.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "anyclass-prompts" and meta["method"] == name
    assert meta["backbone_identity"] == bb.identity and meta["backbone_weights_hash"] == bb.weights_hash
    assert json.loads(meta["classnames"]) == animals["names"]
    assert keys == set(m.module_.state_dict())
    loaded = load_prompts(path, bb, animals["names"])
    assert type(loaded) is type(m) and loaded.get_params() == json.loads(json.dumps(m.get_params()))
    assert torch.equal(loaded.predict_logits(bb, x_test), m.predict_logits(bb, x_test))
    assert torch.equal(load_prompts(path, bb).predict_logits(bb, x_test), m.predict_logits(bb, x_test))


@pytest.fixture(scope="module")
def coop_file(fitted, tmp_path_factory):
    return fitted["methods"]["coop"][0].save(tmp_path_factory.mktemp("pf") / "coop.safetensors")


def test_load_refuses_another_backbone(coop_file, bb, tiny, fitted, x_test):
    from anyclass.backbones.builtin import BuiltinCLIP
    other = tiny["oc-vit"]
    with pytest.raises(PromptFileError) as e:
        load_prompts(coop_file, other)
    assert bb.identity in str(e.value) and other.identity in str(e.value)
    # same architecture, other weights: named by both weight hashes
    rehashed = BuiltinCLIP(bb.model, bb.identity, "ab" * 32)
    with pytest.raises(PromptFileError, match="abababab") as e:
        load_prompts(coop_file, rehashed)
    assert bb.weights_hash[:16] in str(e.value)
    with pytest.raises(PromptFileError, match="learned on"):
        fitted["methods"]["coop"][0].predict_logits(rehashed, x_test)


def test_load_refuses_other_classes_unless_allowed(coop_file, bb, animals, fitted, x_test):
    names = animals["names"]
    new = names[:5] + ["zebra", "giraffe"]
    with pytest.raises(PromptFileError, match="zebra") as e:
        load_prompts(coop_file, bb, new)
    assert "allow_new_classes" in str(e.value)
    with pytest.raises(PromptFileError, match="in order"):
        load_prompts(coop_file, bb, names[::-1])
    m = load_prompts(coop_file, bb, new, allow_new_classes=True)
    assert m.classnames_ == names
    logits = m.predict_logits(bb, x_test, new)
    assert logits.shape == (len(x_test), 7) and torch.isfinite(logits).all()
    ref = fitted["methods"]["coop"][0].predict_logits(bb, x_test)
    # CoOp scores each class on its own: the shared classes keep their logits
    assert torch.allclose(logits[:, :5], ref[:, :5], atol=1e-5)
    assert not torch.allclose(logits[:, 5], logits[:, 6])


def test_load_refuses_pickles_and_foreign_files(coop_file, bb, tmp_path):
    p = tmp_path / "torch.safetensors"
    torch.save({"ctx": torch.zeros(4, 384)}, p)
    with pytest.raises(PromptFileError, match="never unpickles"):
        load_prompts(p, bb)
    p = tmp_path / "pickle.safetensors"
    p.write_bytes(pickle.dumps({"ctx": [0.0] * 4}, protocol=2))
    with pytest.raises(PromptFileError, match="never unpickles"):
        read_prompt_file(p)
    p = tmp_path / "random.safetensors"
    data = np.random.RandomState(0).bytes(512)
    assert data[0] != 0x80
    p.write_bytes(data)
    with pytest.raises(PromptFileError, match="not a safetensors prompt file"):
        load_prompts(p, bb)
    p = tmp_path / "truncated.safetensors"
    p.write_bytes(coop_file.read_bytes()[:-100])
    with pytest.raises(PromptFileError, match="not a safetensors prompt file"):
        load_prompts(p, bb)
    p = tmp_path / "foreign.safetensors"
    save_file({"ctx": torch.zeros(4, 384)}, str(p))
    with pytest.raises(PromptFileError, match="not an anyclass prompt file"):
        load_prompts(p, bb)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "missing.safetensors", bb)


def test_a_prompt_file_whose_first_byte_is_0x80_is_not_taken_for_a_pickle(tmp_path):
    """safetensors starts with its header length (u64, little-endian): 0x80 is a legal first
    byte, the same as a pickle's protocol marker."""
    p = tmp_path / "p.safetensors"
    for pad in range(300):
        save_file({"ctx": torch.ones(2, 3)}, str(p), metadata={"format": "anyclass-prompts", "pad": "x" * pad})
        if p.read_bytes()[0] == 0x80:
            break
    assert p.read_bytes()[0] == 0x80
    sd, meta = read_prompt_file(p)
    assert torch.equal(sd["ctx"], torch.ones(2, 3)) and meta["format"] == "anyclass-prompts"


# ------------------------------------------------------------- 4. the loop

def counting(m: PromptMethod, fail_after: int | None = None, how: str = "interrupt"):
    """Wrap m.forward: count training-mode calls; from call fail_after + 1 on, interrupt or
    return NaN logits."""
    calls = {"train": 0, "eval": 0}
    orig = m.forward

    def forward(backbone, images, classes):
        if not m.module_.training:
            calls["eval"] += 1
            return orig(backbone, images, classes)
        calls["train"] += 1
        if fail_after is not None and calls["train"] > fail_after:
            if how == "interrupt":
                raise KeyboardInterrupt
            return orig(backbone, images, classes) * float("nan")
        return orig(backbone, images, classes)
    m.forward = forward
    return calls


STEPS = 4                       # 20 two-shot images, batch 5
LOOP = dict(epochs=2, batch_size=5, warmup_epochs=1, lr=0.05)


@pytest.fixture(scope="module")
def vpt_two_epochs(bb, animals):
    m = make("vpt", **LOOP)
    calls = counting(m)
    m.fit(bb, animals["train"], animals["val"], progress=False)
    assert calls["train"] == 2 * STEPS
    return m


def test_interrupted_fit_resumes_from_its_checkpoint(bb, animals, vpt_two_epochs, tmp_path):
    ckpt = tmp_path / "vpt.ckpt"
    m = make("vpt", **LOOP)
    counting(m, fail_after=STEPS, how="interrupt")
    with pytest.raises(KeyboardInterrupt):
        m.fit(bb, animals["train"], animals["val"], checkpoint=ckpt, progress=False)
    _, meta = T.load_checkpoint(ckpt)
    assert meta["progress"]["epoch"] == 1 and len(meta["progress"]["history"]) == 1
    again = make("vpt", **LOOP)
    calls = counting(again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # resumed, not "starting afresh"
        again.fit(bb, animals["train"], animals["val"], checkpoint=ckpt, progress=False)
    assert calls["train"] == STEPS, "the rerun must do only the remaining epoch"
    ref = vpt_two_epochs
    assert all(torch.equal(v, ref.module_.state_dict()[k]) for k, v in again.module_.state_dict().items())
    assert again.history_ == ref.history_ and again.chosen_ == ref.chosen_
    # a checkpoint of another fit (other hyperparameters) is not resumed
    other = make("vpt", **{**LOOP, "lr": 0.01})
    calls = counting(other)
    with pytest.warns(UserWarning, match="another fit"):
        other.fit(bb, animals["train"], animals["val"], checkpoint=ckpt, progress=False)
    assert calls["train"] == 2 * STEPS


def test_fit_interrupted_inside_an_epoch_resumes_at_that_step(bb, animals, vpt_two_epochs, tmp_path):
    ckpt = tmp_path / "vpt.ckpt"
    m = make("vpt", **LOOP)
    counting(m, fail_after=STEPS + 2, how="interrupt")     # dies at epoch 2, step 3
    with pytest.raises(KeyboardInterrupt):
        m.fit(bb, animals["train"], animals["val"], checkpoint=ckpt, progress=False,
              checkpoint_every=0.0)                         # a checkpoint after every step
    sd, meta = T.load_checkpoint(ckpt)
    assert (meta["progress"]["epoch"], meta["progress"]["step"]) == (1, 2)
    assert sorted(sd["rng.perm"].tolist()) == list(range(len(animals["train"])))
    again = make("vpt", **LOOP)
    calls = counting(again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.fit(bb, animals["train"], animals["val"], checkpoint=ckpt, progress=False)
    assert calls["train"] == STEPS - 2, "only the epoch's remaining steps are run"
    ref = vpt_two_epochs                                    # bit-identical to no interruption
    assert all(torch.equal(v, ref.module_.state_dict()[k]) for k, v in again.module_.state_dict().items())
    assert again.history_ == ref.history_ and again.chosen_ == ref.chosen_


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
        bb, animals, vpt_two_epochs, tmp_path):
    ckpt = tmp_path / "vpt.ckpt"
    m = make("vpt", **LOOP)
    counting(m, fail_after=STEPS, how="nan")
    with pytest.raises(T.NaNLossError) as e:
        m.fit(bb, animals["train"], animals["val"], checkpoint=ckpt, progress=False)
    msg = str(e.value)
    assert "epoch 2" in msg and f"lr={LOOP['lr']}" in msg and str(ckpt) in msg
    sd, meta = T.load_checkpoint(ckpt)
    assert meta["progress"]["epoch"] == 1
    redo = make("vpt", **LOOP)
    calls = counting(redo)
    redo.fit(bb, animals["train"], animals["val"], checkpoint=ckpt, progress=False)
    assert calls["train"] == STEPS
    assert all(torch.equal(v, vpt_two_epochs.module_.state_dict()[k])
               for k, v in redo.module_.state_dict().items())


def test_lr_schedule_is_applied_per_epoch(vpt_two_epochs):
    lrs = [h["lr"] for h in vpt_two_epochs.history_]
    assert lrs == [1e-5, 0.5 * 0.05 * (1 + math.cos(math.pi / 2))]


def test_chosen_epoch_is_the_argmax_of_val_accuracy_and_its_state(bb, animals, monkeypatch):
    scores = iter([0.2, 0.5, 0.5, 0.3])
    snapshots = []

    def fake_accuracy(method, backbone, x, y, classnames, batch_size=256):
        snapshots.append(state(method.module_))
        return next(scores)
    monkeypatch.setattr(T, "accuracy", fake_accuracy)
    m = make("vpt", **{**LOOP, "epochs": 4}).fit(bb, animals["train"], animals["val"], progress=False)
    assert [h["val_acc1"] for h in m.history_] == [0.2, 0.5, 0.5, 0.3]
    assert m.chosen_ == {"epoch": 2, "val_acc1": 0.5, "select": "val"}      # first best
    assert all(torch.equal(v, snapshots[1][k]) for k, v in state(m.module_).items())
    assert not torch.equal(snapshots[1]["prompts.0"], snapshots[3]["prompts.0"])
    # select="last" keeps the last epoch, and scores no val (it has nothing to choose)
    scores = iter([0.1, 0.9])
    snapshots.clear()
    by_val = make("vpt", **LOOP).fit(bb, animals["train"], animals["val"], progress=False)
    assert by_val.chosen_["epoch"] == 2 and len(snapshots) == 2
    snapshots.clear()
    m = make("vpt", **{**LOOP, "select": "last"}).fit(bb, animals["train"], animals["val"], progress=False)
    assert m.chosen_ == {"epoch": 2, "val_acc1": None, "select": "last"} and snapshots == []
    assert all("val_acc1" not in h for h in m.history_) and m.recipe_["val_images"] == 0
    assert all(torch.equal(v, by_val.module_.state_dict()[k]) for k, v in state(m.module_).items())


def test_real_val_selection_matches_history(bb, animals):
    m = make("coop", epochs=3, lr=0.5, warmup_epochs=0).fit(bb, animals["train"], animals["val"],
                                                           progress=False)
    acc = [h["val_acc1"] for h in m.history_]
    assert len(acc) == 3 and m.chosen_["epoch"] == int(np.argmax(acc)) + 1
    assert m.chosen_["val_acc1"] == max(acc)
    # the recorded val accuracy is the accuracy of the chosen state, recomputed here
    x, y = T.load_images(bb, animals["val"])
    pred = m.predict_logits(bb, x).argmax(1)
    assert float((pred == y).float().mean()) == pytest.approx(max(acc))


def test_fit_on_never_reads_the_test_split(bb, monkeypatch):
    import anyclass.data.sources as sources
    from anyclass.eval import fitting
    real = sources.load_dataset
    seen = []

    def guarded(spec, split="test"):
        seen.append(split)
        if split == "test":
            raise AssertionError("fit read the test split")
        return real(spec, split)
    monkeypatch.setattr(fitting, "load_dataset", guarded)
    monkeypatch.setattr(sources, "load_dataset", guarded)
    f = fitting.fit_on("vpt", bb, "world:animals", shots=1, seed=1, hparams=FAST, progress=False)
    assert sorted(set(seen)) == ["train", "val"]
    assert f.info["val_images"] == 20 and f.info["train_images"] == 10
    assert f.info["chosen"]["select"] == "val"


def test_empty_val_with_val_selection_is_refused(bb, animals):
    empty = LabeledImages("world:animals/val", [], [], animals["names"])
    for val in (empty, None):
        with pytest.raises(AnyclassError, match="val"):
            make("vpt").fit(bb, animals["train"], val, progress=False)
    with pytest.raises(AnyclassError, match="select must be"):
        make("vpt", select="best").fit(bb, animals["train"], animals["val"], progress=False)


def test_class_without_training_images_is_named(bb, animals):
    tr = animals["train"]
    names = animals["names"]
    no_snail = tr.subset([i for i, y in enumerate(tr.labels) if y != 2])
    with pytest.raises(AnyclassError, match=repr(names[2])):
        make("vpt").fit(bb, no_snail, animals["val"], progress=False)


def test_too_few_images_warns_naming_the_class_and_fitting_goes_on(bb, animals):
    full = animals["full"]
    names = animals["names"]
    first = full.labels.index(4)
    keep = [i for i, y in enumerate(full.labels) if y != 4 or i == first]
    with pytest.warns(UserWarning, match=repr(names[4])):
        few = sample_few_shot(full.subset(keep), 2, 1)
    assert len(few) == 19 and few.labels.count(4) == 1
    m = make("vpt").fit(bb, few, animals["val"], progress=False)
    assert len(m.history_) == 1 and m.recipe_["train_images"] == 19


def test_augment_is_seeded_keeps_shapes_and_is_exact_at_full_scale():
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = T.augment(x, g1), T.augment(x, g2)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(T.augment(x, g1), a)            # the generator moved on
    # non-square input keeps its shape too
    assert T.augment(torch.randn(2, 3, 12, 20), g1).shape == (2, 3, 12, 20)
    # scale (1, 1), ratio (1, 1): the whole image, mirrored or not, bit for bit
    out = T.augment(x, torch.Generator().manual_seed(3), scale=(1, 1), ratio=(1, 1))
    kinds = []
    for i in range(len(x)):
        if torch.equal(out[i], x[i]):
            kinds.append("same")
        elif torch.equal(out[i], x[i].flip(-1)):
            kinds.append("mirror")
        else:
            kinds.append(f"neither (max err {(out[i] - x[i]).abs().max():.3g})")
    assert set(kinds) == {"same", "mirror"}, kinds


def test_augment_crop_is_a_bilinear_resize_of_the_crop():
    """A crop of side 8 of a 16x16 image, resized back: bilinear sampling at the centres of
    the output pixels mapped into the crop (torchvision's resized crop, at any offset)."""
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = T.augment(x, torch.Generator().manual_seed(0), scale=(0.25, 0.25), ratio=(1, 1), tries=1)
    g = torch.Generator().manual_seed(0)                  # replay the draws: area, ratio, offset, flip
    torch.empty(4, 1).uniform_(0.25, 0.25, generator=g)
    torch.empty(4, 1).uniform_(0.0, 0.0, generator=g)
    u = torch.rand(4, 2, generator=g)
    flip = torch.rand(4, generator=g) < 0.5
    for i in range(4):
        x0, y0 = float(u[i, 0] * 8), float(u[i, 1] * 8)
        c = (torch.arange(16) + 0.5) * 0.5 - 0.5            # output centres in crop pixels
        px, py = x0 + c, y0 + c                             # ... in image pixels
        gx, gy = (2 * px + 1) / 16 - 1, (2 * py + 1) / 16 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
        ref = F.grid_sample(x[i:i + 1], grid, mode="bilinear", padding_mode="border",
                            align_corners=False)[0]
        got = out[i].flip(-1) if flip[i] else out[i]
        assert torch.allclose(got, ref, atol=1e-5), (i, (got - ref).abs().max())


def test_epoch_lr_warmup_then_cosine_by_hand():
    lr, E = 0.002, 10
    assert T.epoch_lr(0, lr, E, 1, 1e-5) == 1e-5
    assert T.epoch_lr(1, lr, E, 1, 1e-5) == pytest.approx(0.001 * (1 + math.cos(math.pi / 10)))
    assert T.epoch_lr(5, lr, E, 1, 1e-5) == pytest.approx(0.001)
    assert T.epoch_lr(9, lr, E, 1, 1e-5) == pytest.approx(0.001 * (1 - math.cos(math.pi / 10)))
    assert T.epoch_lr(0, lr, E, 0, 1e-5) == pytest.approx(lr)
    assert T.epoch_lr(1, lr, E, 2, 1e-5) == 1e-5
    assert T.epoch_lr(2, lr, E, 2, 1e-5) == pytest.approx(0.001 * (1 + math.cos(math.pi / 5)))
    lrs = [T.epoch_lr(e, lr, E, 1, 1e-5) for e in range(1, E)]
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:]))


# ------------------------------------------------------------- 5. formulas

def test_cocoop_batch_equals_one_image_calls(fitted, bb, x_test, monkeypatch):
    m = fitted["methods"]["cocoop"][0]
    assert m.module_.meta_net[2].weight.abs().sum() > 0
    x = x_test[:3]
    batched = m.predict_logits(bb, x)
    single = torch.cat([m.predict_logits(bb, x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)
    monkeypatch.setattr(cocoop_mod, "MAX_TEXTS", 15)              # one image per text call
    assert torch.allclose(m.predict_logits(bb, x), single, atol=1e-5)
    # and the image conditioning matters: per-image context differs from CoOp's shared one
    names = m.classnames_
    f = bb.encode_images(x)
    ctx = m.module_.ctx + m.module_.meta_net(f)[:, None, :]
    t0 = bb.encode_text_with_context([f"X X X X {c}." for c in names], ctx[0])
    ref0 = bb.logit_scale * f[0] @ t0.t()
    assert torch.allclose(batched[0], ref0, atol=1e-4)


def test_maple_vision_prompts_are_coupled_to_the_text_prompts(fitted, bb, x_test):
    m = fitted["methods"]["maple"][0]
    mod = m.module_
    text_prompts = [mod.ctx, *mod.deep]
    assert len(text_prompts) == len(mod.couple) == min(9, bb.vision_layers, bb.text_layers)
    vis = mod.vision_prompts()
    for p, lin, v in zip(text_prompts, mod.couple, vis):
        assert v.shape == (m.n_ctx, bb.vision_width)
        assert torch.allclose(v, p @ lin.weight.t() + lin.bias, atol=1e-6)
    t, vprompts = m.encode_classes(bb, m.classnames_)
    assert all(torch.equal(a, b) for a, b in zip(vprompts, vis))
    # a loss on image features alone reaches the text prompts through the coupling
    mod.zero_grad(set_to_none=True)
    z = image_features(bb, x_test[:2], mod.vision_prompts())
    (z * torch.linspace(-1, 1, z.shape[1])).sum().backward()
    assert mod.ctx.grad is not None and mod.ctx.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.deep)
    mod.zero_grad(set_to_none=True)


def hand_alpha(t_eval: torch.Tensor, t_train: torch.Tensor, beta: float, eps: float) -> list[float]:
    out = []
    for c in range(len(t_eval)):
        cos = [float(t_eval[c] @ t_train[j]) for j in range(len(t_train))]
        d_avg, d_nn = 1 - sum(cos) / len(cos), 1 - max(cos)
        out.append(math.exp(-beta * d_avg * (1.0 if d_nn > eps else 0.0)))
    return out


def test_apex_ensemble_weights_by_hand():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=-1)
    near = F.normalize(train[1] + 0.01 * torch.randn(6, generator=g, dtype=torch.float64), dim=0)
    far = F.normalize(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=-1)
    ev = torch.cat([train[:1], near[None], far])
    a = ensemble_weights(ev, train, 4.0, 0.05)
    ref = hand_alpha(ev, train, 4.0, 0.05)
    assert a.tolist() == pytest.approx(ref, abs=1e-12)
    assert a[0] == 1 and a[1] == 1 and (a[2:] < 1).all()
    assert ensemble_weights(ev, train, 0.0, 0.05).tolist() == [1.0] * 5
    assert ensemble_weights(ev, train, 2.0, 0.05)[2:].tolist() == pytest.approx(
        hand_alpha(ev, train, 2.0, 0.05)[2:], abs=1e-12)


def apex_by_hand(m, bb, x, names) -> torch.Tensor:
    mod = m.module_
    texts = [f"X X of a {c}." for c in names]
    t_tilde = bb.encode_text_with_context(texts, mod.ctx).float()
    t_ad = t_tilde @ mod.adapter.weight.t() + mod.adapter.bias
    zs = lambda cs: bb.encode_texts([f"a photo of a {c}." for c in cs]).float()
    if m.ensemble:
        alpha = torch.tensor(hand_alpha(zs(names).double(), zs(m.classnames_).double(), m.beta, m.eps))
    else:
        alpha = torch.ones(len(names), dtype=torch.float64)
    a = alpha.float()[:, None]
    t = F.normalize(a * t_ad + (1 - a) * t_tilde, dim=-1)
    z_p = bb.encode_images_with_prompts(x, list(mod.prompts)).float()
    a_bar = float(alpha.mean())
    z = F.normalize(a_bar * z_p + (1 - a_bar) * bb.encode_images(x).float(), dim=-1)
    return bb.logit_scale * z @ t.t() + bb.logit_bias


def test_apex_adaptive_ensemble(fitted, bb, x_test):
    m = fitted["methods"]["apex"][0]
    names = m.classnames_
    assert not torch.allclose(m.module_.adapter.weight, torch.eye(bb.embed_dim))   # trained
    # training classes: alpha = 1, so the ensemble changes nothing
    assert torch.equal(m.alphas(bb, names), torch.ones(len(names)))
    on = m.predict_logits(bb, x_test)
    new = names[:2] + ["zebra", "giraffe", "penguin", "racing car"]
    new_on = m.predict_logits(bb, x_test, new)
    try:
        m.ensemble = False
        off = m.predict_logits(bb, x_test)
        new_off = m.predict_logits(bb, x_test, new)
        ref_off = apex_by_hand(m, bb, x_test, new)
    finally:
        m.ensemble = True
    assert torch.equal(on, off)
    assert torch.allclose(on, apex_by_hand(m, bb, x_test, names), atol=1e-4)
    # new classes: alpha < 1 somewhere, the ensemble changes the logits, both match the formula
    a = m.alphas(bb, new)
    assert a[:2].tolist() == [1.0, 1.0] and (a[2:] < 1).any()
    assert not torch.allclose(new_on, new_off, atol=1e-3)
    assert torch.allclose(new_off, ref_off, atol=1e-4)
    assert torch.allclose(new_on, apex_by_hand(m, bb, x_test, new), atol=1e-4)


def test_apex_settings_and_overrides(bb):
    b2n = create_method("apex")
    assert (b2n.setting, b2n.vision_depth, b2n.lr, b2n.epochs, b2n.batch_size, b2n.optimizer) == \
        ("base2new", None, 0.15, 15, 16, "adadelta")
    tr = create_method("apex", setting="transfer")
    assert (tr.vision_depth, tr.lr, tr.epochs, tr.batch_size, tr.optimizer) == (3, 0.02, 6, 32, "adadelta")
    torch.manual_seed(0)
    assert len(b2n.make_module(bb, ["a", "b"]).prompts) == bb.vision_layers
    assert len(tr.make_module(bb, ["a", "b"]).prompts) == 3
    ov = create_method("apex", setting="transfer", lr=0.5, epochs=2, vision_depth=1, batch_size=8)
    assert (ov.vision_depth, ov.lr, ov.epochs, ov.batch_size) == (1, 0.5, 2, 8)
    assert len(ov.make_module(bb, ["a"]).prompts) == 1
    # the parameters round-trip (what a prompt file stores)
    for m in (b2n, tr, ov):
        assert create_method("apex", **m.get_params()).get_params() == m.get_params()
    with pytest.raises(ValueError, match="setting"):
        create_method("apex", setting="fewshot")
    with pytest.raises(ValueError, match="no hyperparameter 'epoch'"):
        create_method("apex", epoch=3)


def _word_ids(which: str, bb, phrase: str) -> list[int]:
    if which == "builtin":
        return bb.model.text.hf_tokenizer(phrase, add_special_tokens=False)["input_ids"]
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer().encode(phrase)


def _token_table(which: str, bb) -> torch.Tensor:
    if which == "builtin":
        return bb.model.text.bert.embeddings.word_embeddings.weight
    if which == "hf-clip":
        return bb.model.text_model.embeddings.token_embedding.weight
    return bb.model.token_embedding.weight


@pytest.mark.parametrize("which", ["builtin", *TINY])
def test_coop_init_from_words_reproduces_zero_shot(which, request):
    bb = request.getfixturevalue("bb") if which == "builtin" else request.getfixturevalue("tiny")[which]
    names = ["rat", "leopard", "sea snail", "hedgehog"]
    m = create_method("coop", n_ctx=4, ctx_init="a photo of a")
    m.prepare(bb, names)
    ids = _word_ids(which, bb, "a photo of a")
    assert len(ids) == 4
    assert torch.equal(m.module_.ctx.detach(), _token_table(which, bb)[ids].detach().float())
    with torch.no_grad():
        t = m.encode_classes(bb, names)
        ref = bb.encode_texts([f"a photo of a {c}." for c in names]).float()
    assert torch.allclose(t, ref, atol=1e-6), (t - ref).abs().max()


# ------------------------------------------------------------- 6. fit_on / Fitted.evaluate

def test_base_to_new_zero_shot_equals_an_independent_computation(bb, animals):
    from anyclass.eval.fitting import fit_on
    from anyclass.features.extract import extract_features
    base, new = base_new_split(animals["names"])
    f = fit_on("zeroshot", bb, "world:animals", shots=0, seed=1, classes=base, progress=False)
    assert f.train_classnames == [animals["names"][i] for i in base]
    res = {k: f.evaluate("world:animals", "test", classes=cls, progress=False)
           for k, cls in (("base", base), ("new", new))}
    # back to the training classes after another class list: the classifier is refit again
    # (it once kept the last list's classifier and scored with the wrong number of classes)
    again = f.evaluate("world:animals", "test", classes=base, progress=False)
    assert again["metrics"] == res["base"]["metrics"]
    test = animals["test"]
    feats = extract_features(bb, test, cache=False, progress=False)
    assert np.asarray(feats.valid).all()
    X = torch.as_tensor(np.asarray(feats.features, dtype=np.float32))
    y = np.asarray(test.labels)
    W = bb.encode_texts([f"a photo of a {c}." for c in animals["names"]]).float()    # [K, D]
    for k, cls in (("base", base), ("new", new)):
        rows = np.isin(y, cls)
        pred = (X[rows] @ W[cls].t()).argmax(1).numpy()
        acc = float((np.asarray(cls)[pred] == y[rows]).mean())
        assert res[k]["num_images"] == int(rows.sum()) and res[k]["num_classes"] == len(cls)
        assert res[k]["metrics"]["acc1"] == pytest.approx(acc, abs=1e-6), k


def test_non_transferring_method_refuses_other_classes(bb):
    from anyclass.eval.fitting import fit_on
    base, new = base_new_split(10)
    f = fit_on("tip-adapter", bb, "world:animals", shots=1, seed=1, classes=base, progress=False)
    assert f.evaluate("world:animals", classes=base, progress=False)["num_classes"] == 5
    with pytest.raises(AnyclassError, match="cannot score classes it was not trained on"):
        f.evaluate("world:animals", classes=new, progress=False)


def test_prompt_state_file_is_saved_then_reused(bb, animals, tmp_path, monkeypatch):
    from anyclass.eval.fitting import fit_on
    base, new = base_new_split(10)
    calls = []
    orig = PromptMethod.fit

    def fit(self, *a, **k):
        calls.append(type(self).__name__)
        return orig(self, *a, **k)
    monkeypatch.setattr(PromptMethod, "fit", fit)
    sp = tmp_path / "coop.safetensors"
    kw = dict(shots=1, seed=1, hparams={**FAST, "n_ctx": 4}, classes=base, state_path=sp, progress=False)
    first = fit_on("coop", bb, "world:animals", **kw)
    assert calls == ["CoOp"] and sp.is_file() and not (tmp_path / "coop.safetensors.ckpt").exists()
    _, meta = read_prompt_file(sp)
    assert meta["method"] == "coop" and json.loads(meta["classnames"]) == first.train_classnames
    assert first.info["state_file"] == str(sp)
    second = fit_on("coop", bb, "world:animals", **kw)
    assert calls == ["CoOp"], "the second fit_on must load the state file, not train"
    r1 = first.evaluate("world:animals", classes=new, progress=False)
    r2 = second.evaluate("world:animals", classes=new, progress=False)
    assert r1["metrics"] == r2["metrics"] and r1["num_classes"] == 5
    # other hyperparameters: the file is not reused
    with pytest.warns(UserWarning, match="other hyperparameters"):
        fit_on("coop", bb, "world:animals", **{**kw, "hparams": {**kw["hparams"], "lr": 0.01}})
    assert calls == ["CoOp", "CoOp"]


def test_bf16_autocast_on_cpu_only_when_asked(bb, animals, monkeypatch):
    """amp=None keeps fp32 on the CPU (bit-deterministic); amp=True runs the step under
    bfloat16 autocast there, deterministic too, and learns nearly the same prompts."""
    seen = []
    real = T._autocast

    def spy(device, amp):
        ctx = real(device, amp)
        seen.append((amp, ctx.fast_dtype if ctx._enabled else None))
        return ctx

    monkeypatch.setattr(T, "_autocast", spy)
    fp32 = make("coop").fit(bb, animals["train"], animals["val"], progress=False)
    bf16 = [make("coop", amp=True).fit(bb, animals["train"], animals["val"], progress=False)
            for _ in range(2)]
    assert {s for a, s in seen if a is None} == {None}
    assert {s for a, s in seen if a is True} == {torch.bfloat16}
    a, b, c = (m.module_.ctx.detach() for m in (fp32, *bf16))
    assert torch.equal(b, c)
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99


@pytest.mark.parametrize("bf16_units", [False, True])
def test_cpu_amp_warns_where_bf16_is_emulated(monkeypatch, bf16_units):
    """On an AVX2-only CPU bf16 autocast is emulated (~8x slower than fp32, measured in
    docs/benchmarks.md): amp=True says so once per call site; a CPU with bf16 units is quiet."""
    import warnings
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert T.cpu_has_bf16() is bf16_units
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        T._autocast("cpu", True)
        T._autocast("cpu", None)      # fp32 on the CPU: nothing to warn about
        T._autocast("cpu", False)
    msgs = [str(w.message) for w in got if issubclass(w.category, RuntimeWarning)]
    if bf16_units:
        assert msgs == []
    else:
        assert len(msgs) == 1 and "without bfloat16 units" in msgs[0] and "run without amp" in msgs[0]


@pytest.mark.parametrize("bf16_units", [False, True])
def test_recipes_ask_for_bf16_only_where_it_pays(monkeypatch, tmp_path, bf16_units):
    """The world's source MaPLe recipe trains in bf16 on CUDA or a CPU with bf16 units and in
    fp32 elsewhere, and the precision is part of its cache key."""
    import anyclass.eval.fitting as Fi
    import anyclass.eval.tta as E
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert T.bf16_pays("cpu") is bf16_units and T.bf16_pays("cuda") is True
    monkeypatch.setattr(E, "_home", lambda: tmp_path)
    asked = []
    monkeypatch.setattr(Fi, "fit_on", lambda *a, hparams, **k: asked.append(hparams))

    class CpuBackbone:
        device, weights_hash, identity = "cpu", "h", "builtin"
    path = E.world_source_prompts(CpuBackbone(), seed=1, progress=False)
    assert asked[0]["amp"] is bf16_units and "amp" not in E.WORLD_MAPLE
    other = E.world_source_prompts(CpuBackbone(), seed=1, recipe={**E.WORLD_MAPLE, "amp": not bf16_units},
                                   progress=False)
    assert other != path and asked[1]["amp"] is (not bf16_units)


def test_a_fit_that_would_never_leave_its_warm_up_is_refused(bb, animals):
    """epochs <= warmup_epochs trains only at warmup_lr (1e-5): an hour-long CoCoOp fit that
    learns nothing. Refused before any image is read."""
    m = create_method("cocoop", epochs=1)                  # the paper's warm-up epoch: 1
    with pytest.raises(AnyclassError, match=r"epochs=1 <= warmup_epochs=1: every epoch would run "
                                            r"at warmup_lr=1e-05, never at lr=0.002; set warmup_epochs=0"):
        m.fit(bb, animals["train"], animals["val"], progress=False)
    assert not hasattr(m, "history_")
    m = make("coop", epochs=1, warmup_epochs=0)             # warm-up off: one epoch at lr
    m.fit(bb, animals["train"], animals["val"], progress=False)
    assert m.history_[0]["lr"] == m.lr
