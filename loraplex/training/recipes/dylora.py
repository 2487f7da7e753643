"""DyLoRA (Valipour, Rezagholizadeh, Kobyzev, Ghodsi 2023, "DyLoRA: Parameter Efficient Tuning of
Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation", EACL): nested-dropout training over
the rank range [r_min, r].

Each step draws b ~ Uniform{r_min, …, r} and trains the truncated adapter
    ΔW_b = (alpha / b) · B[:, :b] A[:b, :],
in the paper's "frozen" mode (default) with ranks 0..b-2 detached, so only rank b-1 learns from that
step. The adapter evaluated at any k ≤ r is then exactly a rank-k LoRA (A[:k], B[:, :k], scale
alpha / k): `set_rank(model, k)` evaluates it, `save_at_rank(model, path, k)` writes that rank-k
LoRA (a plain PEFT file), and the loop's final save uses option `save_rank` (default r).
The draw uses its own generator seeded by (seed, step), so resuming a run draws the same ranks.
"""

from __future__ import annotations

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


def set_rank(model, k: int | None, name: str | None = None, train_last_only: bool = False) -> None:
    """Truncate every layer of a DyLoRA adapter to its first k ranks (None: all of them)."""
    name = name or trained_adapter(model)
    for path, adapter in adapters(model, name, "gated-lora").items():
        if k is not None and not 1 <= k <= adapter.r:
            raise ValueError(f"{path}: rank {k} is outside 1..{adapter.r} (the adapter's maximum rank)")
        adapter.active_rank, adapter.train_last_only = k, train_last_only


def save_at_rank(model, path, k: int, name: str | None = None) -> None:
    """Write the adapter truncated to rank k as a plain LoRA file (PEFT-readable), leaving the model as it was."""
    name = name or trained_adapter(model)
    before = {p: (a.active_rank, a.train_last_only) for p, a in adapters(model, name, "gated-lora").items()}
    set_rank(model, k, name)
    try:
        model.save(path, name=name, as_lora=True)
    finally:
        for p, a in adapters(model, name, "gated-lora").items():
            a.active_rank, a.train_last_only = before[p]


@register
class DyLora(Recipe):
    """DyLoRA (Valipour et al. 2023): nested-dropout rank draws; any rank k <= r evaluates and saves."""

    name = "dylora"
    options = {"r_min": 1, "frozen": True, "save_rank": None, "seed": 0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        r_min, save_rank = self.opts["r_min"], self.opts["save_rank"]
        if not isinstance(r_min, int) or isinstance(r_min, bool) or r_min < 1:
            raise ValueError(f"recipe 'dylora': option r_min must be a positive integer, got {r_min!r}")
        if save_rank is not None and (not isinstance(save_rank, int) or isinstance(save_rank, bool) or save_rank < 1):
            raise ValueError(f"recipe 'dylora': option save_rank must be a positive integer or None, got {save_rank!r}")
        self.r_max = None
        self.sampled: tuple[int, int] | None = None  # (step, rank) of the current draw

    def adapter_config(self, config: LoraConfig) -> LoraConfig:
        if self.opts["r_min"] > config.r:
            raise ValueError(f"recipe 'dylora': r_min={self.opts['r_min']} exceeds r={config.r}")
        if config.rank_pattern:
            raise ValueError("recipe 'dylora' draws one rank for every layer; rank_pattern is not supported")
        return gated_config(config, self.name)

    def setup(self, model, cfg) -> None:
        self.adapter_name = trained_adapter(model)
        self.done = finalized(model, self.adapter_name)
        if self.done:  # resuming a finished run: the adapter is the saved plain LoRA already
            return
        ranks = {a.r for a in adapters(model, self.adapter_name, "gated-lora").values()}
        self.r_max = max(ranks)
        self.seed = int(self.opts["seed"]) + int(getattr(cfg, "seed", 0)) * 1_000_003
        for k in (self.opts["r_min"], self.opts["save_rank"]):
            if k is not None and k > self.r_max:
                raise ValueError(f"recipe 'dylora': rank {k} exceeds the adapter's rank r={self.r_max}")

    def draw(self, step: int) -> int:
        """The rank b trained at `step`: uniform on {r_min, …, r}, reproducible from (seed, step)."""
        g = torch.Generator().manual_seed(self.seed + step)
        return int(torch.randint(self.opts["r_min"], self.r_max + 1, (1,), generator=g))

    def loss(self, model, batch, step: int):
        if self.done:
            return super().loss(model, batch, step)
        if self.sampled is None or self.sampled[0] != step:
            self.sampled = (step, self.draw(step))
            set_rank(model, self.sampled[1], self.adapter_name, train_last_only=bool(self.opts["frozen"]))
        return super().loss(model, batch, step)

    def after_step(self, model, optimizer, step: int) -> dict[str, Any] | None:
        if self.done:
            return None
        rank = self.sampled[1] if self.sampled else None
        set_rank(model, None, self.adapter_name)   # evaluation between steps sees the full adapter
        return {"dylora_rank": rank}

    def finalize(self, model) -> None:
        if finalized(model, self.adapter_name):
            return
        set_rank(model, self.opts["save_rank"], self.adapter_name)
        prune_to_plain_lora(model, self.adapter_name)
