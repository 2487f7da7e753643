"""One budgeted rank allocator with pluggable importance scores and schedules (recipe `adaptive-rank`).

The adapter is a gated LoRA over R = `r_max` slots per layer; a rank mask m says which slots are
alive. Every `interval` steps inside [t_init, T - t_final] the allocator brings the number of alive
ranks to the schedule's budget b(t): it prunes the alive ranks of lowest importance (globally, across
layers) or grows ranks in the layers of highest importance (a grown slot is re-initialised in place:
A row redrawn, B column 0, its optimizer moments zeroed). Parameters are never replaced; `finalize`
keeps only the alive ranks (a plain LoRA with per-layer ranks in PEFT's `rank_pattern`).

Importance scores of rank i of a layer (EMAs over steps, β = `beta1`):
  * "ablation": the loss increase when rank i is switched off, L(m_i = 0) − L, to first order
                −m_i ∂L/∂m_i = −⟨A_i, ∇_{A_i} L⟩ (the two are equal since ∇_{A_i}L = s m_i B_iᵀ G);
  * "sensitivity": AdaLoRA's I = |w ∇w|, Ī ← β₁Ī + (1−β₁)I, Ū ← β₂Ū + (1−β₂)|I − Ī|, score of an entry
                Ī·Ū, of rank i the mean over row A_i plus the mean over column B_i;
  * "magnitude": ‖s B_i A_i‖_F / ‖ΔW‖_F = s ‖B_i‖ ‖A_i‖ / ‖ΔW‖_F (a component's share of the update).
Schedules of the total budget b(t) (t₀ = t_init·T, t₁ = T − t_final·T, b₀ the starting budget, b_T the
target `target_r` × layers):
  * "constant": b(t) = b₀ (ranks move between layers: prune k, grow k);
  * "cubic":    b(t) = b_T + (b₀ − b_T)(1 − (t − t₀)/(t₁ − t₀))³ (AdaLoRA's, pruning);
  * "linear":   b(t) = b₀ + (b_T − b₀)(t − t₀)/(t₁ − t₀) (growing).

Policies (option `policy`; each sets defaults that options may override):
  * "alora" (Liu et al. 2024, "ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large Language
    Models", NAACL): ablation importance (AB-LoRA), constant budget; each event prunes up to `realloc`
    ranks, those of negative importance first, and gives them to the most important layers.
  * "increlora" (Zhang et al. 2023, "IncreLoRA: Incremental Parameter Allocation Method for
    Parameter-Efficient Fine-tuning"): sensitivity importance, starts at `init_r` (default r/2) and grows
    linearly to `target_r` (default r), adding ranks to the layers of highest mean importance.
  * "prilora" (Benedek & Wolf 2024, "PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation"): ranks
    increase linearly with depth, from `r_start` (default r/2) at the first block to `r_end` (default
    3r/2) at the last; every event zeroes, in each row of A, the `prune_ratio` share of entries with the
    lowest |A_ij|·‖X_j‖ (X_j the layer's j-th input over all training tokens so far). No rank moves.
  * "dynamic-rank-dora" (Mao et al. 2024, "DoRA: Enhancing Parameter-Efficient Fine-Tuning with Dynamic
    Rank Distribution", ACL): starts with all `r_max` slots alive, magnitude importance, cubic pruning
    to `target_r`. The paper's dimensional-equilibrium regulariser is not included.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from loraplex.core.config import LoraConfig
from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._lowrank import (
    adapters,
    finalized,
    gated_config,
    kaiming_rows,
    prune_to_plain_lora,
    trained_adapter,
    zero_state_slices,
)

POLICIES = {
    "alora": {"importance": "ablation", "schedule": "constant"},
    "increlora": {"importance": "sensitivity", "schedule": "linear"},
    "prilora": {"importance": None, "schedule": "constant"},
    "dynamic-rank-dora": {"importance": "magnitude", "schedule": "cubic"},
}
IMPORTANCES = ("ablation", "sensitivity", "magnitude")
SCHEDULES = ("constant", "cubic", "linear")


# --- importance scores (one value per rank slot of one layer) ---
def ablation_score(adapter) -> torch.Tensor:
    """First-order loss increase when each rank is switched off: −⟨A_i, ∇_{A_i} L⟩ (0 without a gradient)."""
    a, grad = adapter.lora_A, adapter.lora_A.grad
    if grad is None:
        return adapter.rank_mask.new_zeros(adapter.r)
    return -(a.detach().float() * grad.float()).sum(1)


def magnitude_score(adapter) -> torch.Tensor:
    """Each rank's share of the update: s ‖B_i‖ ‖A_i‖ / ‖ΔW‖_F (masked ranks count 0)."""
    m = adapter.rank_mask.float()
    a, b = adapter.lora_A.detach().float(), adapter.lora_B.detach().float()
    part = adapter.scale * b.norm(dim=0) * a.norm(dim=1) * m
    total = ((b * m) @ a * adapter.scale).norm()
    return part / total.clamp_min(1e-12)


class Sensitivity:
    """AdaLoRA's smoothed sensitivity × uncertainty of every entry of A and B, reduced per rank."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def update(self, path: str, adapter) -> torch.Tensor:
        st = self.state.setdefault(path, {})
        scores = []
        for key, p in (("A", adapter.lora_A), ("B", adapter.lora_B)):
            if p.grad is None:
                return adapter.rank_mask.new_zeros(adapter.r)
            i = (p.detach().float() * p.grad.float()).abs()
            bar = st.get(f"{key}_bar", torch.zeros_like(i))
            unc = st.get(f"{key}_unc", torch.zeros_like(i))
            bar = self.beta1 * bar + (1 - self.beta1) * i
            unc = self.beta2 * unc + (1 - self.beta2) * (i - bar).abs()
            st[f"{key}_bar"], st[f"{key}_unc"] = bar, unc
            scores.append((bar * unc).mean(1) if key == "A" else (bar * unc).mean(0))
        return scores[0] + scores[1]

    def reset(self, path: str, slots: torch.Tensor) -> None:
        for key, value in self.state.get(path, {}).items():
            value.index_fill_(0 if key.startswith("A") else 1, slots, 0)


# --- budget schedules ---
def budget(schedule: str, step: int, t0: int, t1: int, b0: int, b_target: int) -> int:
    if schedule == "constant" or step < t0:
        return b0
    if step >= t1:
        return b_target
    frac = (step - t0) / max(1, t1 - t0)
    if schedule == "cubic":
        return int(round(b_target + (b0 - b_target) * (1 - frac) ** 3))
    return int(round(b0 + (b_target - b0) * frac))


def depth_of(path: str) -> int | None:
    """The block index in a module path (the first number component, e.g. model.layers.3.mlp -> 3)."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(found.group(1)) if found else None


def linear_depth_ranks(paths: list[str], r_start: int, r_end: int) -> dict[str, int]:
    """PRILoRA's ranks: r_start at the first block, r_end at the last, linear in between."""
    depths = {p: depth_of(p) for p in paths}
    known = [d for d in depths.values() if d is not None]
    lo, hi = (min(known), max(known)) if known else (0, 0)
    out = {}
    for p, d in depths.items():
        frac = 0.0 if d is None or hi == lo else (d - lo) / (hi - lo)
        out[p] = int(round(r_start + (r_end - r_start) * frac))
    return out


def wanda_prune(adapter, ratio: float) -> torch.Tensor:
    """Zero, in each row of A, the `ratio` share of entries with the lowest |A_ij|·‖X_j‖; returns the mask
    of zeroed entries."""
    a = adapter.lora_A
    norms = adapter.input_sq.float().sqrt()
    score = a.detach().float().abs() * norms[None, :]
    k = int(ratio * a.shape[1])
    pruned = torch.zeros_like(a, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(score, k, dim=1, largest=False).indices
        pruned.scatter_(1, idx, True)
        with torch.no_grad():
            a.masked_fill_(pruned, 0.0)
    return pruned


@register
class AdaptiveRank(Recipe):
    """Budgeted rank allocator: ALoRA, IncreLoRA, PRILoRA, dynamic-rank DoRA (option policy)."""

    name = "adaptive-rank"
    options = {"policy": "alora", "r_max": None, "init_r": None, "target_r": None, "importance": None,
               "schedule": None, "interval": 10, "t_init": 0.1, "t_final": 0.2, "beta1": 0.85, "beta2": 0.85,
               "realloc": 4, "r_start": None, "r_end": None, "prune_ratio": 0.1, "total_steps": None}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.opts
        if o["policy"] not in POLICIES:
            raise ValueError(f"recipe 'adaptive-rank': policy must be one of {', '.join(POLICIES)}, got {o['policy']!r}")
        defaults = POLICIES[o["policy"]]
        self.importance = o["importance"] or defaults["importance"]
        self.schedule = o["schedule"] or defaults["schedule"]
        if o["policy"] != "prilora" and self.importance not in IMPORTANCES:
            raise ValueError(f"recipe 'adaptive-rank': importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"recipe 'adaptive-rank': schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for key in ("interval", "realloc"):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1:
                raise ValueError(f"recipe 'adaptive-rank': option {key} must be a positive integer, got {o[key]!r}")
        for key in ("t_init", "t_final", "beta1", "beta2", "prune_ratio"):
            if not isinstance(o[key], (int, float)) or not 0 <= o[key] < 1:
                raise ValueError(f"recipe 'adaptive-rank': option {key} must be in [0, 1), got {o[key]!r}")
        for key in ("r_max", "init_r", "target_r", "r_start", "r_end", "total_steps"):
            if o[key] is not None and (not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1):
                raise ValueError(f"recipe 'adaptive-rank': option {key} must be a positive integer, got {o[key]!r}")
        self.scores: dict[str, torch.Tensor] = {}
        self.sensitivity = Sensitivity(o["beta1"], o["beta2"])

    # --- before training ---
    def adapter_config(self, config: LoraConfig) -> LoraConfig:
        o, r = self.opts, config.r
        if config.rank_pattern:
            raise ValueError("recipe 'adaptive-rank' allocates ranks itself; rank_pattern is not supported")
        self.r_base = r
        if o["policy"] == "prilora":
            r_start, r_end = o["r_start"] or max(1, r // 2), o["r_end"] or r + r // 2
            slots = o["r_max"] or max(r_start, r_end)
            return gated_config(config, self.name, track_inputs=True).replace(r=slots, alpha=config.alpha * slots / r)
        slots = o["r_max"] or 2 * r
        init = o["init_r"] or {"alora": r, "increlora": max(1, r // 2), "dynamic-rank-dora": slots}[o["policy"]]
        if init > slots:
            raise ValueError(f"recipe 'adaptive-rank': init_r={init} exceeds r_max={slots}")
        # keep the scale of a rank-r LoRA: s = alpha / r whatever the number of slots
        return gated_config(config, self.name, init_rank=init).replace(r=slots, alpha=config.alpha * slots / r)

    def setup(self, model, cfg) -> None:
        o = self.opts
        self.adapter_name = trained_adapter(model)
        self.layers = {}
        if finalized(model, self.adapter_name):  # resuming a finished run: nothing left to allocate
            self.t0, self.t1 = 1, 0
            return
        self.layers = adapters(model, self.adapter_name, "gated-lora")
        r = getattr(self, "r_base", None) or cfg.r   # cfg.r when resuming (adapter_config is not called)
        # the run's length: the option, else what the loop set, else the config's steps
        total = o["total_steps"] or self.total_steps or (cfg.steps if getattr(cfg, "epochs", None) is None else None)
        if total is None:
            raise ValueError("recipe 'adaptive-rank': training by epochs; set recipe option total_steps")
        self.total = total
        self.t0, self.t1 = int(o["t_init"] * total), total - int(o["t_final"] * total)
        if o["policy"] == "prilora":  # ranks fixed by depth (the same on resume): they never move
            r_start, r_end = o["r_start"] or max(1, r // 2), o["r_end"] or r + r // 2
            ranks = linear_depth_ranks(list(self.layers), r_start, r_end)
            for path, adapter in self.layers.items():
                adapter.rank_mask.zero_()
                adapter.rank_mask[: ranks[path]] = 1.0
        self.b0 = self.alive()
        target = o["target_r"] or (r if o["policy"] != "alora" else None)
        self.b_target = self.b0 if target is None else target * len(self.layers)

    def alive(self) -> int:
        return int(sum(int(a.rank_mask.sum()) for a in self.layers.values()))

    # --- every step ---
    def after_backward(self, model, step: int) -> None:
        if self.opts["policy"] == "prilora":
            return
        beta = self.opts["beta1"]
        for path, adapter in self.layers.items():
            if self.importance == "ablation":
                score = ablation_score(adapter)
            elif self.importance == "magnitude":
                score = magnitude_score(adapter)
            else:
                score = self.sensitivity.update(path, adapter)
            if self.importance == "sensitivity":
                self.scores[path] = score   # smoothed inside already
            else:
                old = self.scores.get(path, torch.zeros_like(score))
                self.scores[path] = beta * old + (1 - beta) * score

    def after_step(self, model, optimizer, step: int) -> dict[str, Any] | None:
        done = step + 1
        if done % self.opts["interval"] != 0 or not self.t0 <= done <= self.t1:
            return None
        if self.opts["policy"] == "prilora":
            pruned = 0
            for adapter in self.layers.values():
                mask = wanda_prune(adapter, self.opts["prune_ratio"])
                _zero_entries(optimizer, adapter.lora_A, mask)
                pruned += int(mask.sum())
            return {"pruned_entries": pruned}
        target = budget(self.schedule, done, self.t0, self.t1, self.b0, self.b_target)
        if self.schedule == "constant":
            moved = self.reallocate(optimizer)
            return {"ranks": self.alive(), "moved": moved}
        self.allocate(optimizer, target)
        return {"ranks": self.alive()}

    # --- allocation ---
    def _alive_scores(self) -> list[tuple[float, str, int]]:
        out = []
        for path, adapter in self.layers.items():
            score = self.scores.get(path, adapter.rank_mask.new_zeros(adapter.r))
            for i in torch.nonzero(adapter.rank_mask > 0).flatten().tolist():
                out.append((float(score[i]), path, i))
        return out

    def layer_score(self, path: str) -> float:
        adapter = self.layers[path]
        alive = adapter.rank_mask > 0
        if not bool(alive.any()):
            return float("-inf")
        return float(self.scores.get(path, adapter.rank_mask.new_zeros(adapter.r))[alive].mean())

    def prune(self, count: int) -> list[tuple[str, int]]:
        """Switch off the `count` alive ranks of lowest importance (across all layers)."""
        victims = sorted(self._alive_scores())[:count]
        for _, path, i in victims:
            self.layers[path].rank_mask[i] = 0.0
        return [(p, i) for _, p, i in victims]

    def grow(self, optimizer, count: int, exclude: set[str] = frozenset()) -> int:
        """Give `count` new ranks to the layers of highest mean importance (one per layer per round)."""
        grown = 0
        while grown < count:
            order = sorted((p for p, a in self.layers.items() if p not in exclude and bool((a.rank_mask == 0).any())),
                           key=self.layer_score, reverse=True)
            if not order:
                break
            for path in order[: count - grown]:
                self._revive(optimizer, path)
                grown += 1
        return grown

    def _revive(self, optimizer, path: str) -> None:
        adapter = self.layers[path]
        i = int(torch.nonzero(adapter.rank_mask == 0).flatten()[0])
        slot = torch.tensor([i], device=adapter.rank_mask.device)
        with torch.no_grad():
            adapter.lora_A[i].copy_(kaiming_rows(1, adapter.lora_A.shape[1], adapter.lora_A)[0])
            adapter.lora_B[:, i].zero_()
        zero_state_slices(optimizer, adapter.lora_A, slot, 0)
        zero_state_slices(optimizer, adapter.lora_B, slot, 1)
        if path in self.scores:
            self.scores[path][i] = 0.0
        self.sensitivity.reset(path, slot)
        adapter.rank_mask[i] = 1.0

    def allocate(self, optimizer, target: int) -> None:
        alive = self.alive()
        if target < alive:
            self.prune(alive - target)
        elif target > alive:
            self.grow(optimizer, target - alive)

    def reallocate(self, optimizer) -> int:
        """ALoRA: prune up to `realloc` ranks (negative importance first, then the lowest) and give the
        budget to the most important layers that lost nothing."""
        pruned = self.prune(self.opts["realloc"])
        return self.grow(optimizer, len(pruned), exclude={p for p, _ in pruned})

    # --- after training ---
    def finalize(self, model) -> None:
        if not finalized(model, self.adapter_name):
            prune_to_plain_lora(model, self.adapter_name)

    # --- checkpoints ---
    def state_dict(self) -> dict[str, Any]:
        return {"scores": dict(self.scores), "sensitivity": dict(self.sensitivity.state), "b0": getattr(self, "b0", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = {p: a.rank_mask.device for p, a in getattr(self, "layers", {}).items()}  # known after setup
        self.scores = {p: t.to(device.get(p, t.device)) for p, t in state.get("scores", {}).items()}
        self.sensitivity.state = {p: {k: t.to(device.get(p, t.device)) for k, t in v.items()}
                                  for p, v in state.get("sensitivity", {}).items()}
        if state.get("b0") is not None:  # the starting budget, not the ranks alive at the checkpoint
            self.b0 = int(state["b0"])


def _zero_entries(optimizer, param, mask: torch.Tensor) -> None:
    state = optimizer.state.get(param) if optimizer is not None else None
    for value in (state or {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(mask, 0.0)
