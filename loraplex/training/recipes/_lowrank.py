"""Helpers the restart and dynamic-rank recipes share: finding the trained adapter, resetting ranks in
place (the optimizer keeps holding the same parameter objects), clearing optimizer state, and turning
the trained adapter into a plain LoRA with per-layer ranks at save time."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter
from loraplex.core.config import LoraConfig


def trained_adapter(model) -> str:
    """Name of the adapter being trained (the single active one)."""
    active = getattr(model, "active", None)
    if not active or len(active) != 1:
        raise ValueError("this recipe trains exactly one active adapter; "
                         f"active adapters: {[n for n, _ in active or []]}")
    return active[0][0]


def adapters(model, name: str, method: str | None = None) -> dict[str, Adapter]:
    """Adapter `name` per layer path; with `method`, refuse adapters of another method or layer kind."""
    layers = model.adapted_layers(name)
    out = {path: layer.adapters[name] for path, layer in layers.items()}
    for path, adapter in out.items():
        if method is not None and adapter.method != method:
            raise ValueError(f"{path}: this recipe needs method {method!r}, the adapter is {adapter.method!r}")
        kind = layers[path].spec.kind
        if kind not in (LINEAR, GPT2_CONV1D):
            raise ValueError(f"{path}: this recipe supports linear layers only, not {kind}; "
                             "restrict `targets` to linear layers")
    return out


def kaiming_rows(n: int, d_in: int, like: torch.Tensor) -> torch.Tensor:
    """n fresh rows of A, as LoRA's kaiming_uniform_(a=sqrt(5)) init: U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    bound = 1 / math.sqrt(d_in)
    return torch.empty(n, d_in, dtype=like.dtype, device=like.device).uniform_(-bound, bound)


def clear_state(optimizer: torch.optim.Optimizer, params) -> None:
    """Forget the optimizer state of `params` (moments and step count): they restart from scratch."""
    for p in params:
        optimizer.state.pop(p, None)


def zero_state_slices(optimizer: torch.optim.Optimizer, param: nn.Parameter, index: torch.Tensor, dim: int) -> None:
    """Zero the optimizer's per-entry state (e.g. Adam moments) of `param` at `index` along `dim`."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.index_fill_(dim, index.to(value.device), 0)


def replace_with_plain_lora(model, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Swap adapter `name` for a plain LoRA holding `factors` (path -> (A, s·B)), active in its place.

    Each layer gets its own rank (`rank_pattern`) and alpha = rank, so its scale is 1 and B carries the
    scale; layers whose rank is 0 are left out. The file PEFT reads lists those ranks in `rank_pattern`.
    """
    from loraplex.methods.lora import values_from_file

    old = model.configs[name]
    kept = {p: (a, b) for p, (a, b) in factors.items() if a.shape[0] > 0}
    if not kept:
        raise ValueError(f"adapter {name!r}: every rank of every layer was pruned; nothing is left to save. "
                         "Lower the pruning strength (e.g. a smaller L1 weight or a larger rank budget)")
    ranks = {p: a.shape[0] for p, (a, _) in kept.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(p): r for p, r in ranks.items() if r != r0}
    config = LoraConfig(r=r0, alpha=float(r0), targets=list(kept), rank_pattern=pattern,
                        alpha_pattern={k: float(v) for k, v in pattern.items()}, dtype=old.dtype, bias=old.bias)
    model.delete_adapter(name)
    with values_from_file():
        model.add_adapter(name, config, targets=list(kept))
    with torch.no_grad():
        for path, (a, b) in kept.items():
            adapter = model.adapted_layers(name)[path].adapters[name]
            adapter.lora_A.copy_(a)
            adapter.lora_B.copy_(b)
    model.set_active(name)


def gated_config(config: LoraConfig, recipe: str, **options) -> LoraConfig:
    """The trained config switched to the gated LoRA of `loraplex.methods.gated_lora` (same r, alpha, targets)."""
    if config.method not in ("lora", "gated-lora"):
        raise ValueError(f"recipe {recipe!r} trains a gated LoRA over a maximum rank; method must be 'lora', "
                         f"got {config.method!r}")
    if config.dora:
        raise ValueError(f"recipe {recipe!r} does not combine with DoRA (dora=True); its ranks are gated LoRA ranks")
    return config.replace(method="gated-lora", options={**dict(config.options or {}), **options})


def prune_to_plain_lora(model, name: str) -> None:
    """Replace a gated LoRA by a plain LoRA holding only its kept ranks (gates and scale folded in)."""
    factors = {p: a.pruned_factors() for p, a in adapters(model, name, "gated-lora").items()}
    replace_with_plain_lora(model, name, factors)


def finalized(model, name: str) -> bool:
    """True when adapter `name` is already the plain LoRA `finalize` makes (resuming a finished run)."""
    return all(a.method == "lora" for a in adapters(model, name).values())
