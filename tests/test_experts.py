"""Expert image classifiers (hub/experts.py) and the offline world's expert hub
(world/experts.py): spec errors, safe loading, ImageNet heads → WordNet synsets, label
sidecars, Hugging Face folders, cached logits, and the mini hub's experts."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from anyclass.hub.experts import create_expert, expert_logits
from anyclass.errors import AnyclassError, SpecError, UnsafeCheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights.*:UserWarning")

SMALL_TIMM = "mobilenetv3_small_050"
SMALL_TV = "mobilenet_v3_small"


class Marker:
    """Unpickling this creates a file: detects an accidental unpickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _images(n: int = 3, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------------------ spec errors

@pytest.mark.parametrize("spec, match", [
    ("nosuch:thing", "unknown expert spec"),
    ("resnet18", "unknown expert spec"),
    ("timm:resnet_does_not_exist", "unknown timm model"),
    ("timm:resnet18@imagenet", "pretrained tags are not downloaded"),
    ("torchvision:resnet18@IMAGENET1K_V1", "pretrained tags are not downloaded"),
    ("torchvision:not_a_model", "unknown torchvision classification model"),
    ("timm:resnet18@/no/such/file.safetensors", "checkpoint file not found"),
    ("hf-image:/no/such/dir", "local Hugging Face model folder"),
    ("world-expert:", "needs a name"),
])
def test_spec_errors(spec, match):
    with pytest.raises(SpecError, match=match):
        create_expert(spec, "cpu")


def test_pickled_object_checkpoint_refused(tmp_path):
    trap = tmp_path / "unpickled"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Marker(str(trap))}, ckpt)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        create_expert(f"timm:{SMALL_TIMM}@{ckpt}", "cpu")
    with pytest.raises(UnsafeCheckpointError):
        create_expert(f"torchvision:{SMALL_TV}@{ckpt}", "cpu")
    assert not trap.exists()


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(AnyclassError, match="cannot read safetensors"):
        create_expert(f"timm:{SMALL_TIMM}@{bad}", "cpu")
    other = tmp_path / "other.safetensors"
    save_file({"not.a.key": torch.zeros(3)}, str(other))
    with pytest.raises(AnyclassError, match="does not fit timm model"):
        create_expert(f"timm:{SMALL_TIMM}@{other}", "cpu")


# ------------------------------------------------------------------------------ ImageNet heads

# (index, WordNet id, synset): ImageNet-1k class order, checked against WordNet 3.0 offsets
KNOWN = [(0, "n01440764", "tench.n.01"), (1, "n01443537", "goldfish.n.01"),
         (207, "n02099601", "golden_retriever.n.01"), (281, "n02123045", "tabby.n.01"),
         (999, "n15075141", "toilet_tissue.n.01")]


def test_timm_random_imagenet_heads():
    from anyclass.world.wordnet import get_wordnet
    e = create_expert(f"timm:{SMALL_TIMM}@random", "cpu")
    assert e.identity == f"timm:{SMALL_TIMM}@random" and len(e.head_names) == 1000
    assert e.num_params == sum(p.numel() for p in e.model.parameters())
    wn = get_wordnet()
    for i, wnid, syn in KNOWN:
        assert e.head_synsets[i] == syn
        s = wn.synset(syn)   # independent: the synset's offset is the wnid
        assert f"n{s.offset():08d}" == wnid
    assert e.head_names[207] == "golden retriever"
    assert sum(s is None for s in e.head_synsets) == 0
    x = torch.stack([e.preprocess(im) for im in _images(2)])
    assert x.shape == (2, 3, 224, 224)
    out = e.predict_logits(x)
    assert out.shape == (2, 1000) and not out.requires_grad
    e2 = create_expert(f"timm:{SMALL_TIMM}", "cpu")   # no tag = @random, same seeded weights
    assert e2.weights_hash == e.weights_hash


def test_torchvision_random_imagenet_heads():
    e = create_expert(f"torchvision:{SMALL_TV}@random", "cpu")
    assert e.head_names[207] == "golden retriever"
    for i, _, syn in KNOWN:
        assert e.head_synsets[i] == syn
    x = torch.stack([e.preprocess(im.convert("RGBA")) for im in _images(2)])
    assert e.predict_logits(x).shape == (2, 1000)


# ------------------------------------------------------------------------------ checkpoints + sidecars

def test_timm_checkpoint_with_sidecar(tmp_path):
    import timm
    torch.manual_seed(3)
    ref = timm.create_model(SMALL_TIMM, pretrained=False, num_classes=4).eval()
    ckpt = tmp_path / "pets.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(ckpt))
    # no label file: class_i, no synsets, a warning
    with pytest.warns(UserWarning, match="no label file"):
        e = create_expert(f"timm:{SMALL_TIMM}@{ckpt}", "cpu")
    assert e.head_names == ["class_0", "class_1", "class_2", "class_3"]
    assert e.head_synsets == [None] * 4 and e.identity == f"timm:{SMALL_TIMM}@file"
    x = torch.stack([e.preprocess(im) for im in _images(2)])
    with torch.no_grad():
        assert torch.allclose(e.predict_logits(x), ref(x), atol=1e-5)
    # sidecar: names; synsets as a wnid, a synset name, null and an unknown one
    (tmp_path / "pets.safetensors.labels.json").write_text(json.dumps(
        {"names": ["golden", "dog", "other", "bogus"],
         "synsets": ["n02099601", "dog.n.01", None, "notasynset.n.01"]}))
    with pytest.warns(UserWarning, match="notasynset"):
        e = create_expert(f"timm:{SMALL_TIMM}@{ckpt}", "cpu")
    assert e.head_names == ["golden", "dog", "other", "bogus"]
    assert e.head_synsets == ["golden_retriever.n.01", "dog.n.01", None, None]
    (tmp_path / "pets.safetensors.labels.json").write_text(json.dumps({"names": ["a", "b"]}))
    with pytest.raises(AnyclassError, match="names 2 classes but the checkpoint has 4"):
        create_expert(f"timm:{SMALL_TIMM}@{ckpt}", "cpu")


def test_torchvision_checkpoint_other_head(tmp_path):
    import torchvision
    torch.manual_seed(1)
    ref = torchvision.models.get_model(SMALL_TV, weights=None, num_classes=3).eval()
    ckpt = tmp_path / "tv.pth"
    torch.save({"state_dict": ref.state_dict()}, ckpt)   # nested, weights-only loadable
    (tmp_path / "tv.labels.json").write_text(json.dumps({"names": ["x", "y", "z"]}))
    e = create_expert(f"torchvision:{SMALL_TV}@{ckpt}", "cpu")
    assert e.head_names == ["x", "y", "z"] and e.head_synsets == [None] * 3
    x = torch.stack([e.preprocess(im) for im in _images(2)])
    with torch.no_grad():
        assert torch.allclose(e.predict_logits(x), ref(x), atol=1e-5)


def _tiny_hf(d, id2label):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=len(id2label), id2label=id2label,
                    label2id={v: k for k, v in id2label.items()})
    model = ViTForImageClassification(cfg).eval()
    model.save_pretrained(str(d))
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2, "do_normalize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return model


def test_hf_image_folder(tmp_path):
    d = tmp_path / "hfvit"
    model = _tiny_hf(d, {0: "n02099601", 1: "dog.n.01", 2: "a thing"})
    e = create_expert(f"hf-image:{d}", "cpu")
    assert e.head_names == ["n02099601", "dog.n.01", "a thing"]
    assert e.head_synsets == ["golden_retriever.n.01", "dog.n.01", None]
    x = torch.stack([e.preprocess(im) for im in _images(2)])
    assert x.shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(e.predict_logits(x), model(pixel_values=x).logits, atol=1e-5)
    # a folder whose only weights are a pickle of objects is refused before transformers loads it
    bad = tmp_path / "hfbad"
    bad.mkdir()
    (bad / "config.json").write_text((d / "config.json").read_text())
    trap = tmp_path / "unpickled"
    torch.save({"x": Marker(str(trap))}, bad / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        create_expert(f"hf-image:{bad}", "cpu")
    assert not trap.exists()


# ------------------------------------------------------------------------------ the mini world hub

@pytest.fixture(scope="module")
def mini_hub(mini_world):
    from anyclass.world.experts import ensure_world_experts
    return mini_world, ensure_world_experts(mini_world, progress=False)


def test_mini_hub_experts(mini_hub):
    from anyclass.world.experts import expert_records, recipes_for
    world, specs = mini_hub
    assert len(specs) >= 6 and all(s.startswith("world-expert:") for s in specs)
    recs = expert_records(world, progress=False)
    kinds = {r["arch"]["kind"] for r in recs}
    assert {"cnn", "mlp", "vit", "timm"} <= kinds
    assert {r["domain"] for r in recs} == {"colour", "sketch", "both"}
    by_id = {c.id: c for c in world.concepts}
    for r in recs:
        e = create_expert(r["spec"], "cpu")
        assert len(e.head_names) == len(r["concept_ids"]) == len(e.head_synsets)
        assert e.head_synsets == [by_id[c].synset for c in r["concept_ids"]]
        # held-out renders of its own concepts, in its own domain: better than chance
        assert r["heldout_acc_own"] > r["chance"], r["name"]
    with pytest.raises(SpecError, match="unknown world expert"):
        create_expert("world-expert:no-such-expert", "cpu")
    assert len(recipes_for(world)) == len(specs)


def test_mini_expert_deterministic(mini_hub):
    from anyclass.world.experts import expert_records, recipes_for, train_expert
    world, _ = mini_hub
    recipe = next(r for r in recipes_for(world) if r.arch.kind == "mlp")
    stored = next(r for r in expert_records(world, progress=False) if r["name"] == recipe.name)
    with torch.no_grad():        # as when the adversarial filter trains its expert on first use
        again = train_expert(world, recipe, None, progress=False)
    assert again["weights_sha256"] == stored["weights_sha256"]
    assert again["heldout_acc"] == stored["heldout_acc"]


def test_world_expert_on_task_beats_chance_and_logits_cached(mini_hub, tmp_path, monkeypatch):
    """A task's test images (never seen in training: other seeds), scored by the expert's
    heads of that task's concepts; logits through the feature cache."""
    from anyclass.data.sources import load_dataset
    world, _ = mini_hub
    e = create_expert("world-expert:symbols-cnn-colour", "cpu")
    ds = load_dataset("world:zodiac@colour", "test")
    task = world.tasks["zodiac"]
    cols = [e.meta["concept_ids"].index(c) for c in task.concept_ids]
    calls = {"n": 0}
    orig = e.predict_logits

    def counting(x):
        calls["n"] += 1
        return orig(x)
    monkeypatch.setattr(e, "predict_logits", counting)
    monkeypatch.setenv("ANYCLASS_HOME", str(tmp_path))   # an empty cache: first call computes
    logits = expert_logits(e, ds, batch_size=16, progress=False, num_workers=0)
    assert logits.shape == (len(ds), len(e.head_names)) and calls["n"] > 0
    first = calls["n"]
    again = expert_logits(e, ds, batch_size=16, progress=False, num_workers=0)
    assert calls["n"] == first                      # served from the cache
    np.testing.assert_array_equal(logits, again)
    x = torch.stack([e.preprocess(Image.open(p)) for p in ds.paths])
    direct = orig(x).numpy()
    np.testing.assert_allclose(logits, direct, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.linalg.norm(logits, axis=1), 1.0)   # raw logits, not normalised
    acc = float((logits[:, cols].argmax(1) == np.asarray(ds.labels)).mean())
    assert acc > 2.0 / len(cols), acc


def test_expert_logits_bad_image(mini_hub, tmp_path):
    from anyclass.data.base import LabeledImages
    from anyclass.data.images import BadImageWarning
    e = create_expert("world-expert:food-mlp-colour", "cpu")
    paths = []
    for i, im in enumerate(_images(3, 64)):
        p = tmp_path / f"{i}.png"
        im.save(p)
        paths.append(str(p))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    ds = LabeledImages("t", paths[:1] + [str(broken)] + paths[1:], [-1] * 4, ["x"])
    with pytest.warns(BadImageWarning, match="broken.png"):
        logits, valid = expert_logits(e, ds, progress=False, num_workers=0, with_valid=True)
    assert valid.tolist() == [True, False, True, True]
    assert np.all(logits[1] == 0) and np.all(np.abs(logits[[0, 2, 3]]).sum(1) > 0)
