"""Safe weight loading and weight hashing.

Only two formats are read from a file a user points at: safetensors, and torch's zip/pickle
format through ``torch.load(weights_only=True)`` (tensors, containers and primitives only).
Anything needing arbitrary unpickling — a pickled class instance, a ``__reduce__`` calling
``os.system``, a TorchScript archive — is refused with :class:`UnsafeCheckpointError`, whose
one-line message names the file, what was found and how to convert it.
"""
from __future__ import annotations

import io
import os
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import AnyclassError, UnsafeCheckpointError
from ..hashing import file_sha256, state_dict_hash  # noqa: F401 — re-exported

SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt")
#: nestings unwrapped, outermost first (training checkpoints keep the weights under one of these)
_NESTING_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` on CPU from .safetensors or .pt/.pth/.bin/.ckpt.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` nestings and strips ``module.`` (DDP)
    and ``_orig_mod.`` (torch.compile) prefixes. Raises UnsafeCheckpointError for anything
    that would need arbitrary unpickling, AnyclassError for missing/corrupt/unknown files.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise AnyclassError(f"checkpoint file not found: {p}")
    ext = p.suffix.lower()
    if ext in SAFETENSORS_EXT:
        obj: Any = _load_safetensors(p)
    elif ext in TORCH_EXT:
        obj = _load_torch(p)
    else:
        raise AnyclassError(f"unsupported checkpoint format {ext or '(no extension)'!r} for {p}: "
                            f"expected one of {', '.join(SAFETENSORS_EXT + TORCH_EXT)}")
    return _flatten(obj, p)


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(p), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise AnyclassError(f"cannot read safetensors checkpoint {p}: {_one_line(e)}") from None


def _load_torch(p: Path) -> Any:
    if p.stat().st_size == 0:
        raise AnyclassError(f"cannot read checkpoint {p}: the file is empty")
    is_zip = zipfile.is_zipfile(p)
    if is_zip and _is_torchscript(p):
        raise UnsafeCheckpointError(
            f"refusing to load {p}: it is a TorchScript archive (code, not just weights; e.g. OpenAI's "
            f"original CLIP .pt); use the open_clip pretrained tag (e.g. @openai) or convert it to safetensors")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter from the weights-only unpickler
            return torch.load(str(p), map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # UnpicklingError for forbidden globals; RuntimeError/EOFError for corrupt files
        found = _forbidden_globals(p, e)
        if found or _is_unpickling_error(e):
            what = f" (found {', '.join(found)})" if found else ""
            raise UnsafeCheckpointError(
                f"refusing to load {p}: it is a pickle of arbitrary Python objects{what}; "
                f"convert it to safetensors (or save only tensors with torch.save(model.state_dict()))") from None
        raise AnyclassError(f"cannot read checkpoint {p}: {_one_line(e) or type(e).__name__}") from None


def _is_unpickling_error(e: BaseException) -> bool:
    import pickle
    return isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e)


def _is_torchscript(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/__torch__" in n for n in names)


# globals a plain torch.save(state_dict) may reference; anything else is reported
_PLAIN_GLOBALS = re.compile(r"^(torch\._utils\._rebuild_\w+|torch\.\w*Storage|collections\.OrderedDict|"
                            r"torch\._tensor\._rebuild_from_type_v2|torch\.(float|bfloat|int|uint|bool|"
                            r"complex)\w*|torch\.device|torch\.Size|torch\.nn\.parameter\.Parameter)$")


def _forbidden_globals(p: Path, err: BaseException) -> list[str]:
    """Names of the non-tensor globals the pickle references, from torch's error message or
    from a static scan of the pickle opcodes (nothing is executed)."""
    names = re.findall(r"GLOBAL ([\w.]+)", str(err))
    if names:
        return list(dict.fromkeys(names))
    try:
        data = _pickle_bytes(p)
        return [n for n in _scan_globals(data) if not _PLAIN_GLOBALS.match(n)]
    except Exception:
        return []


def _pickle_bytes(p: Path) -> bytes:
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            member = next(n for n in z.namelist() if n.endswith("data.pkl"))
            return z.read(member)
    with open(p, "rb") as f:
        return f.read(64 << 20)


def _scan_globals(data: bytes) -> list[str]:
    """GLOBAL / STACK_GLOBAL / INST references in a pickle stream, in order, deduplicated."""
    found: list[str] = []
    strings: list[str] = []
    memo: dict[int, Any] = {}
    last: Any = None
    for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        elif "UNICODE" in name or name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
            strings.append(str(arg))
            last = str(arg)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = last
        elif name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
            strings.append(memo[int(arg)])
        if name not in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE") and "UNICODE" not in name:
            last = None
    return list(dict.fromkeys(found))


def _flatten(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping):
        nested = next((k for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = obj[nested]
    if not isinstance(obj, Mapping):
        raise AnyclassError(f"cannot use checkpoint {p}: expected a dict of tensors, got {type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise AnyclassError(f"cannot use checkpoint {p}: it holds no tensors (keys: {keys})")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:300]


def state_dict_mismatch(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> str | None:
    """Load `sd` into `model` (strict=False) and say in one line why it does not fit, or None
    when every key matched (the model then holds the weights)."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        return f"shape mismatch: {_one_line(e)}"
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    return "; ".join(parts) or None
