"""The contract of methods that learn inside the frozen backbone (CoOp, CoCoOp, VPT, MaPLe,
APEX): the scikit-learn shape of `base.FeatureMethod`, over images.

A method holds its hyperparameters (`__init__`, `get_params`), builds its small learnable
module for a backbone and a class list (`make_module`), and says how logits come out of the
backbone's prompt hooks (`encode_classes` once per step/prediction, `forward` per batch).
`fit` (one shared loop, methods/training.py) learns `module_`; `predict_logits` scores
images for any class list when the method transfers. The learned state is one safetensors
file with the backbone identity, the class names and the recipe (`save` / `load_prompts`),
never a pickle.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import __version__
from ..errors import AnyclassError
from .base import FeatureMethod, params_with, set_defaults

FORMAT = "anyclass-prompts"
FORMAT_VERSION = 1


class PromptFileError(AnyclassError, ValueError):
    """A learned-prompt file that is not ours, unsafe, or made for another backbone/classes."""


class PromptMethod(FeatureMethod):
    needs_train = True
    learns_in_backbone = True
    transfers = True
    #: the paper's training recipe, overriding training.COMMON_RECIPE key by key
    recipe: dict = {}

    def _init_recipe(self, given: dict) -> None:
        """Set the recipe hyperparameters (epochs, lr, ...): the paper's unless `given`."""
        from .training import COMMON_RECIPE
        set_defaults(self, given, {**COMMON_RECIPE, **type(self).recipe})

    def get_params(self) -> dict:
        from .training import COMMON_RECIPE
        return params_with(self, COMMON_RECIPE)

    # --------------------------------------------------------------- what a method defines
    def make_module(self, backbone, classnames: Sequence[str]) -> nn.Module:
        """The learnable parameters (initialised deterministically: the loop seeds torch)."""
        raise NotImplementedError

    def encode_classes(self, backbone, classnames: Sequence[str]) -> Any:
        """What `forward` needs about the classes, computed once per step (differentiable)."""
        raise NotImplementedError

    def forward(self, backbone, images: torch.Tensor, classes: Any) -> torch.Tensor:
        """Logits [B, K] of preprocessed images."""
        raise NotImplementedError

    def vision_prompted(self) -> bool:
        """Whether gradients must flow through the image tower (deep visual prompts)."""
        return False

    # --------------------------------------------------------------- the estimator
    def fit(self, backbone, train, val=None, *, checkpoint: str | Path | None = None,
            progress: bool = True, checkpoint_every: float | None = None) -> "PromptMethod":
        """Learn `module_` on `train` (LabeledImages) choosing the epoch on `val`;
        `checkpoint_every`: seconds between checkpoints inside an epoch (default 300)."""
        from .training import CHECKPOINT_EVERY_S, fit_prompts
        return fit_prompts(self, backbone, train, val, checkpoint=checkpoint, progress=progress,
                           checkpoint_every=CHECKPOINT_EVERY_S if checkpoint_every is None
                           else checkpoint_every)

    def prepare(self, backbone, classnames: Sequence[str]) -> None:
        """Fresh module for `classnames` on `backbone` (the loop calls it before training)."""
        self.module_ = self.make_module(backbone, list(classnames)).to(backbone.device)
        self.classnames_ = list(classnames)
        self.backbone_identity_ = backbone.identity
        self.backbone_weights_hash_ = backbone.weights_hash

    @torch.no_grad()
    def predict_logits(self, backbone, images: torch.Tensor,
                       classnames: Sequence[str] | None = None, classes: Any = None) -> torch.Tensor:
        """Logits [B, K] for `classnames` (default: the trained ones). Pass `classes` (from
        `encode_classes`) to reuse class encodings across batches."""
        self._check_fitted(backbone)
        if classes is None:
            classes = self.encode_classes(backbone, self._classes(classnames))
        return self.forward(backbone, images.to(backbone.device), classes).float()

    def _classes(self, classnames: Sequence[str] | None) -> list[str]:
        names = self.classnames_ if classnames is None else list(classnames)
        if names != self.classnames_ and not self.transfers:
            raise AnyclassError(f"{type(self).__name__} cannot score classes it was not trained on")
        return names

    def _check_fitted(self, backbone) -> None:
        if not hasattr(self, "module_"):
            raise AnyclassError(f"{type(self).__name__} is not fitted: call fit() or load a prompt file")
        if backbone.identity != self.backbone_identity_ or backbone.weights_hash != self.backbone_weights_hash_:
            raise PromptFileError(f"prompts were learned on {self.backbone_identity_} (weights "
                                  f"{self.backbone_weights_hash_[:16]}), not on {backbone.identity} "
                                  f"(weights {backbone.weights_hash[:16]})")

    def n_learned(self) -> int:
        return sum(p.numel() for p in self.module_.parameters())

    # --------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """One safetensors file: learned tensors + identity, class names, recipe (atomic)."""
        from safetensors.torch import save_file

        from ..locks import atomic_path
        path = Path(path)
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "method": self.registry_name(), "hparams": json.dumps(self.get_params()),
                "backbone_identity": self.backbone_identity_,
                "backbone_weights_hash": self.backbone_weights_hash_,
                "classnames": json.dumps(self.classnames_),
                "recipe": json.dumps(getattr(self, "recipe_", {})),
                "anyclass_version": __version__}
        sd = {k: v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp), metadata=meta)
        return path

    @classmethod
    def registry_name(cls) -> str:
        from . import METHODS
        for name in METHODS.names():
            if METHODS.get(name) is cls:
                return name
        raise AnyclassError(f"{cls.__name__} is not registered")


def read_prompt_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a prompt file; refuses anything but our safetensors format."""
    return read_tagged_file(path, FORMAT, "prompt", PromptFileError)


def read_tagged_file(path: str | Path, fmt: str, what: str, error: type[Exception]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one of our safetensors files whose metadata says
    format=`fmt`; anything else (a pickle is never opened) raises `error` naming the path."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: a little-endian u64 header length, then the JSON header; its first byte
    # may well be 0x80, so only a file that is not laid out so is taken for a pickle
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    layout = head[8:9] == b"{" and 8 + n <= path.stat().st_size
    if not layout and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise error(f"{path} is a pickle/torch.save file; anyclass only reads "
                    f"safetensors {what} files (it never unpickles)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path} is not a safetensors {what} file ({e})") from None
    if meta.get("format") != fmt:
        raise error(f"{path} is not an anyclass {what} file (format {meta.get('format')!r})")
    return sd, meta


def load_prompts(path: str | Path, backbone, classnames: Sequence[str] | None = None,
                 allow_new_classes: bool = False) -> PromptMethod:
    """A fitted method from a prompt file, checked against `backbone` and `classnames`."""
    from . import create_method
    sd, meta = read_prompt_file(path)
    if meta["backbone_identity"] != backbone.identity or meta["backbone_weights_hash"] != backbone.weights_hash:
        raise PromptFileError(f"{path} was learned on backbone {meta['backbone_identity']} "
                              f"(weights {meta['backbone_weights_hash'][:16]}), not on "
                              f"{backbone.identity} (weights {backbone.weights_hash[:16]})")
    trained = json.loads(meta["classnames"])
    if classnames is not None and list(classnames) != trained and not allow_new_classes:
        diff = [c for c in classnames if c not in trained][:3] or [c for c in trained if c not in classnames][:3]
        raise PromptFileError(f"{path} was learned for {len(trained)} other classes "
                              f"({', '.join(trained[:4])}...); the classes given differ "
                              f"(e.g. {', '.join(diff) or 'in order'}); pass --new-classes "
                              f"(allow_new_classes=True) to apply its prompts to them")
    method = create_method(meta["method"], **json.loads(meta["hparams"]))
    if not isinstance(method, PromptMethod):
        raise PromptFileError(f"{path}: method {meta['method']!r} does not learn prompts")
    method.prepare(backbone, trained)
    try:
        method.module_.load_state_dict({k: v.to(backbone.device) for k, v in sd.items()})
    except RuntimeError as e:
        raise PromptFileError(f"{path}: tensors do not fit {meta['method']} on "
                              f"{backbone.identity}: {str(e).splitlines()[0]}") from None
    method.module_.eval()
    method.recipe_ = json.loads(meta.get("recipe") or "{}")
    return method
