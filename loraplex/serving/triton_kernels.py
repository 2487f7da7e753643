"""Optional Triton kernel for the stacked low-rank path on CUDA: segmented matrix products (Punica's SGMV).

Rows of a step come grouped by adapter, so the tokens of each adapter form a segment start:stop of the
flattened input. One kernel serves both halves of the grouped product, for every segment at once:

    shrink  h[start:stop]  = x[start:stop] @ A[slot]        (A: the layer's `RankStack.a`, (slots, d_in, r))
    expand  y[start:stop] += h[start:stop] @ sB[slot]       (sB: `RankStack.b`, (slots, r, d_out))

Each program computes one (BLOCK_M x BLOCK_N) tile of one segment, reading that segment's slot of the
stack in place: no padded block, no gathered copy of the factors, no `B A`, and segments of any length
(a prefill's long ones and a decode step's single tokens) in one launch.

Used when the layer's input is on a CUDA device and Triton imports (disable with LORAPLEX_TRITON=0);
the pure-PyTorch path (`layers.RankStack.delta`) is the reference and runs everywhere. Triton's own
interpreter (TRITON_INTERPRET=1) runs the same kernel on CPU tensors: that is how the tests check it
on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:          # Triton is optional: the PyTorch path serves without it
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the kernel serves `x`: a CUDA tensor (or any tensor under Triton's CPU interpreter)."""
    if triton is None or os.environ.get("LORAPLEX_TRITON", "1") == "0":
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    @triton.jit
    def _segment_matmul_kernel(x_ptr, w_ptr, y_ptr, seg_ptr, K, N,
                               stride_xm, stride_xk, stride_ws, stride_wk, stride_wn, stride_ym, stride_yn,
                               ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
        seg = tl.program_id(0)
        start = tl.load(seg_ptr + 3 * seg)
        stop = tl.load(seg_ptr + 3 * seg + 1)
        slot = tl.load(seg_ptr + 3 * seg + 2).to(tl.int64)
        rows = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < stop                      # tiles past the segment's end do nothing
        col_ok = cols < N
        w_slot = w_ptr + slot * stride_ws
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x_tile = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                             mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
            w_tile = tl.load(w_slot + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                             mask=(ks[:, None] < K) & col_ok[None, :], other=0.0)
            # fp32 factors: IEEE products, as torch's matmul (no TF32 rounding)
            acc += tl.dot(x_tile.to(w_tile.dtype), w_tile, input_precision="ieee")
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
        mask = row_ok[:, None] & col_ok[None, :]
        if ACCUMULATE:
            acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _block(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))       # tl.dot needs tiles of at least 16


def segment_matmul(x: torch.Tensor, w: torch.Tensor, segments: torch.Tensor, longest: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """out[start:stop] (+)= x[start:stop] @ w[slot] for every row (start, stop, slot) of `segments`.

    x: (tokens, K); w: (slots, K, N); segments: (n, 3) int32 on x's device; longest: the longest
    segment's length (sizes the grid). Without `out`, a new zero (tokens, N) tensor is written (shrink);
    with it, the products are added in place (expand). Rows outside every segment are left untouched.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed: `pip install triton` (CUDA), or serve with the PyTorch path")
    tokens, k = x.shape
    slots, k_w, n = w.shape
    if k_w != k or segments.shape[1:] != (3,):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, w {tuple(w.shape)}, segments {tuple(segments.shape)}")
    accumulate = out is not None
    if out is None:
        out = x.new_zeros(tokens, n, dtype=w.dtype)
    if len(segments) == 0 or longest == 0:
        return out
    block_m, block_n, block_k = 16, _block(n, 64), _block(k, 64)
    grid = (len(segments), triton.cdiv(longest, block_m), triton.cdiv(n, block_n))
    _segment_matmul_kernel[grid](x, w, out, segments, k, n, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                 w.stride(2), out.stride(0), out.stride(1), ACCUMULATE=accumulate,
                                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
