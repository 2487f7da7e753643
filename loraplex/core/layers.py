"""Wrappers that hold adapters around base layers, and the mixed-batch plan they share.

`AdaptedLayer` keeps the original module as `base_layer` (PEFT's name, so base-layer parameters keep
PEFT's paths) and a `ModuleDict` of adapters. `SavedModule` keeps a full trainable copy of a module
per adapter (`modules_to_save`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec


class MixedBatchPlan:
    """Which batch rows use which adapter; built once per forward pass and read by every layer."""

    def __init__(self, adapter_ids: Sequence[str | None], device: torch.device | None = None) -> None:
        self.adapter_ids = list(adapter_ids)
        self.batch_size = len(self.adapter_ids)
        self.names: list[str] = sorted({a for a in self.adapter_ids if a is not None})
        slot = {name: i for i, name in enumerate(self.names)}
        none_slot = len(self.names)  # rows served by the bare base point at an all-zero slot
        self.slots = torch.tensor([slot.get(a, none_slot) if a is not None else none_slot
                                   for a in self.adapter_ids], device=device)
        self.rows = {name: torch.tensor([i for i, a in enumerate(self.adapter_ids) if a == name], device=device)
                     for name in self.names}


def _contiguous_runs(plan: MixedBatchPlan) -> dict[str, tuple[int, int]] | None:
    """Adapter -> (first row, end row) when every adapter serves one contiguous block of rows, else None.

    Worked out once per plan (cached on it) and read by every adapted layer.
    """
    cached = plan.__dict__.get("_contiguous_runs", False)
    if cached is not False:
        return cached
    ids, runs, start = plan.adapter_ids, {}, 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            name = ids[start]
            if name is not None:
                if name in runs:
                    runs = None
                    break
                runs[name] = (start, i)
            start = i
    plan.__dict__["_contiguous_runs"] = runs
    return runs


def _rows_by_slot(plan: MixedBatchPlan) -> torch.Tensor:
    """The batch rows ordered by their slot (cached on the plan)."""
    order = plan.__dict__.get("_rows_by_slot")
    if order is None:
        order = plan.__dict__["_rows_by_slot"] = torch.argsort(plan.slots)
    return order


@dataclass
class SharedState:
    """State every wrapper of one `AdapterModel` reads during a forward pass."""

    active: list[tuple[str, float]] = field(default_factory=list)
    disabled: bool = False
    plan: MixedBatchPlan | None = None


class AdaptedLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, shared: SharedState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.spec = LayerSpec.of(base_layer)
        self.merged: list[tuple[str, float]] = []
        self._shared = shared  # a plain attribute: not a submodule, not in the state dict
        self._stack_cache: tuple | None = None
        self._factor_cache: dict[str, tuple] = {}   # adapter -> (tensor versions, serving factors)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shared = self._shared
        if shared.plan is not None and not shared.disabled:
            return self._mixed_forward(x, shared.plan, *args, **kwargs)
        merged = {name for name, _ in self.merged}
        active = [(self.adapters[n], w) for n, w in shared.active if n in self.adapters and n not in merged]
        if shared.disabled or not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) == 1 and not args and not kwargs:
            out = active[0][0].fused_forward(x, self.spec, active[0][1])
            if out is not None:
                return out
        base_out = self.base_layer(x, *args, **kwargs)
        out = base_out
        for adapter, weight in active:
            delta = adapter.delta(x, base_out, self.spec)
            out = out + (delta if weight == 1.0 else weight * delta)
        return out

    # --- batches that mix adapters ---
    def _mixed_forward(self, x: torch.Tensor, plan: MixedBatchPlan, *args, **kwargs) -> torch.Tensor:
        if x.shape[0] != plan.batch_size:
            raise ValueError(f"adapter_ids names {plan.batch_size} rows but a layer received a batch of "
                             f"{x.shape[0]}; pass one adapter id per batch row")
        if self.merged:
            raise RuntimeError("cannot serve a mixed batch while adapters are merged; call unmerge() first")
        base_out = self.base_layer(x, *args, **kwargs)
        present = [n for n in plan.names if n in self.adapters]
        if not present:
            return base_out
        if self._can_batch(present) and not torch.is_grad_enabled():
            return self._batched_low_rank(x, base_out, plan)
        out = base_out
        for name in present:
            rows = plan.rows[name]
            delta = self.adapters[name].delta(x.index_select(0, rows), base_out.index_select(0, rows), self.spec)
            out = out.index_add(0, rows, delta)
        return out

    def _can_batch(self, names: list[str]) -> bool:
        """Every adapter has a plain low-rank serving form on a linear layer (no dropout active): the rows
        are served by plain or batched products on the base output, without copying rows out and back in.

        Plain LoRA uses its factors as they are; other methods give theirs through `serving_factors`
        (computed once per weight change). Methods without such a form take the per-adapter path.
        """
        if not names or self.spec.kind not in (LINEAR, GPT2_CONV1D):
            return False
        pairs = [self._serving_pair(n) for n in names]
        return all(p is not None for p in pairs) and len({p[0].dtype for p in pairs}) == 1

    def _serving_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) with this adapter's delta = s·B A x at inference, or None."""
        adapter = self.adapters[name]
        if any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in adapter.modules()):
            return None   # dropout is the identity in eval mode only
        if getattr(adapter, "method", "") == "lora":
            return None if adapter.use_dora else (adapter.lora_A, adapter.lora_B, adapter.scale)
        tensors = [*adapter.parameters(), *adapter.buffers()]
        if adapter.shared is not None:
            tensors += [*adapter.shared.parameters(), *adapter.shared.buffers()]
        key = tuple((id(t), t._version) for t in tensors)
        cached = self._factor_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            factors = adapter.serving_factors(self.spec)
        pair = None
        if factors is not None:
            dtype = next((t.dtype for t in tensors if t.is_floating_point()), factors[0].dtype)
            pair = (factors[0].detach().to(dtype).contiguous(), factors[1].detach().to(dtype).contiguous(), 1.0)
        self._factor_cache[name] = (key, pair)
        return pair

    def _stacks(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A stacked to (n+1, r_max, d_in) and s·Bᵀ to (n+1, r_max, d_out); slot n is all zeros.

        Cached until a weight changes (the key holds each tensor's version counter).
        """
        params = [self._serving_pair(n) if n in self.adapters else None for n in names]
        key = (tuple(names), tuple((id(p[0]), p[0]._version, id(p[1]), p[1]._version) if p else None
                                   for p in params))
        if self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1], self._stack_cache[2]
        ref = next(p for p in params if p)[0]
        r_max = max(p[0].shape[0] for p in params if p)
        a_stack = ref.new_zeros(len(names) + 1, r_max, self.spec.in_features)
        b_stack = ref.new_zeros(len(names) + 1, r_max, self.spec.out_features)
        for i, p in enumerate(params):
            if p:
                r = p[0].shape[0]
                a_stack[i, :r] = p[0]
                b_stack[i, :r] = p[1].t() * p[2]
        self._stack_cache = (key, a_stack, b_stack)
        return a_stack, b_stack

    def _batched_low_rank(self, x: torch.Tensor, base_out: torch.Tensor, plan: MixedBatchPlan) -> torch.Tensor:
        """Add each row's s·B A x to `base_out` in place. Three ways, by what is cheapest:

        * few adapters, each on one contiguous block of rows: one pair of plain products per adapter
          on views of that block (no copies);
        * every row its own adapter and few tokens per row (decoding): rows are put in slot order so
          the stacked factors are used as they are (moving tokens is cheaper than moving factors);
        * otherwise each row's factors are gathered from the stacks for a pair of batched products.
        """
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        out3 = base_out.reshape(base_out.shape[0], -1, base_out.shape[-1])
        runs = _contiguous_runs(plan)
        if runs is not None and 4 * len(runs) <= plan.batch_size and out3.is_contiguous():
            d_in, d_out = x3.shape[-1], out3.shape[-1]
            pairs = {n: self._serving_pair(n) for n in runs if n in self.adapters}
            if all(x.dtype == out3.dtype == p[0].dtype for p in pairs.values()):
                for name, (start, stop) in runs.items():
                    if name in pairs:
                        a, b, scale = pairs[name]
                        rows = out3[start:stop].view(-1, d_out)
                        rows.addmm_(x3[start:stop].reshape(-1, d_in) @ a.t(), b.t(), alpha=scale)
                return out3.view(base_out.shape)
        a_stack, b_stack = self._stacks(plan.names)
        if len(plan.names) == plan.batch_size and 4 * x3.shape[1] <= a_stack.shape[1]:
            # distinct adapters, one per row (no bare-base rows): slots are a permutation of the rows
            order = _rows_by_slot(plan)
            n = plan.batch_size
            xa = torch.bmm(x3.index_select(0, order).to(a_stack.dtype), a_stack[:n].transpose(1, 2))
            out3.index_add_(0, order, torch.bmm(xa, b_stack[:n]).to(out3.dtype))
            return out3.view(base_out.shape)
        a_rows = a_stack.index_select(0, plan.slots)   # (B, r, d_in)
        b_rows = b_stack.index_select(0, plan.slots)   # (B, r, d_out)
        xa = torch.bmm(x3.to(a_rows.dtype), a_rows.transpose(1, 2))
        if out3.dtype == xa.dtype:
            out3.baddbmm_(xa, b_rows)
        else:
            out3 += torch.bmm(xa, b_rows).to(out3.dtype)
        return out3.view(base_out.shape)

    # --- merging ---
    def merge(self, name: str, weight: float) -> None:
        self.merge_many([(name, weight)])

    def merge_many(self, entries: Sequence[tuple[str, float]]) -> None:
        """Merge several adapters; each one's update is computed from the bare base weight.

        When adapters are merged already they are unmerged first and merged again together with the
        new ones, all against the restored base weight (DoRA's update depends on it).
        """
        if not entries:
            return
        entries = [*self.merged, *entries]
        base = None
        if len(entries) > 1:
            self.unmerge_all()
            base = self.spec.weight.detach().float().clone()
        for name, weight in entries:
            self.adapters[name].merge(self.spec, weight, base)
            self.merged.append((name, weight))

    def unmerge_all(self) -> None:
        while self.merged:
            name, weight = self.merged.pop()
            self.adapters[name].unmerge(self.spec, weight)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, merged={[n for n, _ in self.merged]}"


class SavedModule(nn.Module):
    """A module trained in full for each adapter (`modules_to_save`); PEFT's in-memory names."""

    def __init__(self, original_module: nn.Module, shared: SharedState) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self._shared = shared

    def add(self, name: str) -> None:
        import copy

        module = copy.deepcopy(self.original_module)
        for p in module.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        shared = self._shared
        if shared.disabled:
            return self.original_module(x, *args, **kwargs)
        if shared.plan is not None:
            plan = shared.plan
            present = [n for n in plan.names if n in self.modules_to_save]
            out = self.original_module(x, *args, **kwargs)
            for name in present:
                rows = plan.rows[name]
                out = out.index_copy(0, rows, self.modules_to_save[name](x.index_select(0, rows), *args, **kwargs))
            return out
        for name, _ in shared.active:
            if name in self.modules_to_save:
                return self.modules_to_save[name](x, *args, **kwargs)
        return self.original_module(x, *args, **kwargs)


def adapters_of(module: nn.Module, name: str) -> dict[str, Adapter]:
    """Every `Adapter` named `name` under `module`, keyed by the adapted layer's path."""
    return {path: layer.adapters[name] for path, layer in module.named_modules()
            if isinstance(layer, AdaptedLayer) and name in layer.adapters}
