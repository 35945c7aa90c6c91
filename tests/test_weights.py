"""Safe checkpoint loading and weight hashing (backbones/weights.py)."""
from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from anyclass.backbones.weights import file_sha256, load_state_dict, state_dict_hash
from anyclass.errors import AnyclassError, UnsafeCheckpointError


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g),
            "n": torch.tensor(7), "h": torch.randn(2, generator=g).to(torch.bfloat16)}


def _same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


class Evil:
    """Unpickling this would run os.system — must never happen."""

    def __reduce__(self):
        return (os.system, ("true",))


class Marker:
    """Unpickling this would create a file (detects an accidental unpickle)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class Thing:
    def __init__(self) -> None:
        self.w = torch.zeros(2)


def test_safetensors_and_torch_formats_load_the_same(tmp_path):
    sd = _sd()
    save_file(sd, tmp_path / "m.safetensors")
    torch.save(sd, tmp_path / "m.pt")
    torch.save(sd, tmp_path / "m_legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(sd, tmp_path / "m.bin")
    for name in ("m.safetensors", "m.pt", "m_legacy.pth", "m.bin"):
        assert _same(load_state_dict(tmp_path / name), sd), name


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3, "name": "run"},
    lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
], ids=["state_dict", "model", "module-prefix", "compile-prefix"])
def test_common_nestings_and_prefixes_are_unwrapped(tmp_path, wrap):
    sd = _sd()
    torch.save(wrap(sd), tmp_path / "c.pt")
    assert _same(load_state_dict(tmp_path / "c.pt"), sd)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reduce_to_os_system_is_refused(tmp_path, legacy):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Evil()}, p, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as ei:
        load_state_dict(p)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"refusing to load {p}: it is a pickle of arbitrary Python objects")
    assert "system" in msg and "safetensors" in msg


def test_class_instance_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "was-unpickled"
    p = tmp_path / "obj.pth"
    torch.save({"t": Thing(), "m": Marker(str(marker))}, p)
    with pytest.raises(UnsafeCheckpointError, match=r"found .*Thing"):
        load_state_dict(p)
    assert not marker.exists()


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "was-unpickled"
    p = tmp_path / "raw.bin"
    with open(p, "wb") as f:
        pickle.dump({"w": 1, "m": Marker(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"raw\.bin.*arbitrary Python objects"):
        load_state_dict(p)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_refused(tmp_path):
    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(p))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript archive"):
        load_state_dict(p)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(AnyclassError, match="checkpoint file not found"):
        load_state_dict(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(AnyclassError, match="empty"):
        load_state_dict(tmp_path / "empty.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AnyclassError, match="cannot read safetensors checkpoint"):
        load_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(AnyclassError, match="unsupported checkpoint format '.npz'"):
        load_state_dict(tmp_path / "w.npz")
    torch.save({"epoch": 3}, tmp_path / "notensors.pt")
    with pytest.raises(AnyclassError, match="holds no tensors"):
        load_state_dict(tmp_path / "notensors.pt")


def test_file_sha256_streams_and_tracks_changes(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc" * 1000)
    assert file_sha256(p, chunk=7) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_sha256(p) == file_sha256(str(p))
    p.write_bytes(b"abcd" * 1000)
    assert file_sha256(p) == hashlib.sha256(b"abcd" * 1000).hexdigest()


def test_state_dict_hash_is_deterministic_and_sensitive():
    a, b = _sd(0), _sd(0)
    assert state_dict_hash(a) == state_dict_hash(b)
    assert state_dict_hash(a) == state_dict_hash(dict(reversed(list(a.items()))))  # order-free
    assert len(state_dict_hash(a)) == 64
    b["a.bias"] = b["a.bias"].clone()
    b["a.bias"][0] += 1e-3
    assert state_dict_hash(a) != state_dict_hash(b)
    renamed = {("z" if k == "n" else k): v for k, v in a.items()}
    assert state_dict_hash(a) != state_dict_hash(renamed)
    assert state_dict_hash(a) != state_dict_hash({**a, "a.bias": a["a.bias"].double()})
    assert state_dict_hash(a) != state_dict_hash({**a, "a.weight": a["a.weight"].reshape(4, 3)})
