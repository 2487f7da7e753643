"""The engine's batched KV cache (`loraplex/serving/kv.py`): rows leaving in place vs rebuilding the cache."""

import pytest
import torch

from loraplex.serving import kv


def cache_of(rows: int, length: int, capacity: int, layers: int = 3):
    torch.manual_seed(rows + length)
    cache = kv.new_cache(layers)
    for layer in kv.layers_of(cache):
        layer.lazy_initialization(torch.zeros(rows, 2, 1, 4), torch.zeros(rows, 2, 1, 4))
        layer.update(torch.randn(rows, 2, capacity, 4), torch.randn(rows, 2, capacity, 4))
        layer.length = length
    return cache


@pytest.mark.parametrize("keep", [[0, 2, 3, 5], [1, 2, 3, 4, 5], [0, 1, 2], [5], [0, 1, 2, 3, 4, 5]])
def test_dropping_rows_in_place_equals_assembling_the_kept_rows(keep):
    cache = cache_of(rows=6, length=7, capacity=12)
    want = kv.assemble([(cache, i) for i in keep], 7, headroom=0)
    kv.drop_rows(cache, keep)
    for got, ref in zip(kv.layers_of(cache), kv.layers_of(want)):
        assert got.length == 7 and got.keys.shape[0] == len(keep)
        torch.testing.assert_close(got.keys[:, :, :7], ref.keys, rtol=0, atol=0)
        torch.testing.assert_close(got.values[:, :, :7], ref.values, rtol=0, atol=0)
    # the next decode step appends one column to every kept row, growing past capacity when needed
    for layer in kv.layers_of(cache):
        new = torch.full((len(keep), 2, 6, 4), 3.0)
        keys, values = layer.update(new, new)
        assert keys.shape == (len(keep), 2, 13, 4) and (keys[:, :, 7:] == 3.0).all() and (values[:, :, 7:] == 3.0).all()
