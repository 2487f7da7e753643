"""GS-LoRA: a group-sparse (group lasso) penalty over groups of LoRA modules.

Zhao, Wang, et al. 2024, "Continual Forgetting for Pre-trained Vision Models" (CVPR 2024): the LoRA
modules are grouped (one group per Transformer block) and the loss gets a group lasso term
    L_total = L + λ Σ_k ‖θ_k‖_2,     θ_k = every A and B entry of group k,
so whole groups go to zero and only the blocks that must change keep an adapter.
A subgradient of ‖θ_k‖ never lands exactly on zero, so by default (`proximal=True`) the penalty is
applied as its proximal operator after each optimizer step (block soft-thresholding, η the current
learning rate):
    θ_k <- θ_k · max(0, 1 - η λ / ‖θ_k‖_2)
which sets a group exactly to zero once its norm falls below ηλ. With `proximal=False` the penalty
is added to the loss instead, as the paper writes it. `groups`: "block" (layers of one Transformer
block, the paper's grouping) or "layer" (each adapted layer alone).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._factors import block_index, choice, factor_pairs, number


def group_norm(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(p.float().pow(2).sum() for p in params))


@register
class GSLoRA(Recipe):
    """GS-LoRA (Zhao et al. 2024): group lasso over LoRA groups; the proximal step zeroes whole groups."""

    name = "gs-lora"
    options = {"weight": 1e-3, "groups": "block", "proximal": True}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.weight = number(self.name, self.opts, "weight", low=0)
        self.grouping = choice(self.name, self.opts, "groups", ("block", "layer"))
        if not isinstance(self.opts["proximal"], bool):
            raise ValueError(f"recipe 'gs-lora': option proximal must be true or false, got {self.opts['proximal']!r}")
        self.proximal = self.opts["proximal"]

    def setup(self, model, cfg) -> None:
        groups: dict[str, list[torch.nn.Parameter]] = defaultdict(list)
        for pair in factor_pairs(model, self.name):
            key = block_index(pair.path) if self.grouping == "block" else pair.key
            groups[key] += [pair.A, pair.B]
        self.groups = dict(groups)

    def make_optimizer(self, model, cfg) -> torch.optim.Optimizer:
        self.optimizer = super().make_optimizer(model, cfg)
        return self.optimizer

    def after_backward(self, model, step: int) -> None:
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the rate of the step about to be taken

    def penalty(self) -> torch.Tensor:
        """λ Σ_k ‖θ_k‖_2 (differentiable)."""
        return self.weight * sum(group_norm(ps) for ps in self.groups.values())

    def loss(self, model, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, int]:
        loss, n = super().loss(model, batch, step)
        if not self.proximal and self.weight > 0:
            loss = loss + self.penalty()
        return loss, n

    @torch.no_grad()
    def prox(self, lr: float) -> None:
        """Block soft-thresholding of every group with threshold lr · λ."""
        for params in self.groups.values():
            norm = group_norm(params)
            factor = torch.clamp(1 - lr * self.weight / norm, min=0.0) if norm > 0 else norm.new_zeros(())
            for p in params:
                p.mul_(factor.to(p.dtype))

    def after_step(self, model, optimizer, step: int) -> dict[str, Any] | None:
        if self.proximal and self.weight > 0:
            self.prox(self.step_lr)
        zero = sum(1 for ps in self.groups.values() if all(not bool(p.any()) for p in ps))
        return {"zero_groups": zero, "groups": len(self.groups)}
