"""LoRA-FA: A frozen at its random initialisation, only B trains, and no full-rank input is stored.

Zhang, Zhang, Shi, Chu, Li 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning" (arXiv 2308.03303):
    y = W x + s · B (A x),   A frozen (random init), B trained (zero init).
With A and W frozen the backward pass needs only the r-dimensional projection z = A x:
    ∂L/∂B = s · gᵀ z,    ∂L/∂x = g W + s · (g B) A        (g = ∂L/∂y)
so each adapted layer keeps z (N x r) for the backward pass instead of its input x (N x d_in).
`FrozenALinear` is that forward/backward; the recipe routes every plain-LoRA linear adapter through
it (the adapter's own tensors and file format are unchanged: this is a training-time recipe).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from loraplex.core.adapter import GPT2_CONV1D, LINEAR
from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._factors import factor_pairs


class FrozenALinear(torch.autograd.Function):
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ, saving only z = x Aᵀ (and the parameters) for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        z = x2 @ lora_a.t()
        y.addmm_(z, lora_b.t(), alpha=scale)
        ctx.save_for_backward(z, weight, lora_a, lora_b)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        z, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(g @ lora_b, lora_a, alpha=ctx.scale).view(ctx.x_shape)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ z).mul_(ctx.scale)
        return grad_x, None, None, None, grad_b, None


def _frozen_a_forward(self, x: torch.Tensor, spec, weight: float) -> torch.Tensor | None:
    """An adapter's `fused_forward` under LoRA-FA: the frozen-A function while training, else the
    method's own path (evaluation, DoRA, dropout, other layer kinds fall back to it)."""
    w, b = spec.weight, spec.bias
    if (torch.is_grad_enabled() and spec.kind in (LINEAR, GPT2_CONV1D) and not getattr(self, "use_dora", False)
            and (getattr(self, "dropout", None) is None or not self.training)
            and not self.lora_A.requires_grad and not w.requires_grad and (b is None or not b.requires_grad)
            and x.dtype == self.lora_A.dtype == w.dtype):
        return FrozenALinear.apply(x, w, b, self.lora_A, self.lora_B, self.scale * weight)
    return type(self).fused_forward(self, x, spec, weight)


def freeze_a(model, recipe: str, memory_efficient: bool) -> list:
    """Freeze every A factor; with `memory_efficient`, route plain-LoRA linear adapters through
    `FrozenALinear`. Returns the factor pairs."""
    pairs = factor_pairs(model, recipe)
    for pair in pairs:
        pair.A.requires_grad_(False)
        if memory_efficient and getattr(pair.adapter, "method", "") == "lora":
            # an instance attribute shadows the class method for this adapter only
            pair.adapter.fused_forward = types.MethodType(_frozen_a_forward, pair.adapter)
    return pairs


@register
class LoraFA(Recipe):
    """LoRA-FA (Zhang et al. 2023): A frozen, only B trains; layers keep A x, not x, for backward."""

    name = "lora-fa"
    options: dict[str, Any] = {}

    def setup(self, model, cfg) -> None:
        # frozen before the loop collects the trainable parameters: A never reaches the optimizer
        self.pairs = freeze_a(model, self.name, memory_efficient=True)
