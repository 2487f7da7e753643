"""Shared pieces of the optimizer-side recipes: finding the low-rank factors and checking options.

Most recipes act on the `A` (r x d_in) and `B` (d_out x r) factors of the adapters being trained:
`factor_pairs` finds them on every active adapter that has `lora_A` / `lora_B` (plain LoRA and the
methods built the same way), keyed by a stable name, so recipe state can be saved by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class FactorPair:
    """The factors of one adapter on one layer."""

    key: str             # "<layer path>" (adapter name "default") or "<layer path>@<adapter>"
    path: str            # the adapted layer's path
    adapter: nn.Module
    A: nn.Parameter      # r x d_in
    B: nn.Parameter      # d_out x r


def factor_pairs(model, recipe: str, names: list[str] | None = None) -> list[FactorPair]:
    """(A, B) of every active adapter with `lora_A` / `lora_B`; an error naming the recipe when there
    are none (e.g. a full-parameter model, or a method without separate low-rank factors)."""
    if not hasattr(model, "adapted_layers"):
        raise ValueError(f"recipe {recipe!r} trains LoRA factors; the model has no adapters")
    names = names or [n for n, _ in model.active]
    pairs = []
    for name in names:
        for path, layer in model.adapted_layers(name).items():
            adapter = layer.adapters[name]
            a, b = getattr(adapter, "lora_A", None), getattr(adapter, "lora_B", None)
            if isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter) and a.dim() == 2 and b.dim() == 2:
                key = path if name == "default" else f"{path}@{name}"
                pairs.append(FactorPair(key, path, adapter, a, b))
    if not pairs:
        methods = sorted({model.configs[n].method for n in names}) if names else []
        raise ValueError(f"recipe {recipe!r} needs adapters with low-rank factors lora_A / lora_B on linear "
                         f"layers (e.g. method 'lora'); the active adapter(s) use {', '.join(methods) or 'none'}")
    return pairs


def block_index(path: str) -> str:
    """The transformer block a layer belongs to: the first integer in its path ("model.layers.3.mlp..."
    -> "3"); a path without one is its own block."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return match.group(1) if match else path


def number(recipe: str, options: dict[str, Any], key: str, *, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False) -> float:
    """A finite number option within [low, high] (bounds open when asked), or a clear error."""
    value = options[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        span = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"recipe {recipe!r}: option {key} must be a number in {span}, got {value!r}")
    return float(value)


def integer(recipe: str, options: dict[str, Any], key: str, *, low: int = 0) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"recipe {recipe!r}: option {key} must be an integer >= {low}, got {value!r}")
    return value


def choice(recipe: str, options: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = options[key]
    if value not in allowed:
        raise ValueError(f"recipe {recipe!r}: option {key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def generator(seed: int, salt: str) -> torch.Generator:
    """A CPU generator for one purpose, reproducible from (seed, purpose) so a resumed run redraws
    exactly what the uninterrupted one drew."""
    mixed = (seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(salt))) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)
