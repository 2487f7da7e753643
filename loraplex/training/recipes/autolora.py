"""AutoLoRA (Zhang, Xie et al. 2024, "AutoLoRA: Automatically Tuning Matrix Ranks in Low-Rank Adaptation
Based on Meta Learning", NAACL): a selection variable α_j per rank-one component,
    ΔW = s Σ_j α_j B_j A_j,    α = softmax(g) (so α_j ≥ 0, Σ_j α_j = 1 per layer),
learned by bi-level optimisation on a held-out split of the training data:
  * inner (weights): A, B take an optimizer step on the training-split loss L_tr(A, B; α), α fixed;
  * outer (selection): α takes a step on the held-out loss L_val(A', B'; α) at the updated weights.
We alternate one step of each (the first-order approximation of the paper's one-step unrolling: the
second-order term through A' = A − η∇L_tr is dropped). The held-out split is fixed by example content:
a row belongs to it when the CRC-32 of its tokens falls in the `val_fraction` share, so the same
examples are held out in every epoch and after a resume, and they never train A or B.
After the search phase (`search_fraction` of the steps) each layer keeps the ranks with
α_j ≥ `threshold` (default 1/R, the uniform weight; the largest α always stays), the selection is
switched off (α no longer scales the ranks) and, as the paper retrains with the found ranks, A and B are
re-initialised in place (`retrain`) and train on for the remaining steps. The saved adapter is a plain
LoRA with the kept per-layer ranks (PEFT's `rank_pattern`).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

from loraplex.core.config import LoraConfig
from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._lowrank import (
    adapters,
    clear_state,
    finalized,
    gated_config,
    kaiming_rows,
    prune_to_plain_lora,
    trained_adapter,
)


def held_out_rows(batch: dict[str, torch.Tensor], fraction: float) -> torch.Tensor:
    """Boolean per row: True for rows of the held-out split (decided by the CRC-32 of the row's tokens)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    flags = []
    for row, keep in zip(ids.tolist(), mask.tolist()):
        tokens = [t for t, k in zip(row, keep) if k]
        digest = zlib.crc32(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
        flags.append(digest % 10_000 < fraction * 10_000)
    return torch.tensor(flags, dtype=torch.bool)


def _rows(batch: dict[str, torch.Tensor], which: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[which.to(v.device)] for k, v in batch.items()}


@register
class AutoLora(Recipe):
    """AutoLoRA (Zhang et al. 2024): rank selection variables learned on a held-out split (bi-level)."""

    name = "autolora"
    options = {"val_fraction": 0.25, "search_fraction": 0.5, "alpha_lr": None, "threshold": None,
               "retrain": True, "total_steps": None}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.opts
        for key in ("val_fraction", "search_fraction"):
            if not isinstance(o[key], (int, float)) or isinstance(o[key], bool) or not 0 < o[key] <= 1:
                raise ValueError(f"recipe 'autolora': option {key} must be in (0, 1], got {o[key]!r}")
        if o["val_fraction"] == 1:
            raise ValueError("recipe 'autolora': val_fraction=1 leaves no training split; use a value below 1")
        if o["alpha_lr"] is not None and (not isinstance(o["alpha_lr"], (int, float)) or not o["alpha_lr"] > 0):
            raise ValueError(f"recipe 'autolora': option alpha_lr must be a positive number, got {o['alpha_lr']!r}")
        if o["threshold"] is not None and (not isinstance(o["threshold"], (int, float)) or not 0 < o["threshold"] < 1):
            raise ValueError(f"recipe 'autolora': option threshold must be in (0, 1), got {o['threshold']!r}")
        self.searching = True
        self.val_batches: list[dict[str, torch.Tensor]] = []
        self.alpha_optimizer = None

    def adapter_config(self, config: LoraConfig) -> LoraConfig:
        return gated_config(config, self.name, gate="softmax", gate_init=0.0)

    def setup(self, model, cfg) -> None:
        self.adapter_name = trained_adapter(model)
        self.layers, self.gates = {}, []
        if finalized(model, self.adapter_name):  # resuming a finished run: nothing left to search
            self.searching = False
            return
        self.layers = adapters(model, self.adapter_name, "gated-lora")
        self.gates = [a.lora_gate for a in self.layers.values() if a.gate_mode == "softmax"]
        if len(self.gates) != len(self.layers):
            raise ValueError("recipe 'autolora' needs softmax-gated adapters; attach through adapter_config")
        # the run's length: the option, else what the loop set, else the config's steps
        total = self.opts["total_steps"] or self.total_steps or (cfg.steps if getattr(cfg, "epochs", None) is None else None)
        if total is None:
            raise ValueError("recipe 'autolora': training by epochs; set recipe option total_steps")
        self.search_end = max(1, math.ceil(self.opts["search_fraction"] * total))
        self.searching = all(bool(a.lora_gate_on) for a in self.layers.values())

    def make_optimizer(self, model, cfg) -> torch.optim.Optimizer:
        gate_ids = {id(g) for g in self.gates}
        weights = [p for p in model.trainable_parameters() if id(p) not in gate_ids]
        if self.gates:
            self.alpha_optimizer = torch.optim.AdamW(self.gates, lr=self.opts["alpha_lr"] or cfg.lr, weight_decay=0.0)
        return torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)

    # --- every step ---
    def loss(self, model, batch, step: int):
        held = held_out_rows(batch, self.opts["val_fraction"])
        if self.searching and bool(held.any()):
            self.val_batches.append(_rows(batch, held))
        train_rows = ~held
        if not bool(train_rows.any()):   # a batch of held-out rows only: nothing trains the weights
            return torch.zeros((), requires_grad=True), 0
        return super().loss(model, _rows(batch, train_rows), step)

    def after_backward(self, model, step: int) -> None:
        for g in self.gates:  # α learns from the held-out split only
            g.grad = None

    def after_step(self, model, optimizer, step: int) -> dict[str, Any] | None:
        fields: dict[str, Any] = {}
        if self.searching and self.val_batches:
            params = model.trainable_parameters()
            val = sum(super(AutoLora, self).loss(model, b, step)[0] for b in self.val_batches) / len(self.val_batches)
            val.backward()
            self.alpha_optimizer.step()
            for p in params:
                p.grad = None
            fields["val_loss"] = round(float(val), 5)
        self.val_batches = []
        if self.searching and step + 1 >= self.search_end:
            fields["autolora_ranks"] = self.select(optimizer)
        return fields or None

    def select(self, optimizer) -> int:
        """End of the search: keep α_j ≥ threshold per layer, switch the selection off, restart A and B."""
        kept = 0
        with torch.no_grad():
            for adapter in self.layers.values():
                alpha = adapter.rank_weights()
                threshold = self.opts["threshold"] or 1.0 / int(adapter.rank_mask.sum())
                keep = (alpha >= threshold) & (adapter.rank_mask > 0)
                keep[int(torch.argmax(alpha))] = True
                adapter.rank_mask.copy_(keep.float())
                adapter.lora_gate_on.zero_()
                if self.opts["retrain"]:
                    adapter.lora_A.copy_(kaiming_rows(*adapter.lora_A.shape, adapter.lora_A))
                    adapter.lora_B.zero_()
                    clear_state(optimizer, (adapter.lora_A, adapter.lora_B))
                kept += int(keep.sum())
        self.searching = False
        return kept

    def finalize(self, model) -> None:
        if not finalized(model, self.adapter_name):
            prune_to_plain_lora(model, self.adapter_name)

    # --- checkpoints ---
    def state_dict(self) -> dict[str, Any]:
        return {"alpha_optimizer": self.alpha_optimizer.state_dict() if self.alpha_optimizer else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("alpha_optimizer") and self.alpha_optimizer is not None:
            self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
