"""LoRA-SP: a random half of the adapter's parameters is frozen, the other half trains.

Wu, Xiang, Huo, Gong, Liang 2024, "LoRA-SP: Streamlined Partial Parameter Adaptation for
Resource-Efficient Fine-Tuning of Large Language Models" (arXiv 2403.08822): randomized half-selective
freezing. For each factor θ ∈ {A, B} a Bernoulli mask M (P[M = 1] = 1 - `frozen_fraction`, 0.5 by
default) selects the entries that train:
    θ_{t+1} = θ_t + M ⊙ Δθ_t        (frozen entries keep their value exactly)
The mask is drawn per factor from `seed` (so a resumed run redraws the same one); with
`resample_every = k > 0` a fresh mask is drawn every k steps (the random selection then moves),
with 0 (default) it stays fixed for the whole run. Gradients of frozen entries are zeroed before the
optimizer step (they never reach Adam's moments) and their values are restored after it (so weight
decay cannot move them either).
"""

from __future__ import annotations

from typing import Any

import torch

from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._factors import factor_pairs, generator, integer, number


@register
class LoraSP(Recipe):
    """LoRA-SP (Wu et al. 2024): a random half of every factor's entries frozen."""

    name = "lora-sp"
    options = {"frozen_fraction": 0.5, "resample_every": 0, "seed": 0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.fraction = number(self.name, self.opts, "frozen_fraction", low=0, high=1, high_open=True)
        self.every = integer(self.name, self.opts, "resample_every")
        self.seed = integer(self.name, self.opts, "seed")

    def setup(self, model, cfg) -> None:
        self.params = {}
        for pair in factor_pairs(model, self.name):
            self.params[pair.key + ".A"] = pair.A
            self.params[pair.key + ".B"] = pair.B
        self._draw(period=0)

    def _draw(self, period: int) -> None:
        """Masks (True = trains) for one period, and the values the frozen entries keep."""
        self.period = period
        self.masks = {k: torch.rand(p.shape, generator=generator(self.seed, f"{k}#{period}")) >= self.fraction
                      for k, p in self.params.items()}
        self.masks = {k: m.to(self.params[k].device) for k, m in self.masks.items()}
        self.frozen_values = {k: p.detach().clone() for k, p in self.params.items()}

    def after_backward(self, model, step: int) -> None:
        period = step // self.every if self.every else 0
        if period != self.period:
            self._draw(period)
        for k, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[k])

    def after_step(self, model, optimizer, step: int) -> dict[str, Any] | None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(torch.where(self.masks[k], p, self.frozen_values[k]))
        return None

    def trainable_fraction(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)
