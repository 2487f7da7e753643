"""BiLoRA: pseudo-SVD adapters whose singular vectors and values learn on different data.

Qiang, Zhang, Xie 2024, "BiLoRA: A Bi-level Optimization Framework for Overfitting-Resilient Low-Rank
Adaptation of Large Pre-trained Models" (arXiv 2403.13037):
    ΔW = P Λ Q,   P: d_out x r, Λ = diag(λ): r x r, Q: r x d_in           (pseudo-SVD)
    lower level:  P*, Q*(Λ) = argmin_{P,Q}  L(D1; P, Λ, Q) + γ R1(P, Q),
                  R1 = ‖PᵀP - I‖_F² + ‖Q Qᵀ - I‖_F²                     (orthogonality)
    upper level:  min_Λ  L(D2; P*(Λ), Λ, Q*(Λ))
with D1 and D2 disjoint parts of the training data. As in the paper's alternating first-order
solution, every step updates P, Q with the gradient of the lower objective on the D1 rows of the
batch and Λ with the gradient of the loss on its D2 rows (the hypergradient through P*(Λ) dropped).
Each example goes to D2 when a hash of its tokens falls below `upper_fraction`, so the split is a
fixed partition of the examples, whatever batch they land in (and across epochs and resumes).

The adapter is `gated-lora` with a linear gate: B = P, A = Q, gate = λ (initialised to 0, so
ΔW = 0 at the start, as AdaLoRA's singular values); `init` "random" draws P and Q non-zero.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from loraplex.core.config import LoraConfig
from loraplex.training.recipes import Recipe, model_aux_loss, register
from loraplex.training.recipes._factors import factor_pairs, number

ADAPTER_METHOD = "gated-lora"


def row_in_upper_split(ids: torch.Tensor, mask: torch.Tensor, fraction: float) -> bool:
    """Whether one example (its unpadded tokens) belongs to D2: a stable hash of the tokens < fraction."""
    tokens = ids[mask.bool()].to(torch.int64).cpu().numpy().tobytes()
    h = int.from_bytes(hashlib.blake2b(tokens, digest_size=8).digest(), "little")
    return h / 2.0**64 < fraction


def rows(batch: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.index_select(0, index) for k, v in batch.items()}


@register
class BiLoRA(Recipe):
    """BiLoRA (Qiang et al. 2024): P, Q trained on one split (+ orthogonality), Λ on the other."""

    name = "bilora"
    options = {"upper_fraction": 1 / 3, "orth_weight": 0.1, "upper_lr_ratio": 1.0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.fraction = number(self.name, self.opts, "upper_fraction", low=0, high=1, low_open=True, high_open=True)
        self.orth_weight = number(self.name, self.opts, "orth_weight", low=0)
        self.upper_lr_ratio = number(self.name, self.opts, "upper_lr_ratio", low=0, low_open=True)
        self._lower_grads: list[torch.Tensor | None] | None = None

    def adapter_config(self, config: LoraConfig) -> LoraConfig:
        from loraplex.methods import available

        if ADAPTER_METHOD not in available():
            raise ValueError(f"recipe 'bilora' builds its adapter with method {ADAPTER_METHOD!r}, which is not "
                             "installed in this loraplex")
        if config.method not in ("lora", ADAPTER_METHOD):
            raise ValueError(f"recipe 'bilora' trains its own pseudo-SVD adapter; use method 'lora' (the default), "
                             f"not {config.method!r}")
        # P and Q drawn non-zero, Λ = 0: ΔW = 0 at the start
        return config.replace(method=ADAPTER_METHOD, dora=False, init="random",
                              options={"gate": "linear", "gate_init": 0.0})

    def setup(self, model, cfg) -> None:
        pairs = factor_pairs(model, self.name)
        self.grad_accum = cfg.grad_accum
        self.lower = [p for pair in pairs for p in (pair.B, pair.A)]              # P, Q
        self.upper = [pair.adapter.lora_gate for pair in pairs if hasattr(pair.adapter, "lora_gate")]  # Λ
        if len(self.upper) != len(pairs):
            raise ValueError("recipe 'bilora' needs gated-lora adapters with a linear gate (the Λ of P Λ Q)")
        self.pairs = pairs

    def param_groups(self, model, cfg) -> list[dict[str, Any]]:
        upper = {id(p) for p in self.upper}
        rest = [p for p in model.trainable_parameters() if id(p) not in upper]
        return [{"params": rest, "name": "lower"},
                {"params": self.upper, "lr": cfg.lr * self.upper_lr_ratio, "name": "upper"}]

    def orthogonality(self) -> torch.Tensor:
        """R1 = Σ_layers ‖PᵀP - I‖_F² + ‖Q Qᵀ - I‖_F²."""
        total = torch.zeros(())
        for pair in self.pairs:
            p, q = pair.B.float(), pair.A.float()
            eye = torch.eye(p.shape[1], device=p.device)
            total = total + (p.t() @ p - eye).pow(2).sum() + (q @ q.t() - eye).pow(2).sum()
        return total

    def split(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices of the batch in D1 (lower level) and in D2 (upper level)."""
        upper = [row_in_upper_split(ids, m, self.fraction) for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
        device = batch["input_ids"].device
        return (torch.tensor([i for i, u in enumerate(upper) if not u], dtype=torch.long, device=device),
                torch.tensor([i for i, u in enumerate(upper) if u], dtype=torch.long, device=device))

    def loss(self, model, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, int]:
        from loraplex.training.loop import completion_loss

        lower_rows, upper_rows = self.split(batch)
        reported, n_total = None, 0
        if lower_rows.numel():
            l1, n1 = completion_loss(model.model, rows(batch, lower_rows))
            aux = model_aux_loss(model)
            objective = l1 + (aux if aux is not None else 0) + self.orth_weight * self.orthogonality()
            grads = torch.autograd.grad(objective, self.lower, allow_unused=True)
            if self._lower_grads is None:
                self._lower_grads = [None if g is None else g.detach() for g in grads]
            else:
                self._lower_grads = [a if g is None else (g.detach() if a is None else a + g.detach())
                                     for a, g in zip(self._lower_grads, grads)]
            reported, n_total = l1.detach(), n1
        if upper_rows.numel():
            l2, n2 = completion_loss(model.model, rows(batch, upper_rows))
            if reported is None:
                return l2, n2
            # the value logged is the loss over the whole batch; the gradient is the upper level's
            mean = (reported * n_total + l2.detach() * n2) / (n_total + n2)
            return l2 + (mean - l2.detach()), n_total + n2
        return reported + 0.0 * sum(g.sum() for g in self.upper), n_total  # no D2 rows: Λ gets zero

    def after_backward(self, model, step: int) -> None:
        # P and Q: the lower-level gradient (the loop's backward also reached them through the D2 loss)
        grads = self._lower_grads or [None] * len(self.lower)
        for p, g in zip(self.lower, grads):
            p.grad = None if g is None else g / self.grad_accum
        self._lower_grads = None
