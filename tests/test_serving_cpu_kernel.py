"""The compiled CPU segment kernel (`loraplex/serving/cpu_kernels.py`) against per-segment products."""

import pytest
import torch

from loraplex.serving import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(torch.zeros(1, 8), torch.zeros(1, 8), torch.zeros(1, 8, 8),
                                                          torch.zeros(1, 8, 8)),
                                reason="no C compiler here: the torch.bmm path serves (tested elsewhere)")


@pytest.mark.parametrize("rank", [8, 16, 32, 64, 5])
@pytest.mark.parametrize("d_in,d_out", [(48, 40), (37, 21)])
def test_segments_match_per_segment_products(rank, d_in, d_out):
    torch.manual_seed(rank + d_in)
    slots, tokens = 5, 23
    a = torch.randn(slots, d_in, rank)
    b = torch.randn(slots, rank, d_out)
    x_wide = torch.randn(tokens, d_in + 3)
    x = x_wide[:, 1:1 + d_in]                     # rows with a stride larger than their length
    # a single token, an odd-length segment, a long one, a slot used twice, rows 3 and 20.. uncovered
    segments = torch.tensor([[0, 1, 4], [1, 3, 0], [4, 7, 2], [7, 19, 1], [19, 20, 2]], dtype=torch.int32)
    h = torch.full((tokens, rank), 7.0)
    y = torch.randn(tokens, d_out)
    y0 = y.clone()
    cpu_kernels.segment_shrink(x, a, segments, h)
    cpu_kernels.segment_expand(h, b, segments, y)
    want_y = y0.clone()
    for start, stop, slot in segments.tolist():
        want_h = x[start:stop] @ a[slot]
        torch.testing.assert_close(h[start:stop], want_h, rtol=1e-5, atol=1e-4)
        want_y[start:stop] += want_h @ b[slot]
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-4)
    assert (h[3] == 7.0).all() and (h[20:] == 7.0).all()        # rows outside every segment untouched


def test_bad_arguments_are_refused_with_a_clear_error():
    a, h = torch.zeros(2, 8, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="shapes do not fit"):
        cpu_kernels.segment_shrink(torch.zeros(3, 9), a, torch.zeros(1, 3, dtype=torch.int32), h)
    with pytest.raises(ValueError, match="int32"):
        cpu_kernels.segment_shrink(torch.zeros(3, 8), a, torch.zeros(1, 3, dtype=torch.int64), h)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.segment_shrink(torch.zeros(3, 8, dtype=torch.float64), a, torch.zeros(1, 3, dtype=torch.int32), h)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernels.segment_shrink(torch.zeros(3, 8), torch.zeros(2, 4, 8).transpose(1, 2), torch.zeros(1, 3, dtype=torch.int32), h)


def test_stacked_layer_matches_its_reference_with_and_without_the_kernel(monkeypatch):
    """The stacked-route test (four adapters, in place, gathered and padded routes) through the kernel, then
    through torch.bmm; the engine tests in test_serving.py run the kernel against `generate`."""
    from test_serving import (
        test_stacked_route_reads_rows_in_place_when_every_slot_has_one_equal_group as check,
    )

    calls = []
    real = cpu_kernels.segment_shrink
    monkeypatch.setattr(cpu_kernels, "segment_shrink", lambda *a: (calls.append(1), real(*a)))
    check()
    assert calls, "the kernel did not serve the stacked route"
    monkeypatch.setenv("LORAPLEX_CPU_KERNEL", "0")
    calls.clear()
    check()
    assert not calls
