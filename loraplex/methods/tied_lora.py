"""Tied-LoRA: one low-rank pair tied across layers, per-layer scaling vectors, selective training.

Renduchintala, Konuk, Kuchaiev 2023, "Tied-LoRA: Enhancing parameter efficiency of LoRA with Weight
Tying" (arXiv 2311.09578):
    y = W x + b + s · Λ_v B Λ_u A x,        s = alpha / r (alpha / sqrt(r) with rslora),
    A: r x d_in and B: d_out x r tied (one pair shared by every layer of a group),
    u ∈ R^r and v ∈ R^d_out per layer (Λ = diag).
Selective training (option `train`, the paper's vBuA notation): any non-empty subset of A, B, u, v
trains, the rest is frozen (stored as buffers). "vBuA" (default) trains all four; "vu" with A, B
frozen is VeRA-like; "BA" is plain tied LoRA with u = v = 1.

Tying groups (option `tie`): "name" (default) ties layers with the same module name and shape (every
q_proj across blocks, as the paper ties one projection type across layers); "shape" ties all layers
of one shape.

Initialisation: A is Kaiming-uniform (bound 1/sqrt(d_in), LoRA's), B uniform with bound 1/sqrt(r),
u = v = 1; the first trainable factor in the order B, v, u, A starts at zero so the adapter starts as
the identity and still gets a gradient (B = 0 as in LoRA when B trains). `init="random"` makes every
factor non-zero (tests).

The update is additive, rank <= r and mergeable; `as_lora` gives A' = Λ_u A, B' = s Λ_v B. Files:
per layer `tied_lora_u`, `tied_lora_v`; the tied pairs once, at `base_model.tied_lora.<group>.lora_A`
/ `.lora_B` (not a PEFT method: peft_type "TIED_LORA").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.vera import (
    check_init,
    check_options,
    check_uniform_rank,
    group_layers,
    take_shared,
)

PREFIX = "base_model.tied_lora."
FACTORS = ("A", "B", "u", "v")


def parse_train(value) -> frozenset[str]:
    """The trained factors from "vBuA"-style letters or a list such as ["A", "B"]."""
    letters = list(value) if isinstance(value, str) else value
    if not isinstance(letters, (list, tuple)) or not letters or any(f not in FACTORS for f in letters):
        raise ValueError(f"option train must name a non-empty subset of A, B, u, v (e.g. 'vBuA', 'BA', 'vu'), "
                         f"got {value!r}")
    return frozenset(letters)


def zero_factor(train: frozenset[str]) -> str:
    """The factor that starts at zero: the first trained one of B, v, u, A."""
    return next(f for f in ("B", "v", "u", "A") if f in train)


def _register(module: nn.Module, name: str, value: torch.Tensor, trainable: bool) -> None:
    if trainable:
        setattr(module, name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


class TiedPair(nn.Module):
    """The A, B of one tying group; trained ones are parameters, frozen ones buffers."""

    def __init__(self, r: int, d_in: int, d_out: int, train: frozenset[str], init: str, dtype, device) -> None:
        super().__init__()
        zero = None if init == "random" else zero_factor(train)
        a = torch.empty(r, d_in).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in))
        b = torch.empty(d_out, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r))
        if zero == "A":
            a.zero_()
        if zero == "B":
            b.zero_()
        _register(self, "lora_A", a.to(device=device, dtype=dtype), "A" in train)
        _register(self, "lora_B", b.to(device=device, dtype=dtype), "B" in train)


class TiedFactors(nn.Module):
    """Every tied pair of one Tied-LoRA adapter, one per group of layers."""

    def __init__(self, pairs: dict[str, TiedPair], layer_groups: dict[int, str]) -> None:
        super().__init__()
        self.pairs = nn.ModuleDict(pairs)
        self.layer_groups = layer_groups   # id(base layer) -> group (used while the adapters are built)

    def to_peft(self) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{g}.lora_{f}": getattr(p, f"lora_{f}") for g, p in self.pairs.items() for f in "AB"}

    def from_peft(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        return take_shared(tensors, self.to_peft(), " (Tied-LoRA's tied pairs)")


@register
class TiedLoraAdapter(Adapter):
    """Tied-LoRA: y = W x + b + s Λ_v B Λ_u A x with A, B tied across layers."""

    method = "tied-lora"
    paper = ("Renduchintala, Konuk, Kuchaiev 2023, Tied-LoRA: Enhancing parameter efficiency of LoRA with "
             "Weight Tying (arXiv 2311.09578)")
    serving_form = "low-rank"
    peft_type = "TIED_LORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"train": "vBuA", "tie": "name"}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config, shared: TiedFactors | None = None) -> None:
        super().__init__(spec, r, alpha, config, shared)
        train, _ = self.options(config)
        init = check_init(config, ("kaiming", "random"))
        check_uniform_rank(config, r)
        if shared is None or id(spec.base) not in shared.layer_groups:
            raise ValueError("Tied-LoRA needs the tied factors (build_shared)")
        self.group = shared.layer_groups[id(spec.base)]
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        zero = None if init == "random" else zero_factor(train)
        u, v = torch.ones(r), torch.ones(spec.out_features)
        if init == "random":
            u, v = torch.randn(r), torch.randn(spec.out_features)
        if zero == "u":
            u.zero_()
        if zero == "v":
            v.zero_()
        _register(self, "tied_lora_u", u.to(device=device, dtype=dtype), "u" in train)
        _register(self, "tied_lora_v", v.to(device=device, dtype=dtype), "v" in train)

    @classmethod
    def options(cls, config) -> tuple[frozenset[str], str]:
        options = check_options(config, cls.option_defaults)
        if options["tie"] not in ("name", "shape"):
            raise ValueError(f"option tie must be 'name' (same module name and shape) or 'shape', "
                             f"got {options['tie']!r}")
        return parse_train(options["train"]), options["tie"]

    @classmethod
    def build_shared(cls, config, specs: dict[str, LayerSpec]) -> TiedFactors:
        train, tie = cls.options(config)
        init = check_init(config, ("kaiming", "random"))
        pairs, layer_groups = {}, {}
        for group, members in group_layers(specs, tie).items():
            first = members[0]
            pairs[group] = TiedPair(config.r, first.in_features, first.out_features, train, init,
                                    config.torch_dtype, first.base.weight.device)
            layer_groups.update({id(s.base): group for s in members})
        return TiedFactors(pairs, layer_groups)

    # --- the math ---
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.shared.pairs[self.group]
        return pair.lora_A, pair.lora_B

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        a, b = self.factors()
        x = x.to(a.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = (x @ a.t()) * self.tied_lora_u                  # Λ_u A x
        return ((h @ b.t()) * (self.tied_lora_v * self.scale)).to(base_out.dtype)   # s Λ_v B (Λ_u A x)

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors()
        return (self.tied_lora_u.detach().float()[:, None] * a.detach().float(),
                self.tied_lora_v.detach().float()[:, None] * b.detach().float() * self.scale)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        a, b = self.factors()
        return ((self.tied_lora_v.float()[:, None] * b.float()) @ (self.tied_lora_u.float()[:, None] * a.float())
                * self.scale)

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"tied_lora_u": self.tied_lora_u, "tied_lora_v": self.tied_lora_v}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, group={self.group}"
