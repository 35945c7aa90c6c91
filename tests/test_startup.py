"""Fast start: weight hashes memoised on disk, text classifiers cached on disk, backbones
built only when needed, commands importing only what they use. Behaviour, not timings."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anyclass import hashing
from anyclass.backbones.card import LazyBackbone
from anyclass.backbones.factory import create_backbone
from anyclass.errors import AnyclassError
from anyclass.features.textcache import text_root
from anyclass.methods.classifier import build_text_classifier

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights.*:UserWarning")

NAME = "anyclass-startup-vit"
CONFIG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                         "patch_size": 16},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                       "layers": 2}}
CLASSES = ["cat", "dog", "school bus"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
#: libraries a command must not import unless it needs them
HEAVY = ("open_clip", "torchvision", "transformers", "timm", "sklearn", "matplotlib",
         "gradio", "nltk")


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("ANYCLASS_HOME", str(h))
    monkeypatch.setattr(hashing, "_SHA_MEMO", {})
    return h


@pytest.fixture(scope="module")
def oc_config(tmp_path_factory):
    import open_clip
    d = tmp_path_factory.mktemp("oc_cfg")
    (d / f"{NAME}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(d)
    return d


def _checkpoint(path: Path, seed: int) -> Path:
    """A safetensors checkpoint of the tiny architecture with seeded random weights (two
    seeds: same size, same names, different weights)."""
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(NAME, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _by_hand(bb, names, templates) -> torch.Tensor:
    """W[:, k] = normalise(mean of the normalised sentence embeddings of class k)."""
    with torch.no_grad():
        cols = [F.normalize(bb.encode_texts([t.format(n) for t in templates]).float(), dim=-1)
                .mean(0) for n in names]
    return F.normalize(torch.stack(cols), dim=-1).T


def _rewrite_keeping_mtime(path: Path, seed: int) -> None:
    """Replace the weights in place (same path, size and inode) and put the old mtime back:
    only the ctime tells the files apart."""
    st = path.stat()
    time.sleep(0.05)                     # past the file system's timestamp granularity
    tmp = _checkpoint(path.with_suffix(".new.safetensors"), seed)
    path.write_bytes(tmp.read_bytes())   # in place: same inode
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_ino == st.st_ino


# ------------------------------------------------------------------ weight hashes

def test_weight_hash_memoised_on_disk_and_recomputed_when_the_file_changes(home, tmp_path,
                                                                             monkeypatch):
    reads = []
    real = hashing._sha256_of
    monkeypatch.setattr(hashing, "_sha256_of", lambda p, c: reads.append(p) or real(p, c))
    p = tmp_path / "w.bin"
    p.write_bytes(b"a" * 1000)
    assert hashing.file_sha256(p) == hashlib.sha256(b"a" * 1000).hexdigest()
    monkeypatch.setattr(hashing, "_SHA_MEMO", {})          # as a new process would start
    assert hashing.file_sha256(p) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(reads) == 1 and len(list((home / "hashes").glob("*.json"))) == 1

    st = p.stat()                                           # same size, new content and mtime
    p.write_bytes(b"b" * 1000)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert hashing.file_sha256(p) == hashlib.sha256(b"b" * 1000).hexdigest()
    p.write_bytes(b"c" * 10)                                # new size
    assert hashing.file_sha256(p) == hashlib.sha256(b"c" * 10).hexdigest()
    assert len(reads) == 3
    assert hashing.file_sha256(p, memo=False) == hashlib.sha256(b"c" * 10).hexdigest()
    assert len(reads) == 4                                  # integrity checks always read


def test_weight_hash_memo_sees_a_rewrite_with_the_old_mtime_put_back(home, tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"a" * 1000)
    assert hashing.file_sha256(p) == hashlib.sha256(b"a" * 1000).hexdigest()
    st = p.stat()
    time.sleep(0.05)
    p.write_bytes(b"z" * 1000)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (p.stat().st_size, p.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert hashing.file_sha256(p) == hashlib.sha256(b"z" * 1000).hexdigest()


def test_a_corrupted_hash_record_is_ignored(home, tmp_path, monkeypatch):
    p = tmp_path / "w.bin"
    p.write_bytes(b"a" * 100)
    hashing.file_sha256(p)
    rec_path = next((home / "hashes").glob("*.json"))
    rec = json.loads(rec_path.read_text())
    rec["record"]["sha256"] = "0" * 64                      # forged, checksum left as it was
    rec_path.write_text(json.dumps(rec))
    monkeypatch.setattr(hashing, "_SHA_MEMO", {})
    assert hashing.file_sha256(p) == hashlib.sha256(b"a" * 100).hexdigest()


# ------------------------------------------------------------------ text classifiers

def test_cached_run_answers_from_the_card_and_the_text_cache(home, tmp_path, oc_config):
    spec = f"openclip:{NAME}@{_checkpoint(tmp_path / 'a.safetensors', 1)}"
    first = create_backbone(spec, "cpu", lazy=True)         # never built before: the real one
    assert not isinstance(first, LazyBackbone) and first.text_id
    W1 = build_text_classifier(first, CLASSES, TEMPLATES)
    torch.testing.assert_close(W1, _by_hand(first, CLASSES, TEMPLATES), atol=1e-6, rtol=0)

    second = create_backbone(spec, "cpu", lazy=True)
    assert isinstance(second, LazyBackbone) and not second.built
    assert (second.identity, second.weights_hash, second.embed_dim, second.preprocess_id()) == (
        first.identity, first.weights_hash, first.embed_dim, first.preprocess_id())
    assert second.logit_scale == pytest.approx(first.logit_scale)
    W2 = build_text_classifier(second, CLASSES, TEMPLATES)
    assert not second.built and torch.equal(W1, W2)         # no model needed at all
    W3 = build_text_classifier(second, ["fish", "tree"], TEMPLATES)   # not cached: builds
    assert second.built
    torch.testing.assert_close(W3, _by_hand(first, ["fish", "tree"], TEMPLATES), atol=1e-6,
                               rtol=0)


def test_stale_text_classifier_never_used_after_the_weights_change(home, tmp_path,
                                                                   oc_config):
    """Same model name, same file path, same size and mtime — other weights."""
    path = _checkpoint(tmp_path / "w.safetensors", 1)
    spec = f"openclip:{NAME}@{path}"
    old = create_backbone(spec, "cpu", lazy=True)
    W_old = build_text_classifier(old, CLASSES, TEMPLATES)
    assert len(list(text_root().glob("*.npy"))) == 1
    _rewrite_keeping_mtime(path, seed=2)

    new = create_backbone(spec, "cpu", lazy=True)
    assert new.identity == old.identity and new.weights_hash != old.weights_hash
    W_new = build_text_classifier(new, CLASSES, TEMPLATES)
    fresh = create_backbone(spec, "cpu")                    # built from the new file
    torch.testing.assert_close(W_new, _by_hand(fresh, CLASSES, TEMPLATES), atol=1e-6, rtol=0)
    assert not torch.allclose(W_new, W_old, atol=1e-3)
    assert len(list(text_root().glob("*.npy"))) == 2


def test_damaged_text_classifier_entry_is_recomputed(home, tmp_path, oc_config):
    spec = f"openclip:{NAME}@{_checkpoint(tmp_path / 'a.safetensors', 1)}"
    bb = create_backbone(spec, "cpu")
    W = build_text_classifier(bb, CLASSES, TEMPLATES)
    npy = next(text_root().glob("*.npy"))
    npy.write_bytes(npy.read_bytes()[:-8])                  # truncated
    again = create_backbone(spec, "cpu", lazy=True)
    assert torch.equal(build_text_classifier(again, CLASSES, TEMPLATES), W)
    assert again.built                                      # recomputed, not read


def test_a_backbone_the_card_no_longer_describes_stops_the_run(home, tmp_path, oc_config,
                                                                 monkeypatch):
    """A source change the stamp cannot see must not mix two models' numbers."""
    from anyclass.backbones import card as card_mod
    spec = f"openclip:{NAME}@{_checkpoint(tmp_path / 'a.safetensors', 1)}"
    create_backbone(spec, "cpu")
    lazy = create_backbone(spec, "cpu", lazy=True)
    assert isinstance(lazy, LazyBackbone)
    real_build = lazy._build

    def other_weights(s, d):
        bb = real_build(s, d)
        bb.weights_hash = "f" * 64
        return bb
    monkeypatch.setattr(lazy, "_build", other_weights)
    with pytest.raises(AnyclassError, match="not the one its start-up card recorded"):
        lazy.encode_texts(["a cat"])
    assert card_mod.load_card(lazy._stamp) is None          # dropped


# ------------------------------------------------------------------ what commands import

def _modules_after(argv: list[str]) -> set[str]:
    code = ("import json, sys\nfrom anyclass.cli.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_imports_no_model_library_nor_torch():
    mods = _modules_after(["--help"])
    assert not mods & {*HEAVY, "torch", "numpy"}, mods & {*HEAVY, "torch", "numpy"}


@pytest.mark.slow
def test_world_tasks_imports_no_model_library(mini_world):
    mods = _modules_after(["world", "tasks"])
    assert not mods & set(HEAVY), mods & set(HEAVY)


@pytest.mark.slow
def test_second_identical_eval_builds_no_model(mini_world, tmp_path):
    """The cached run (features, text classifier and card on disk) gives the same result
    without importing the text tower's library (transformers) or building the model."""
    from anyclass.cli.main import main
    task = next(iter(mini_world.tasks))
    argv = ["eval", "--dataset", f"world:{task}", "--out", str(tmp_path / "a.json")]
    assert main(argv) == 0
    mods = _modules_after([*argv[:-1], str(tmp_path / "b.json")])
    assert not mods & set(HEAVY), mods & set(HEAVY)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["metrics"] == b["metrics"] and a["backbone_identity"] == b["backbone_identity"]
