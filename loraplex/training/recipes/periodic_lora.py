"""PeriodicLoRA (Meng et al. 2024, "PeriodicLoRA: Breaking the Low-Rank Bottleneck in LoRA
Optimization", arXiv 2402.16141): training in stages; at the end of each stage the LoRA weights are
unloaded into the backbone and the LoRA states are reinitialised, so the total update
Σ_k s B_k A_k reaches a rank above r.

Momentum-based unloading (option `momentum` μ ∈ (0, 1]): only the fraction μ is unloaded,
    W ← W + μ s B A,    B ← (1 - μ) B    (A and the optimizer state kept),
which leaves the model's function unchanged at the unloading step and lets the adapter carry the
rest of its update into the next stage. μ = 1 (the default) is plain unloading: A redrawn, B = 0 and
the optimizer state of A and B cleared. The paper names the strategy but this exact split of one
update into an unloaded and a kept part is our formulation; it conserves B A's total exactly.

Everything else (checkpoint/resume across stages, the saved single adapter holding the whole chain as
a delta on the original base) is Chain of LoRA's machinery, see `chain_of_lora.py`.
"""

from __future__ import annotations

import math
from typing import Any

from loraplex.training.recipes import register
from loraplex.training.recipes.chain_of_lora import ChainOfLora


@register
class PeriodicLora(ChainOfLora):
    """PeriodicLoRA (Meng et al. 2024): unload all (or a momentum share) of the adapter every K steps."""

    name = "periodic-lora"
    options = {"every": 20, "momentum": 1.0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        mu = self.opts["momentum"]
        if (not isinstance(mu, (int, float)) or isinstance(mu, bool) or not math.isfinite(mu)
                or not 0 < mu <= 1):
            raise ValueError(f"recipe {self.name!r}: option momentum must be in (0, 1] (the fraction of the "
                             f"adapter unloaded into the base each stage), got {mu!r}")
        self.momentum = float(mu)
