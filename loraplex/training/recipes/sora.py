"""SoRA (Ding, Lv, Wang, Chen, Liu, Wang, Zhou 2023, "Sparse Low-rank Adaptation of Pre-trained
Language Models", EMNLP): a gate g ∈ R^r between LoRA's factors,
    h = W x + s · B (g ⊙ A x),
trained by proximal gradient for an L1 penalty: after each optimizer step
    g ← T_{η_t ξ}(g) = sign(g) · max(|g| − η_t ξ, 0)
(η_t the gate group's current learning rate, ξ option `xi`; `xi_times_lr=False` thresholds by ξ
alone, as the reference code's plain `SparseAdamW`). Soft-thresholding sets small gates EXACTLY to
zero, and a zero gate switches its rank off. At save time the zeroed ranks are removed: each layer
becomes a plain LoRA of rank ‖g‖₀ (the gate folded into A), listed in PEFT's `rank_pattern`.
Gates start as the reference code's N(0, 1) draw (option `gate_init`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from loraplex.core.config import LoraConfig
from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._lowrank import (
    adapters,
    finalized,
    gated_config,
    prune_to_plain_lora,
    trained_adapter,
)


def soft_threshold(g: torch.Tensor, tau: float) -> torch.Tensor:
    """The proximal operator of tau·‖g‖₁ (in place): sign(g) · max(|g| − tau, 0)."""
    return g.copy_(torch.sign(g) * torch.clamp(g.abs() - tau, min=0.0))


@register
class Sora(Recipe):
    """SoRA (Ding et al. 2023): rank gates with a proximal L1 step; zeroed ranks removed on save."""

    name = "sora"
    options = {"xi": 1e-3, "gate_lr": None, "gate_init": "randn", "xi_times_lr": True}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        xi, gate_lr = self.opts["xi"], self.opts["gate_lr"]
        if not isinstance(xi, (int, float)) or isinstance(xi, bool) or not math.isfinite(xi) or xi < 0:
            raise ValueError(f"recipe 'sora': option xi (the L1 strength) must be a number >= 0, got {xi!r}")
        if gate_lr is not None and (not isinstance(gate_lr, (int, float)) or not gate_lr > 0):
            raise ValueError(f"recipe 'sora': option gate_lr must be a positive number or None, got {gate_lr!r}")

    def adapter_config(self, config: LoraConfig) -> LoraConfig:
        return gated_config(config, self.name, gate="linear", gate_init=self.opts["gate_init"])

    def setup(self, model, cfg) -> None:
        self.adapter_name = trained_adapter(model)
        self.gates: list[torch.Tensor] = []
        self.done = finalized(model, self.adapter_name)
        if self.done:  # resuming a finished run: the adapter is the saved plain LoRA already
            return
        self.gates = [a.lora_gate for a in adapters(model, self.adapter_name, "gated-lora").values()
                      if getattr(a, "lora_gate", None) is not None]
        if not self.gates:
            raise ValueError("recipe 'sora' needs gated adapters (gate='linear'); attach through adapter_config")

    def param_groups(self, model, cfg) -> list[dict[str, Any]]:
        if self.done:
            return super().param_groups(model, cfg)
        gate_ids = {id(g) for g in self.gates}
        rest = [p for p in model.trainable_parameters() if id(p) not in gate_ids]
        gate_lr = self.opts["gate_lr"] or cfg.lr
        return [{"params": rest}, {"params": self.gates, "lr": gate_lr, "weight_decay": 0.0, "sora_gates": True}]

    def make_optimizer(self, model, cfg) -> torch.optim.Optimizer:
        self.optimizer = super().make_optimizer(model, cfg)
        return self.optimizer

    def after_backward(self, model, step: int) -> None:
        if self.done:
            return
        # the learning rate of the step about to be taken (the scheduler moves it before after_step)
        self.step_lr = next(g["lr"] for g in self.optimizer.param_groups if g.get("sora_gates"))

    def after_step(self, model, optimizer, step: int) -> dict[str, Any] | None:
        if self.done:
            return None
        tau = self.opts["xi"] * (self.step_lr if self.opts["xi_times_lr"] else 1.0)
        with torch.no_grad():
            for g in self.gates:
                soft_threshold(g, tau)
        nonzero = sum(int((g != 0).sum()) for g in self.gates)
        return {"sora_ranks": nonzero}

    def finalize(self, model) -> None:
        if not finalized(model, self.adapter_name):
            prune_to_plain_lora(model, self.adapter_name)
