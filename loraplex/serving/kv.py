"""A batched, left-padded KV cache that grows in place, plugged into Hugging Face attention.

Each layer holds key/value buffers of shape (batch, kv_heads, capacity, head_dim); the first `length`
columns are in use. Rows are left-padded: row i's real tokens are the last `n_i` columns, and the
attention mask (kept by the engine) marks which columns are real. A decode step writes one column
per layer instead of concatenating the whole cache (what `DynamicCache` does), and rows are only
copied when requests join or leave the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class SlabLayer(DynamicLayer):
    """One attention layer's cache: preallocated buffers; `update` appends in place."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, length: int = 0) -> None:
        super().__init__()
        self.keys, self.values, self.length = keys, values, length
        self.is_initialized = keys is not None
        if keys is not None:
            self.device = keys.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, n, d = key_states.shape
        cap = max(n, 16)
        self.keys = key_states.new_zeros(b, h, cap, d)
        self.values = value_states.new_zeros(b, value_states.shape[1], cap, value_states.shape[-1])
        self.device = key_states.device
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.keys.shape[2]:
            self._grow(end)
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grow(self, needed: int) -> None:
        cap = max(needed, 2 * self.keys.shape[2])
        for attr in ("keys", "values"):
            old = getattr(self, attr)
            new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, attr, new)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


def new_cache(num_layers: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [SlabLayer() for _ in range(num_layers)]
    cache.layer_class_to_replicate = None
    return cache


def layers_of(cache: DynamicCache) -> list[SlabLayer]:
    return cache.layers  # type: ignore[return-value]


def assemble(parts: Sequence[tuple[DynamicCache, int]], length: int, headroom: int) -> DynamicCache:
    """A new batched cache from rows of other caches, right-aligned to `length` columns.

    parts: (source cache, source row) per output row, in output order. Each row keeps the last
    min(source length, `length`) columns of its source (rows are right-aligned, so that keeps every
    real token as long as `length` covers the longest row). `headroom` spare columns are allocated.
    """
    first = layers_of(parts[0][0])
    device = first[0].keys.device
    # rows that come from the same source cache are copied together
    by_source: dict[int, tuple[DynamicCache, list[int], list[int]]] = {}
    for out_row, (cache, row) in enumerate(parts):
        entry = by_source.setdefault(id(cache), (cache, [], []))
        entry[1].append(out_row)
        entry[2].append(row)
    moves = [(layers_of(cache), torch.tensor(dst, device=device), torch.tensor(src, device=device))
             for cache, dst, src in by_source.values()]
    out_layers = []
    capacity = length + headroom
    for li, ref in enumerate(first):
        keys = ref.keys.new_zeros(len(parts), ref.keys.shape[1], capacity, ref.keys.shape[3])
        values = ref.values.new_zeros(len(parts), ref.values.shape[1], capacity, ref.values.shape[3])
        for src_layers, dst, src in moves:
            layer = src_layers[li]
            n = layer.length
            take = min(n, length)
            keys[dst, :, length - take:length] = layer.keys[:, :, n - take:n].index_select(0, src)
            values[dst, :, length - take:length] = layer.values[:, :, n - take:n].index_select(0, src)
        out_layers.append(SlabLayer(keys, values, length))
    cache = DynamicCache()
    cache.layers = out_layers
    cache.layer_class_to_replicate = None
    return cache


def drop_rows(cache: DynamicCache, keep: Sequence[int]) -> None:
    """Keep only rows `keep` (ascending), in place: the rows after the first dropped one move up, the
    columns and the buffers' capacity stay as they are.

    Cheaper than `assemble` when a few rows finish (the common step of continuous batching): no new
    buffers to allocate and zero, and the rows before the first gap are not touched.
    """
    first = next((i for i, row in enumerate(keep) if row != i), len(keep))
    tail = torch.tensor(keep[first:], dtype=torch.long)
    for layer in layers_of(cache):
        for attr in ("keys", "values"):
            buf = getattr(layer, attr)
            if len(tail):
                buf[first:len(keep)] = buf.index_select(0, tail.to(buf.device))
            setattr(layer, attr, buf[:len(keep)])
