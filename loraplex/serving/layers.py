"""The grouped low-rank path: one plan per step, read by every adapted layer.

Rows of a step's batch are ordered by adapter, so each adapter's rows form one contiguous slice
(Punica's SGMV segments). The plan lists the slices once per forward pass; every wrapped layer then
runs, per slice and per adapter of the slice,

    shrink  h = x[s:e] @ Aᵀ            (tokens x r, the adapter's own rank: no padding)
    expand  y[s:e] += h @ (s·B)ᵀ       (scale folded into B when the adapter was loaded)

in place on the base layer's output. `B A` is never formed.

Many small groups (decode steps: one token per request, dozens of adapters) would cost two tiny matrix
products per group per layer, and on CPU each call's fixed overhead then outweighs its arithmetic. So
each layer also keeps its plain LoRA factors stacked by rank, one slot per adapter (`RankStack`:
A (slots, d_in, r), sB (slots, r, d_out)), and serves all single-adapter groups of a step with two
batched products over a (slots, rows, d_in) block (`Route`, computed once per step for every layer
with the same slots). When every slot has one group of the same size, in slot order (the engine orders
rows by install order, which is slot order), the block is a view of the input and the expand adds
straight into the output; otherwise the tokens are gathered into it (zero-padded when sizes differ)
and added back. Still no `B A`, and each rank has its own stack (no padding to the largest rank);
groups much larger than the rest stay on the per-group path. Where they can, segmented kernels do
both products per group instead, reading rows and slots in place whatever the groups' sizes: a Triton
kernel on CUDA (`triton_kernels.py`), a small compiled C kernel on CPU (`cpu_kernels.py`); the batched
products above are their fallback and reference.

DoRA rows are rescaled by the adapter's precomputed `m / ‖W + sBA‖_row`; `modules_to_save` rows are
recomputed by the adapter's own copy of the module.

Members of a compressed set (`compress.py`, ΔW_i ≈ U Σ_i Vᵀ) sit next to each other in the batch, so
the plan covers all their rows with one segment: y += ((x V) Σ_iᵀ) Uᵀ, two GEMMs for the segment and a
batched R x R product per row, however many distinct members the segment holds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.adapter import EMBEDDING
from loraplex.serving import cpu_kernels

if TYPE_CHECKING:
    from loraplex.serving.compress import SharedBasis

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


@dataclass(frozen=True)
class Segment:
    """Rows start:stop all served by single members of compressed set `group`; index[i] = row's member."""

    start: int
    stop: int
    group: str
    index: torch.Tensor


class StepPlan:
    """Contiguous row slices of one forward pass, one per distinct `Terms` (rows must come grouped).

    members: adapter name -> (compressed set, index in the set). Consecutive rows served by one member
    each of the same set form one `Segment`; their groups are left out of `adapted`.
    """

    def __init__(self, row_terms: Sequence[Terms], members: Mapping[str, tuple[str, int]] | None = None,
                 device: torch.device | str | None = None) -> None:
        self.batch_size = len(row_terms)
        self.members = members or {}
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
        self.segments: list[Segment] = []
        runs: list[tuple[str, list[Group]]] = []
        for g in groups:
            set_name = self._set_of(g.terms)
            if set_name is not None and runs and runs[-1][0] == set_name and runs[-1][1][-1].stop == g.start:
                runs[-1][1].append(g)
            elif set_name is not None:
                runs.append((set_name, [g]))
        in_segment = set()
        for set_name, run in runs:
            index = [self.members[g.terms[0][0]][1] for g in run for _ in range(g.start, g.stop)]
            self.segments.append(Segment(run[0].start, run[-1].stop, set_name,
                                         torch.tensor(index, dtype=torch.long, device=device)))
            in_segment.update(id(g) for g in run)
        self.adapted = [g for g in groups if g.terms and id(g) not in in_segment]
        self.device = device
        # groups served by one adapter at weight 1 (candidates for the stacked path), by adapter name
        self.one_adapter = {g.terms[0][0]: i for i, g in enumerate(self.adapted)
                            if len(g.terms) == 1 and g.terms[0][1] == 1.0 and g.terms[0][0] not in self.members}
        self._routes: dict[tuple, Route | None] = {}

    def route(self, stack: RankStack, per_row: int) -> Route | None:
        """The step's `Route` through `stack` (computed once for every layer whose slots are the same)."""
        key = (stack.names, per_row)
        if key not in self._routes:
            self._routes[key] = self._make_route(stack, per_row)
        return self._routes[key]

    def _make_route(self, stack: RankStack, per_row: int) -> Route | None:
        chosen = [(stack.slot[name], self.adapted[i], i) for name, i in self.one_adapter.items() if name in stack.slot]
        if len(chosen) < STACK_MIN_GROUPS:
            return None
        sizes = [(g.stop - g.start) * per_row for _, g, _ in chosen]
        # Pad every slot to twice the mean group size at most; larger groups keep their own products.
        cap = max(1, 2 * -(-sum(sizes) // len(sizes)))
        chosen = sorted(c for c, n in zip(chosen, sizes) if n <= cap)       # in slot order
        if len(chosen) < STACK_MIN_GROUPS:
            return None
        sizes = [(g.stop - g.start) * per_row for _, g, _ in chosen]
        rows = max(sizes)
        groups = frozenset(i for _, _, i in chosen)
        # (start, stop, slot) of every group, in tokens: what the Triton kernel reads (CUDA)
        segments = torch.tensor([[g.start * per_row, g.stop * per_row, slot] for slot, g, _ in chosen],
                                dtype=torch.int32, device=self.device)
        src = torch.cat([torch.arange(g.start * per_row, g.stop * per_row) for _, g, _ in chosen])
        lo = int(src[0])
        span = (lo, lo + len(src)) if bool((src == torch.arange(lo, lo + len(src))).all()) else None
        src_rows = None if span is not None else src.to(self.device)
        if min(sizes) == rows and len(chosen) == len(stack.names):
            # Every slot holds one group of `rows` tokens: the gathered tokens are the block, no padding.
            return Route(src_rows, None, None, len(chosen), rows, groups, segments, span)
        used = [slot for slot, _, _ in chosen]
        whole = 2 * len(used) >= len(stack.names)      # most slots are used: no gather of the factors
        block_of = {slot: (slot if whole else k) for k, slot in enumerate(used)}
        dest = torch.cat([torch.arange(n) + block_of[slot] * rows for (slot, _, _), n in zip(chosen, sizes)])
        return Route(src_rows, dest.to(self.device),
                     None if whole else torch.tensor(used, device=self.device),
                     len(stack.names) if whole else len(used), rows, groups, segments, span)

    def _set_of(self, terms: Terms) -> str | None:
        if len(terms) == 1 and terms[0][1] == 1.0 and terms[0][0] in self.members:
            return self.members[terms[0][0]][0]
        return None

    @classmethod
    def single(cls, terms: Terms, batch_size: int = 1) -> StepPlan:
        return cls([terms] * batch_size)


STACK_MIN_GROUPS = 3
"""Fewer single-adapter groups than this in a layer: the per-group loop is as fast."""


@dataclass(frozen=True)
class Route:
    """Where the rows of stacked groups go in the (blocks, rows, ·) block of one `RankStack`.

    src: the tokens' rows in the flattened input, in block order, or None when they are the contiguous
    `span` (lo, hi); dest: their rows in the flattened, zero-padded block, or None when the block needs no
    padding (every slot has one group of `rows` tokens). With a span and no padding the block is a view of
    the input and the products write straight into the output. slots: the stack slots used, when only
    those are gathered (None: the whole stack); groups: the indices (in `StepPlan.adapted`) of the groups
    this route serves; segments: (start, stop, slot) of each group in tokens, read by the Triton kernel
    instead of all the above. `buffer` keeps the step's scratch blocks, shared by every layer of one shape.
    """

    src: torch.Tensor | None
    dest: torch.Tensor | None
    slots: torch.Tensor | None
    blocks: int
    rows: int
    groups: frozenset[int]
    segments: torch.Tensor
    span: tuple[int, int] | None = None
    scratch: dict = field(default_factory=dict, compare=False, repr=False)

    def buffer(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A zeroed scratch tensor, made once per step and reused by every layer asking for this shape
        (fresh blocks of a few hundred kB cost more to allocate and zero than to multiply on CPU).
        The rows a layer does not write (padding) stay zero: every layer writes the same rows."""
        key = (role, shape, like.dtype)
        buf = self.scratch.get(key)
        if buf is None:
            buf = self.scratch[key] = like.new_zeros(shape)
        return buf


class RankStack:
    """Plain LoRA factors of one rank on one layer, one slot per adapter, kept for batched products.

    a: (capacity, d_in, r), b: (capacity, r, d_out) (scale folded in); `names[k]` is slot k's adapter or
    None when free. Slots are filled in place on install; capacity doubles when full and halves when a
    quarter is used, so unloading adapters gives the memory back.
    """

    def __init__(self, like: LoraWeights, capacity: int = 1) -> None:
        self.a = like.a_t.new_zeros(capacity, *like.a_t.shape)
        self.b = like.b_t.new_zeros(capacity, *like.b_t.shape)
        self.names: tuple[str | None, ...] = (None,) * capacity
        self.slot: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    def put(self, name: str, lw: LoraWeights) -> bool:
        """Install `name` in a free slot; True when the stack was reallocated (every slot moved)."""
        resized = len(self.slot) == len(self.names)
        if resized:
            self._resize(2 * len(self.names))
        k = self.names.index(None)
        self.a[k].copy_(lw.a_t)
        self.b[k].copy_(lw.b_t)
        self.slot[name] = k
        self.names = self.names[:k] + (name,) + self.names[k + 1:]
        return resized

    def drop(self, name: str) -> bool:
        """Free `name`'s slot; True when the stack was reallocated (every slot moved)."""
        k = self.slot.pop(name)
        self.names = self.names[:k] + (None,) + self.names[k + 1:]
        resized = 4 * len(self.slot) <= len(self.names) and len(self.names) > 1
        if resized:
            self._resize(max(1, len(self.names) // 2))
        return resized

    def _resize(self, capacity: int) -> None:
        kept = [k for k, n in enumerate(self.names) if n is not None]
        index = torch.tensor(kept, dtype=torch.long, device=self.a.device)
        a = self.a.new_zeros(capacity, *self.a.shape[1:])
        b = self.b.new_zeros(capacity, *self.b.shape[1:])
        a[:len(kept)] = self.a.index_select(0, index)
        b[:len(kept)] = self.b.index_select(0, index)
        self.a, self.b = a, b
        names = [self.names[k] for k in kept]
        self.names = tuple(names) + (None,) * (capacity - len(kept))
        self.slot = {n: k for k, n in enumerate(names)}

    def delta(self, x2: torch.Tensor, y2: torch.Tensor, route: Route) -> None:
        """y2[src] += (x2[src] @ A_slot) @ (sB)_slot for every routed token, as two batched products
        (or two launches of the segmented Triton kernel on CUDA)."""
        if x2.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":      # import Triton only where it may serve
            from loraplex.serving import triton_kernels

            if triton_kernels.available(x2):
                h = triton_kernels.segment_matmul(x2, self.a, route.segments, route.rows)
                triton_kernels.segment_matmul(h, self.b, route.segments, route.rows, out=y2)
                return
        if cpu_kernels.available(x2, y2, self.a, self.b):     # segments read in place: no block, no gather
            h = route.buffer("h", (x2.shape[0], self.a.shape[-1]), self.a)
            cpu_kernels.segment_shrink(x2, self.a, route.segments, h)
            cpu_kernels.segment_expand(h, self.b, route.segments, y2)
            return
        a, b = (self.a, self.b) if route.slots is None else (self.a[route.slots], self.b[route.slots])
        shape = (route.blocks, route.rows, -1)
        if route.span is not None:
            lo, hi = route.span
            xs, ys = x2[lo:hi], y2[lo:hi]
        else:
            xs, ys = x2.index_select(0, route.src), None
        if route.dest is None and ys is not None:      # the block is a slice of the input: no copy in or out
            h = torch.bmm(xs.view(shape).to(a.dtype), a)
            if ys.dtype == b.dtype:
                ys.view(shape).baddbmm_(h, b)
            else:
                ys += torch.bmm(h, b).view(hi - lo, -1).to(ys.dtype)
            return
        block = xs.to(a.dtype)
        if route.dest is not None:
            block = route.buffer("in", (route.blocks * route.rows, x2.shape[1]), a).index_copy_(0, route.dest, block)
        h = torch.bmm(block.view(shape), a)
        out = torch.bmm(h, b, out=route.buffer("out", (route.blocks, route.rows, b.shape[-1]), b)).view(-1, b.shape[-1])
        if route.dest is not None:
            out = torch.index_select(out, 0, route.dest, out=route.buffer("rows", (len(route.dest), b.shape[-1]), b))
        if ys is not None:
            ys += out.to(ys.dtype)
        else:
            y2.index_add_(0, route.src, out.to(y2.dtype))


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
        self.shared: dict[str, SharedBasis] = {}     # compressed sets touching this layer, by set name
        self.stacks: dict[int, RankStack] = {}       # plain LoRA factors by rank (`RankStack`)

    def add_lora(self, name: str, lw: LoraWeights) -> None:
        self.remove_lora(name)
        self.lora[name] = lw
        if lw.dora_ratio is None and self.kind != EMBEDDING:
            stack = self.stacks.get(lw.rank)
            if stack is None:
                stack = self.stacks[lw.rank] = RankStack(lw)
            moved = stack.put(name, lw)
            self._view_stack(stack, None if moved else name)

    def remove_lora(self, name: str) -> None:
        lw = self.lora.pop(name, None)
        stack = self.stacks.get(lw.rank) if lw is not None else None
        if stack is not None and name in stack.slot:
            if stack.drop(name):
                self._view_stack(stack)
            if not stack.slot:
                del self.stacks[lw.rank]

    def _view_stack(self, stack: RankStack, only: str | None = None) -> None:
        """Point the adapters' factors (or just `only`'s) at their slots: one copy of them on the device,
        freed with the stack."""
        for name, k in ([(only, stack.slot[only])] if only is not None else stack.slot.items()):
            self.lora[name] = LoraWeights(self.kind, stack.a[k], stack.b[k])

    @property
    def stack_bytes(self) -> int:
        return sum(s.nbytes for s in self.stacks.values())

    @property
    def empty(self) -> bool:
        return not self.lora and not self.saved and not self.shared

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        plan = self._ctx.plan
        if plan is None or not (plan.adapted or plan.segments):
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
            for seg in plan.segments:
                basis = self.shared.get(seg.group)
                if basis is not None:
                    lo, hi = seg.start * per_row, seg.stop * per_row
                    delta = basis.delta_rows(x2[lo:hi].view(seg.stop - seg.start, per_row, -1).to(basis.v.dtype),
                                             seg.index)
                    y2[lo:hi] += delta.view(hi - lo, -1).to(y2.dtype)
        done: frozenset[int] | set[int] = frozenset()
        if flat and plan.one_adapter and self.stacks:
            done = set()
            for stack in self.stacks.values():
                route = plan.route(stack, per_row)
                if route is not None:
                    stack.delta(x2, y2, route)
                    done |= route.groups
        for i, g in enumerate(plan.adapted):
            if i in done:
                continue
            if len(g.terms) == 1 and g.terms[0][0] in self.saved:
                out[g.start:g.stop] = self.saved[g.terms[0][0]](x[g.start:g.stop], *args, **kwargs)
                continue
            present = [(self.lora[n], w) for n, w in g.terms if n in self.lora]
            present += [(self._member(plan, n), w) for n, w in g.terms if n in plan.members and n not in self.lora]
            present = [(lw, w) for lw, w in present if lw is not None]
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

    def _member(self, plan: StepPlan, name: str) -> LoraWeights | None:
        """A compressed member in a mix: low-rank factors Aᵀ = V, (sB)ᵀ = Σᵀ Uᵀ (R x d_out, made per step)."""
        set_name, index = plan.members[name]
        basis = self.shared.get(set_name)
        if basis is None:
            return None
        return LoraWeights(self.kind, basis.v, basis.sigma_t[index] @ basis.u_t)

    def _embedding_delta(self, ids: torch.Tensor, ys: torch.Tensor, present: list[tuple[LoraWeights, float]]) -> None:
        for lw, weight in present:
            h = F.embedding(ids, lw.a_t)                            # row gather of Aᵀ: (..., r)
            ys.add_((h @ lw.b_t).to(ys.dtype), alpha=weight)

    def extra_repr(self) -> str:
        return f"lora={sorted(self.lora)}, saved={sorted(self.saved)}, shared={sorted(self.shared)}"
