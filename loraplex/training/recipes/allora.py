"""ALLoRA: no dropout, no scaling factor, and a per-row learning rate inversely proportional to the
row's norm.

Huang, Balestriero 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws"
(arXiv 2410.09692): LoRA's dropout and its alpha / r factor are removed (y = W x + B A x) and every
gradient is scaled by a coefficient inversely proportional to the l2 norm of the parameters it updates.
Per row i of each factor (a row of A: one rank's input direction; a row of B: one output unit's
coefficients):
    ∇θ_i  <-  ∇θ_i / sqrt(‖θ_i‖² + 1/η²)
so a row starting at zero (every row of B) moves at rate η and the rate falls as the row grows. The
coefficient depends on the parameters only, so scaling each sample's gradient (the paper's wording)
and scaling the batch gradient are the same; it is applied after the backward pass, before clipping.
"""

from __future__ import annotations

from typing import Any

import torch

from loraplex.core.config import LoraConfig
from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._factors import factor_pairs, number


def allora_coefficient(param: torch.Tensor, eta: float) -> torch.Tensor:
    """1 / sqrt(‖θ_i‖² + 1/η²) per row i, shaped to broadcast over the row."""
    sq = param.detach().float().pow(2).sum(dim=1, keepdim=True)
    return torch.rsqrt(sq + 1.0 / eta**2)


@register
class ALLoRA(Recipe):
    """ALLoRA (Huang & Balestriero 2024): no dropout, scale 1, per-row gradient / sqrt(‖row‖² + 1/η²)."""

    name = "allora"
    options = {"eta": 1.0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.eta = number(self.name, self.opts, "eta", low=0, low_open=True)

    def adapter_config(self, config: LoraConfig) -> LoraConfig:
        # scaling-free and dropout-free: alpha = r gives s = alpha / r = 1 (no rsLoRA)
        return config.replace(dropout=0.0, alpha=float(config.r), rslora=False,
                              alpha_pattern={k: float(v) for k, v in config.rank_pattern.items()})

    def setup(self, model, cfg) -> None:
        self.pairs = factor_pairs(model, self.name)
        for pair in self.pairs:
            if abs(pair.adapter.scale - 1.0) > 1e-12:
                raise ValueError(f"recipe 'allora' trains without a scaling factor, but {pair.path} has scale "
                                 f"{pair.adapter.scale:g}; resume only runs that were started with --recipe allora")

    def after_backward(self, model, step: int) -> None:
        for pair in self.pairs:
            for p in (pair.A, pair.B):
                if p.grad is not None:
                    p.grad.mul_(allora_coefficient(p, self.eta).to(p.grad.dtype))
