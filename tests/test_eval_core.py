"""Metrics, templates, text classifiers and the zero-shot rule against independent computations."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anyclass.data.templates import ENSEMBLE7, get_templates, load_descriptions
from anyclass.errors import AnyclassError, SpecError
from anyclass.eval.metrics import classification_metrics
from anyclass.methods import METHODS, create_method
from anyclass.methods.classifier import build_text_classifier


class HashText:
    """Text tower whose embedding of a string is a fixed random vector seeded by its CRC."""
    logit_scale = 100.0

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim
        self.calls = 0

    def encode_texts(self, texts):
        self.calls += 1
        vecs = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                for t in texts]
        return F.normalize(torch.stack(vecs), dim=-1)


def test_metrics_match_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=200)
    m = classification_metrics(torch.from_numpy(logits), torch.from_numpy(labels))
    order = np.argsort(-logits, axis=1)
    acc1 = np.mean(order[:, 0] == labels)
    acc5 = np.mean([labels[i] in order[i, :5] for i in range(200)])
    recalls = [np.mean(order[labels == k, 0] == k) for k in range(7)]
    assert m["acc1"] == pytest.approx(acc1)
    assert m["acc5"] == pytest.approx(acc5)
    assert m["mean_per_class_recall"] == pytest.approx(np.mean(recalls))


def test_mean_per_class_recall_differs_from_acc1_on_imbalanced_data():
    labels = torch.tensor([0, 0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0]] * 5)          # always predicts class 0
    m = classification_metrics(logits, labels)
    assert m["acc1"] == pytest.approx(0.8)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert m["acc5"] == pytest.approx(1.0)         # k capped at K=2


def test_template_sets():
    assert get_templates("single") == ["a photo of a {}."]
    assert get_templates("ensemble7") == ENSEMBLE7 and len(ENSEMBLE7) == 7
    t80 = get_templates("openai80")
    assert len(t80) == 80 and all(t.count("{}") == 1 for t in t80)
    assert get_templates("dataset", "dtd") == ["{} texture."]
    assert get_templates("dataset", "eurosat") == ["a centered satellite photo of {}."]
    assert get_templates("dataset", "world-task", ["an emoji of {}."]) == ["an emoji of {}."]
    with pytest.raises(AnyclassError, match="unknown template set 'nope'"):
        get_templates("nope")


def test_template_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a {} here.\n\nan {} there.\n")
    assert get_templates(str(f)) == ["a {} here.", "an {} there."]
    f.write_text("no placeholder\n")
    with pytest.raises(AnyclassError, match="exactly one"):
        get_templates(str(f))


def test_prompt_ensemble_is_mean_of_normalised_embeddings():
    bb = HashText()
    names = ["cat", "dog", "school bus"]
    W = build_text_classifier(bb, names, ENSEMBLE7)
    assert W.shape == (16, 3)
    for k, n in enumerate(names):
        e = bb.encode_texts([t.format(n) for t in ENSEMBLE7]).mean(0)
        assert torch.allclose(W[:, k], e / e.norm(), atol=1e-6)


def test_cupl_alone_and_plus_templates(tmp_path):
    bb = HashText()
    names = ["cat", "dog"]
    f = tmp_path / "cupl.json"
    f.write_text(json.dumps({"cat": ["A small furry pet.", "It purrs."], "Dog": ["It barks."]}))
    desc = load_descriptions(f, names)                    # case-insensitive class match
    alone = build_text_classifier(bb, names, ["a photo of a {}."], desc, with_templates=False)
    e = bb.encode_texts(["A small furry pet.", "It purrs."]).mean(0)
    assert torch.allclose(alone[:, 0], e / e.norm(), atol=1e-6)
    plus = build_text_classifier(bb, names, ["a photo of a {}."], desc)
    e = bb.encode_texts(["a photo of a dog.", "It barks."]).mean(0)
    assert torch.allclose(plus[:, 1], e / e.norm(), atol=1e-6)


def test_cupl_missing_class_is_named(tmp_path):
    f = tmp_path / "cupl.json"
    f.write_text(json.dumps({"cat": ["x."]}))
    with pytest.raises(AnyclassError, match="'dog'"):
        load_descriptions(f, ["cat", "dog"])


def test_zeroshot_rule_and_contract():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(10, 8), dim=-1)
    W = F.normalize(torch.randn(8, 4), dim=0)
    m = create_method("zeroshot", logit_scale=50.0)
    assert m.fit(W) is m and hasattr(m, "W_")
    assert torch.allclose(m.predict_logits(f), 50.0 * torch.einsum("nd,dk->nk", f, W))
    assert m.get_params() == {"logit_scale": 50.0}
    with pytest.raises(ValueError, match="no hyperparameter 'beta'"):
        m.set_params(beta=1)


def test_unknown_method_lists_known():
    with pytest.raises(SpecError, match=r"unknown method 'nope' \(known: .*zeroshot"):
        METHODS.get("nope")
