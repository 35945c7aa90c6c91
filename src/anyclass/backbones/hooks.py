"""Shared machinery for the two prompt hooks of the backbone protocol.

Both hooks are implemented with torch forward hooks on the wrapped library's own modules, so
everything else (masks, positional embeddings, pooling, projections) runs exactly as the
library runs it:

* text (CoOp): a forward hook on the token-embedding layer replaces the embeddings of the first
  run of ``n_ctx`` placeholder tokens in each text by the context vectors;
* deep text (MaPLe): a forward pre-hook on text block ``j + 1`` overwrites the hidden states at
  the positions the context went to with ``deep_ctx[j]``;
* vision (VPT/MaPLe deep prompts): a forward pre-hook on transformer block ``i`` inserts (first
  prompted block) or replaces (later blocks) prompt tokens right after the prefix tokens (the
  class token, if any); a forward hook on the last block drops them again, so the model's own
  pooling sees exactly the tokens it was trained to pool.

The hooks are registered for one call and removed in ``finally``; a backbone must not be used
from two threads at once while a hook call is in flight.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import AnyclassError


class PromptError(AnyclassError, ValueError):
    """Bad context vectors / prompts, or texts without the placeholder run."""


class HookUnsupportedError(AnyclassError, NotImplementedError):
    """The model's architecture does not support a prompt hook (e.g. a ResNet image tower)."""


# ----------------------------------------------------------------------------- text (CoOp)

def placeholder_token_id(tokenize: Callable[[list[str]], torch.Tensor], placeholder: str) -> int:
    """The single token id of `placeholder` tokenised on its own (ids in "X" but not in "")."""
    with_ph = tokenize([placeholder])[0].tolist()
    empty = set(tokenize([""])[0].tolist())
    ids = [i for i in with_ph if i not in empty]
    if len(ids) != 1:
        raise PromptError(f"placeholder {placeholder!r} is not a single token for this tokenizer "
                          f"(got ids {ids}); choose another placeholder word")
    return ids[0]


def word_embeddings(tokenize: Callable[[list[str]], torch.Tensor], embedding: nn.Module,
                    text: str) -> torch.Tensor:
    """[n, W] token embeddings of `text`'s own tokens (no start/end/pad tokens): what CoOp
    initialises its context from ("a photo of a")."""
    empty = set(tokenize([""])[0].tolist())
    ids = [i for i in tokenize([text])[0].tolist() if i not in empty]
    if not ids:
        raise PromptError(f"{text!r} has no tokens of its own for this tokenizer")
    w = embedding.weight
    with torch.no_grad():
        return embedding(torch.tensor(ids, device=w.device)).detach().clone()


def context_starts(ids: torch.Tensor, token_id: int, n_ctx: int, texts: Sequence[str],
                   placeholder: str) -> torch.Tensor:
    """Start index of the first run of `n_ctx` consecutive `token_id` in each row of `ids`."""
    hit = ids == token_id
    if n_ctx > ids.shape[1]:
        raise PromptError(f"{n_ctx} context vectors cannot fit a context length of {ids.shape[1]}")
    run = hit.unfold(1, n_ctx, 1).all(-1)  # [B, L - n_ctx + 1]: a run starts here
    ok = run.any(1)
    if not bool(ok.all()):
        bad = texts[int((~ok).nonzero()[0])]
        raise PromptError(f"text {bad!r} has no run of {n_ctx} placeholder tokens {placeholder!r} "
                          f"(write e.g. {' '.join([placeholder] * n_ctx)!r} where the context goes)")
    return run.int().argmax(1)


def check_context(ctx: torch.Tensor, n_texts: int, width: int) -> torch.Tensor:
    """Validate ctx ([n_ctx, W] or [B, n_ctx, W]) and return it as [B, n_ctx, W]."""
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_texts, -1, -1)
    if ctx.dim() != 3 or ctx.shape[0] != n_texts or ctx.shape[2] != width or ctx.shape[1] == 0:
        raise PromptError(f"ctx must be [n_ctx, {width}] or [{n_texts}, n_ctx, {width}], "
                          f"got {list(ctx.shape)}")
    return ctx


@contextmanager
def replace_token_embeddings(embedding: nn.Module, starts: torch.Tensor,
                             ctx: torch.Tensor) -> Iterator[None]:
    """While active, `embedding`'s output [B, L, W] has rows starts[b]:starts[b]+n_ctx
    replaced by ctx[b] (differentiable in ctx)."""
    def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
        return _replace_rows(out, starts, ctx)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _replace_rows(x: torch.Tensor, starts: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """x [B, L, W] with rows starts[b]:starts[b]+n_ctx set to ctx[b] (out of place, so autograd
    sees the write)."""
    b = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    pos = starts.to(x.device).unsqueeze(1) + torch.arange(ctx.shape[1], device=x.device)
    x = x.clone()
    x[b, pos] = ctx.to(device=x.device, dtype=x.dtype)
    return x


# ---------------------------------------------------------------- text (MaPLe deep context)

def check_deep_context(deep_ctx: Sequence[torch.Tensor | None] | None, n_texts: int, n_ctx: int,
                       width: int, n_layers: int) -> list[torch.Tensor | None]:
    """Validate deep_ctx (each None, [n_ctx, W] or [B, n_ctx, W]; at most n_layers - 1 entries,
    as layer 0's context is ctx itself); return [B, n_ctx, W] tensors or None."""
    if deep_ctx is None:
        return []
    if isinstance(deep_ctx, torch.Tensor):
        raise PromptError("deep_ctx must be a sequence (one entry per text layer from layer 1), not a tensor")
    if len(deep_ctx) > max(n_layers - 1, 0):
        raise PromptError(f"{len(deep_ctx)} deep_ctx entries for a text transformer of {n_layers} layers "
                          f"(at most {max(n_layers - 1, 0)}: layer 0's context is ctx)")
    out: list[torch.Tensor | None] = []
    for j, d in enumerate(deep_ctx):
        if d is not None:
            shape = list(d.shape)
            d = d.unsqueeze(0).expand(n_texts, -1, -1) if d.dim() == 2 else d
            if d.dim() != 3 or d.shape[0] != n_texts or d.shape[2] != width:
                raise PromptError(f"deep_ctx[{j}] must be [{n_ctx}, {width}] or [{n_texts}, {n_ctx}, {width}], "
                                  f"got {shape}")
            if d.shape[1] != n_ctx:
                raise PromptError(f"deep_ctx[{j}] has {d.shape[1]} context vectors but ctx has {n_ctx}")
        out.append(d)
    return out


@contextmanager
def deep_context(blocks: Sequence[nn.Module], starts: torch.Tensor | None,
                 deep_ctx: list[torch.Tensor | None], batch_first: bool = True) -> Iterator[None]:
    """While active, the hidden states entering block j+1 at rows starts[b]:starts[b]+n_ctx (where
    ctx went, so masks and pooling see the same sequence) are replaced by deep_ctx[j][b]; None
    keeps the block's own input. No entry: no hook at all (the plain CoOp computation)."""
    if not any(d is not None for d in deep_ctx):
        yield
        return
    assert starts is not None

    def pre(d: torch.Tensor) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            key = None if args else next(k for k in _HIDDEN_KEYS if k in kwargs)
            x = args[0] if key is None else kwargs[key]
            x = _replace_rows(x if batch_first else x.transpose(0, 1), starts, d)
            x = x if batch_first else x.transpose(0, 1)
            return ((x, *args[1:]), kwargs) if key is None else (args, {**kwargs, key: x})
        return hook

    handles = [blocks[j + 1].register_forward_pre_hook(pre(d), with_kwargs=True)
               for j, d in enumerate(deep_ctx) if d is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------- vision (deep visual prompts)

def check_prompts(prompts: Sequence[torch.Tensor | None] | None, batch: int, width: int,
                  n_layers: int) -> list[torch.Tensor | None]:
    """Validate prompts (each None, [n, W] or [B, n, W]); return [B, n, W] tensors or None."""
    if prompts is None:
        return []
    if isinstance(prompts, torch.Tensor):
        raise PromptError("prompts must be a sequence (one entry per layer), not a tensor")
    if len(prompts) > n_layers:
        raise PromptError(f"{len(prompts)} prompt entries for a vision transformer of {n_layers} layers")
    out: list[torch.Tensor | None] = []
    for i, p in enumerate(prompts):
        if p is None:
            out.append(None)
            continue
        if p.dim() == 2:
            p = p.unsqueeze(0).expand(batch, -1, -1)
        if p.dim() != 3 or p.shape[0] != batch or p.shape[2] != width or p.shape[1] == 0:
            raise PromptError(f"prompts[{i}] must be [n, {width}] or [{batch}, n, {width}] (n >= 1), "
                              f"got {list(p.shape)}")
        out.append(p)
    return out


_HIDDEN_KEYS = ("hidden_states", "x", "q_x")


@contextmanager
def deep_prompts(blocks: Sequence[nn.Module], prompts: list[torch.Tensor | None], n_prefix: int,
                 batch_first: bool = True) -> Iterator[None]:
    """While active, block i receives prompts[i] after its first `n_prefix` tokens (inserted at
    the first prompted block, replacing the previous prompt outputs at later ones; None keeps
    them); the last block's output has the prompt tokens removed."""
    if not any(p is not None for p in prompts):
        yield
        return
    state = {"n": 0}  # prompt tokens currently in the sequence

    def to_bf(x: torch.Tensor) -> torch.Tensor:
        return x if batch_first else x.transpose(0, 1)

    def pre(i: int) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            key = None if args else next(k for k in _HIDDEN_KEYS if k in kwargs)
            x = to_bf(args[0] if key is None else kwargs[key])
            p = prompts[i].to(device=x.device, dtype=x.dtype)
            k, n = n_prefix, state["n"]
            x = to_bf(torch.cat([x[:, :k], p, x[:, k + n:]], dim=1))
            state["n"] = p.shape[1]
            if key is None:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, key: x}
        return hook

    def post(_m: nn.Module, _args: tuple, out: torch.Tensor | tuple) -> torch.Tensor | tuple:
        rest: tuple = ()
        if isinstance(out, tuple):  # older transformers layers return (hidden_states, ...)
            out, rest = out[0], out[1:]
        x = to_bf(out)
        k, n = n_prefix, state["n"]
        x = to_bf(torch.cat([x[:, :k], x[:, k + n:]], dim=1))
        state["n"] = 0
        return (x, *rest) if rest else x

    handles = [blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True)
               for i, p in enumerate(prompts) if p is not None]
    handles.append(blocks[len(blocks) - 1].register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_inputs(blocks: Sequence[nn.Module], n: int, batch_first: bool = True
                   ) -> Iterator[list[torch.Tensor]]:
    """While active, the token sequences entering blocks[:n] are appended (batch-first) to the
    yielded list: the statistics PromptAlign aligns. Enter it after `deep_prompts`, so the
    sequences include the prompt tokens the model really sees."""
    got: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs[next(k for k in _HIDDEN_KEYS if k in kwargs)]
        got.append(x if batch_first else x.transpose(0, 1))

    handles = [blocks[i].register_forward_pre_hook(pre, with_kwargs=True)
               for i in range(min(n, len(blocks)))]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def normalized(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise embeddings; half-precision results (autocast) come back as float32."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return torch.nn.functional.normalize(x, dim=-1)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients (the backbone is frozen; hooks train only prompts)."""
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def logit_scale_and_bias(model: torch.nn.Module) -> tuple[float, float]:
    """(exp(logit_scale), logit_bias) of a CLIP/SigLIP model; bias 0 where it has none."""
    bias = getattr(model, "logit_bias", None)
    return (float(model.logit_scale.detach().exp().mean()),
            float(bias.detach().mean()) if isinstance(bias, torch.Tensor) else 0.0)
