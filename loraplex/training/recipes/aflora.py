"""AFLoRA: the low-rank projection matrices are frozen progressively, by a freezing score.

Liu, Kundu, Li, Wan, Jiang, Beerel 2024, "AFLoRA: Adaptive Freezing of Low Rank Adaptation in
Parameter Efficient Fine-Tuning of Large Models" (ACL 2024, arXiv 2403.13269), as its code does it:
  * sensitivity of each entry, averaged over a window of ΔT steps:  I = |∇θ|
  * every ΔT steps, smoothed:   Ī ← β1 Ī + (1-β1) I,    Ū ← β2 Ū + (1-β2) |I - Ī|
  * freezing score of a projection matrix (an A or a B):  s = mean(Ī ⊙ Ū)
  * trainable fraction, cubic in the step t (T steps, t_i warm-up, t_f final steps):
        ρ(t) = 1                                                 t <= t_i
        ρ(t) = (1 - (t - t_i) / (T - t_i - t_f))³                t_i < t <= T - t_f
        ρ(t) = 0                                                 t > T - t_f
  * every ΔT steps after t_i: the threshold τ is the (1-ρ)-quantile of Ī ⊙ Ū over the entries of the
    matrices still training; each one whose score s < τ is frozen for good. After T - t_f every
    projection matrix is frozen.
`warmup_fraction` = t_i / T and `final_fraction` = t_f / T (the paper: t_i = one epoch, t_f = 70% of
the steps; our defaults 0.1 and 0.7).
The module is y = W x + Λ_b B Λ_d A x with trainable feature-transformation vectors that keep training
after the projections are frozen. The adapter is `gated-lora` with a linear gate: the gate is Λ_d
(initialised to 1, so the start is plain LoRA's: A Kaiming, B = 0); the output vector Λ_b is not
modelled (it stays 1), a simplification of the paper's module.
"""

from __future__ import annotations

from typing import Any

import torch

from loraplex.core.config import LoraConfig
from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._factors import factor_pairs, integer, number


def trainable_fraction(step: int, total: int, warmup: int, final: int) -> float:
    """ρ(t): the fraction of the score distribution that stays trainable at step t."""
    if step <= warmup:
        return 1.0
    if step > total - final:
        return 0.0
    return (1.0 - (step - warmup) / max(total - warmup - final, 1)) ** 3


@register
class AFLoRA(Recipe):
    """AFLoRA (Liu et al. 2024): projection matrices frozen one by one by a smoothed-gradient score."""

    name = "aflora"
    options = {"beta1": 0.85, "beta2": 0.95, "delta_t": 10, "warmup_fraction": 0.1, "final_fraction": 0.7}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.beta1 = number(self.name, self.opts, "beta1", low=0, high=1, high_open=True)
        self.beta2 = number(self.name, self.opts, "beta2", low=0, high=1, high_open=True)
        self.delta_t = integer(self.name, self.opts, "delta_t", low=1)
        self.warmup_fraction = number(self.name, self.opts, "warmup_fraction", low=0, high=1)
        self.final_fraction = number(self.name, self.opts, "final_fraction", low=0, high=1)
        if self.warmup_fraction + self.final_fraction > 1:
            raise ValueError("recipe 'aflora': warmup_fraction + final_fraction must be <= 1, got "
                             f"{self.warmup_fraction} + {self.final_fraction}")
        self.frozen: list[str] = []

    def adapter_config(self, config: LoraConfig) -> LoraConfig:
        from loraplex.methods import available

        if "gated-lora" not in available():
            raise ValueError("recipe 'aflora' builds its adapter with method 'gated-lora', which is not installed")
        if config.method not in ("lora", "gated-lora") or config.dora:
            raise ValueError(f"recipe 'aflora' trains its own adapter (LoRA factors plus a trainable vector); use "
                             f"method 'lora' without DoRA, not {config.method!r}")
        init = config.init if config.init in ("kaiming", "gaussian", "random") else "kaiming"
        return config.replace(method="gated-lora", init=init, options={"gate": "linear", "gate_init": 1.0})

    def setup(self, model, cfg) -> None:
        self.params = {}
        for pair in factor_pairs(model, self.name):
            self.params[pair.key + ".A"] = pair.A
            self.params[pair.key + ".B"] = pair.B
        self.ipt = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in self.params.items()}
        self.exp_ipt = {k: torch.zeros_like(v) for k, v in self.ipt.items()}
        self.exp_unc = {k: torch.zeros_like(v) for k, v in self.ipt.items()}
        self.total_steps = self.total_steps or cfg.steps  # the loop sets it (epochs or steps)
        self.warmup = int(self.warmup_fraction * self.total_steps)
        self.final = int(self.final_fraction * self.total_steps)

    def _apply_frozen(self) -> None:
        for k in self.frozen:
            self.params[k].requires_grad_(False)
            self.params[k].grad = None

    def after_backward(self, model, step: int) -> None:
        # the code's "local window": I averaged over the steps since the last smoothing
        local = step % self.delta_t
        with torch.no_grad():
            for k, p in self.params.items():
                if k in self.frozen or p.grad is None:
                    continue
                g = p.grad.detach().float().abs()
                if local == 0:
                    self.exp_ipt[k].mul_(self.beta1).add_(self.ipt[k], alpha=1 - self.beta1)
                    self.exp_unc[k].mul_(self.beta2).add_((self.ipt[k] - self.exp_ipt[k]).abs(), alpha=1 - self.beta2)
                    self.ipt[k].copy_(g)
                else:
                    self.ipt[k].mul_(local).add_(g).div_(local + 1)

    def scores(self) -> dict[str, torch.Tensor]:
        """Ī ⊙ Ū per entry of every matrix still training."""
        return {k: self.exp_ipt[k] * self.exp_unc[k] for k in self.params if k not in self.frozen}

    def after_step(self, model, optimizer, step: int) -> dict[str, Any] | None:
        t = step + 1
        rho = trainable_fraction(t, self.total_steps, self.warmup, self.final)
        if t <= self.warmup:
            return None
        fields = {"frozen_matrices": len(self.frozen), "trainable_fraction": round(rho, 4)}
        scores = self.scores()
        if not scores or (rho > 0 and t % self.delta_t != 0):
            return fields
        if rho <= 0:
            newly = sorted(scores)
        else:
            flat = torch.cat([s.flatten() for s in scores.values()])
            kth = min(max(int(flat.numel() * (1 - rho)), 1), flat.numel())
            threshold = torch.kthvalue(flat, kth).values
            newly = sorted(k for k, s in scores.items() if s.mean() < threshold)
        self.frozen.extend(newly)
        self._apply_frozen()
        return {"frozen_matrices": len(self.frozen), "trainable_fraction": round(rho, 4)}

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": list(self.frozen), "ipt": self.ipt, "exp_ipt": self.exp_ipt, "exp_unc": self.exp_unc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = list(state.get("frozen", []))
        for name in ("ipt", "exp_ipt", "exp_unc"):
            for k, v in state.get(name, {}).items():
                getattr(self, name)[k].copy_(v)
        self._apply_frozen()
