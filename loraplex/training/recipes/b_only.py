"""Train B only, with a random frozen A (the asymmetry of the LoRA factors).

Zhu, Greenewald, Nadjahi, et al. 2024, "Asymmetry in Low-Rank Adapters of Foundation Models"
(arXiv 2402.16842): in ΔW = s · B A, A acts as a random feature extractor and B learns the task, so
    A ~ random and frozen,   B trained from zero
does as well as training both, with half the trainable parameters (and a generalisation bound that
depends on B alone). `a_init`:
  * "orthogonal": A redrawn with orthonormal rows, uniformly (Haar) distributed: the QR factor of a
    Gaussian matrix with the signs of R's diagonal folded in (the paper's random orthogonal A);
  * "keep": A as the adapter was initialised (Kaiming-uniform for method 'lora').
A is drawn once, from `seed`, before training; a resumed run keeps the A saved in its checkpoint.
Training goes through LoRA-FA's frozen-A path, so layers also keep only A x for the backward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._factors import choice, generator, integer
from loraplex.training.recipes.lora_fa import freeze_a


def haar_orthonormal_rows(r: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """An r x d matrix with orthonormal rows drawn from the Haar measure (r <= d)."""
    if r > d:
        raise ValueError(f"recipe 'b-only': a_init='orthogonal' needs r <= d_in, got r={r} > d_in={d}; "
                         "use a_init=keep or a smaller r")
    q, rr = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(rr)).where(torch.diagonal(rr) != 0, torch.ones(()))
    return q.t().contiguous()


@register
class BOnly(Recipe):
    """Asymmetric LoRA (Zhu et al. 2024): A random and frozen, only B trains."""

    name = "b-only"
    options = {"a_init": "orthogonal", "seed": 0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.a_init = choice(self.name, self.opts, "a_init", ("orthogonal", "keep"))
        self.seed = integer(self.name, self.opts, "seed")

    def setup(self, model, cfg) -> None:
        self.pairs = freeze_a(model, self.name, memory_efficient=True)
        if self.a_init == "orthogonal" and not cfg.resume:  # resuming: A comes from the checkpoint
            with torch.no_grad():
                for pair in self.pairs:
                    r, d = pair.A.shape
                    pair.A.copy_(haar_orthonormal_rows(r, d, generator(self.seed, pair.key)).to(pair.A.dtype))
