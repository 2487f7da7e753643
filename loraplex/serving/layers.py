"""The grouped low-rank path: one plan per step, read by every adapted layer.

Rows of a step's batch are ordered by adapter, so each adapter's rows form one contiguous slice
(Punica's SGMV segments). The plan lists the slices once per forward pass; every wrapped layer then
runs, per slice and per adapter of the slice,

    shrink  h = x[s:e] @ Aᵀ            (tokens x r, the adapter's own rank: no padding)
    expand  y[s:e] += h @ (s·B)ᵀ       (scale folded into B when the adapter was loaded)

in place on the base layer's output. `B A` is never formed. DoRA rows are rescaled by the adapter's
precomputed `m / ‖W + sBA‖_row`; `modules_to_save` rows are recomputed by the adapter's own copy of
the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.adapter import EMBEDDING

Terms = tuple[tuple[str, float], ...]
"""What a row is served with: () for the bare base, ((name, 1.0),) for one adapter, or a weighted mix."""


@dataclass
class LoraWeights:
    """One adapter's factors on one layer, ready for the grouped path.

    a_t: (d_in, r), or (num_embeddings, r) on an embedding; b_t: (r, d_out) with the scale folded in;
    dora_ratio: (d_out,) = m / ‖W + sBA‖_row for DoRA, else None.
    """

    kind: str
    a_t: torch.Tensor
    b_t: torch.Tensor
    dora_ratio: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a_t.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.a_t, self.b_t, self.dora_ratio) if t is not None]

    def to(self, device: torch.device | str) -> LoraWeights:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return LoraWeights(self.kind, move(self.a_t), move(self.b_t), move(self.dora_ratio))


@dataclass(frozen=True)
class Group:
    start: int
    stop: int
    terms: Terms


class StepPlan:
    """Contiguous row slices of one forward pass, one per distinct `Terms` (rows must come grouped)."""

    def __init__(self, row_terms: Sequence[Terms]) -> None:
        self.batch_size = len(row_terms)
        groups: list[Group] = []
        start = 0
        for i in range(1, len(row_terms) + 1):
            if i == len(row_terms) or row_terms[i] != row_terms[start]:
                groups.append(Group(start, i, row_terms[start]))
                start = i
        seen = [g.terms for g in groups]
        if len(set(seen)) != len(seen):
            raise ValueError("rows are not grouped by adapter: each adapter's rows must be contiguous")
        self.groups = groups
        self.adapted = [g for g in groups if g.terms]

    @classmethod
    def single(cls, terms: Terms, batch_size: int = 1) -> StepPlan:
        return cls([terms] * batch_size)


class PlanContext:
    """Holds the current step's plan; shared by the engine and every `ServingModule`."""

    def __init__(self) -> None:
        self.plan: StepPlan | None = None


class ServingModule(nn.Module):
    """Wraps one base module; adds the low-rank deltas of the adapters that touch it, per row slice."""

    def __init__(self, base: nn.Module, kind: str, ctx: PlanContext) -> None:
        super().__init__()
        self.base_layer = base
        self.kind = kind
        self._ctx = ctx
        # Plain dicts (not ModuleDicts): adapter tensors are not model parameters.
        self.lora: dict[str, LoraWeights] = {}
        self.saved: dict[str, nn.Module] = {}

    @property
    def empty(self) -> bool:
        return not self.lora and not self.saved

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        plan = self._ctx.plan
        if plan is None or not plan.adapted:
            return out
        rows = x.shape[0]
        if rows != plan.batch_size:
            raise RuntimeError(f"the step plan covers {plan.batch_size} rows but a layer received {rows}")
        if not out.is_contiguous():
            out = out.contiguous()
        # Rows are contiguous slices, so a slice of rows is a slice of the flattened tokens: no gather.
        flat = self.kind != EMBEDDING
        if flat:
            x2 = x.reshape(-1, x.shape[-1])
            y2 = out.view(-1, out.shape[-1])
            per_row = x2.shape[0] // rows
        for g in plan.adapted:
            if len(g.terms) == 1 and g.terms[0][0] in self.saved:
                out[g.start:g.stop] = self.saved[g.terms[0][0]](x[g.start:g.stop], *args, **kwargs)
                continue
            present = [(self.lora[n], w) for n, w in g.terms if n in self.lora]
            if not present:
                continue
            if flat:
                lo, hi = g.start * per_row, g.stop * per_row
                self._linear_delta(x2[lo:hi], y2[lo:hi], present)
            else:
                self._embedding_delta(x[g.start:g.stop], out[g.start:g.stop], present)
        return out

    def _linear_delta(self, xs: torch.Tensor, ys: torch.Tensor, present: list[tuple[LoraWeights, float]]) -> None:
        """xs: (tokens, d_in) and ys: (tokens, d_out), a view into the layer's output (updated in place)."""
        base = None
        if len(present) > 1 and any(lw.dora_ratio is not None for lw, _ in present):
            base = ys.clone()           # DoRA rescales the base output, not the sum with other adapters
        for lw, weight in present:
            h = (xs if xs.dtype == lw.a_t.dtype else xs.to(lw.a_t.dtype)) @ lw.a_t     # shrink: (tokens, r)
            if lw.dora_ratio is None:
                if ys.dtype == h.dtype:
                    ys.addmm_(h, lw.b_t, alpha=weight)             # expand, in place
                else:
                    ys.add_((h @ lw.b_t).to(ys.dtype), alpha=weight)
                continue
            # DoRA: y' = y + (m/n - 1) ⊙ W x + (m/n) ⊙ s B A x, with W x = y - bias.
            low = h @ lw.b_t
            wx = ys if base is None else base
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                wx = wx - bias
            ratio = lw.dora_ratio
            delta = (ratio - 1) * wx.to(low.dtype) + ratio * low
            ys.add_(delta.to(ys.dtype), alpha=weight)

    def _embedding_delta(self, ids: torch.Tensor, ys: torch.Tensor, present: list[tuple[LoraWeights, float]]) -> None:
        for lw, weight in present:
            h = F.embedding(ids, lw.a_t)                            # row gather of Aᵀ: (..., r)
            ys.add_((h @ lw.b_t).to(ys.dtype), alpha=weight)

    def extra_repr(self) -> str:
        return f"lora={sorted(self.lora)}, saved={sorted(self.saved)}"
