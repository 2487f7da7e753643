"""Segmented low-rank products on CPU, compiled on first use (the CPU twin of `triton_kernels.py`).

Rows of a step come grouped by adapter, so the tokens of each adapter form a segment start:stop of the
flattened input (Punica's SGMV). For every segment (start, stop, slot) of a layer's `RankStack`:

    shrink  h[start:stop]  = x[start:stop] @ A[slot]        (A: (slots, d_in, r))
    expand  y[start:stop] += h[start:stop] @ sB[slot]       (sB: (slots, r, d_out), scale folded in)

Why not `torch.bmm` over a (slots, rows, d) block: a decode step has one or two tokens per adapter, and
MKL's batched product then runs at ~3x the time it takes just to read the factors (and ~10x on a
prefill's 64-token segments, whose N = r is too narrow for its kernels). The factors must be read once
per step whatever we do, so the loops below keep the r (shrink) or 32 output columns (expand) of two
tokens in registers and stream each slot's factors once: ~1.4x the read time. Segments of unequal
length need no zero-padded block and no gather: the rows are read and written in place.

The C source is compiled with the system compiler (`$CC`, else cc/gcc/clang; `-O3 -march=native`)
into `<cache>/kernels/`, keyed by the source, the compiler and the CPU's flags, and loaded with ctypes.
Without a compiler, or with LORAPLEX_CPU_KERNEL=0, the PyTorch path serves instead (it is also the
reference the tests hold this kernel to). Single-threaded: the engine's steps run in one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));     /* GCC/Clang vectors: AVX on x86, NEON pairs on arm */
static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }

/* h[t, :R] = x[t, :K] @ w (w: K x R), R a multiple of 8 known at compile time: two tokens at a time,
   P partial sums over k (independent FMA chains), all accumulators in registers. */
#define SHRINK(R, P)                                                                              \
static void shrink_##R(const float *x, int64_t sx, const float *w, float *h, int64_t sh,         \
                       int64_t start, int64_t stop, int64_t K) {                                  \
    enum { V = R / 8 };                                                                           \
    int64_t t = start;                                                                            \
    for (; t + 1 < stop; t += 2) {                                                                \
        v8 a0[P][V] = {{0}}, a1[P][V] = {{0}};                                                    \
        const float *x0 = x + t * sx, *x1 = x0 + sx;                                              \
        int64_t k = 0;                                                                            \
        for (; k + P <= K; k += P)                                                                \
            for (int p = 0; p < P; p++)                                                           \
                for (int v = 0; v < V; v++) {                                                     \
                    v8 wv = load8(w + (k + p) * R + 8 * v);                                       \
                    a0[p][v] += x0[k + p] * wv; a1[p][v] += x1[k + p] * wv;                       \
                }                                                                                 \
        for (; k < K; k++)                                                                        \
            for (int v = 0; v < V; v++) {                                                         \
                v8 wv = load8(w + k * R + 8 * v); a0[0][v] += x0[k] * wv; a1[0][v] += x1[k] * wv; \
            }                                                                                     \
        for (int p = 1; p < P; p++)                                                               \
            for (int v = 0; v < V; v++) { a0[0][v] += a0[p][v]; a1[0][v] += a1[p][v]; }           \
        memcpy(h + t * sh, a0[0], sizeof(float) * R);                                             \
        memcpy(h + (t + 1) * sh, a1[0], sizeof(float) * R);                                       \
    }                                                                                             \
    for (; t < stop; t++) {                                                                       \
        v8 a0[P][V] = {{0}};                                                                      \
        const float *x0 = x + t * sx;                                                             \
        int64_t k = 0;                                                                            \
        for (; k + P <= K; k += P)                                                                \
            for (int p = 0; p < P; p++)                                                           \
                for (int v = 0; v < V; v++) a0[p][v] += x0[k + p] * load8(w + (k + p) * R + 8 * v); \
        for (; k < K; k++)                                                                        \
            for (int v = 0; v < V; v++) a0[0][v] += x0[k] * load8(w + k * R + 8 * v);             \
        for (int p = 1; p < P; p++) for (int v = 0; v < V; v++) a0[0][v] += a0[p][v];            \
        memcpy(h + t * sh, a0[0], sizeof(float) * R);                                             \
    }                                                                                             \
}
SHRINK(8, 4)
SHRINK(16, 2)
SHRINK(32, 1)
SHRINK(64, 1)

static void shrink_any(const float *x, int64_t sx, const float *w, float *h, int64_t sh,
                       int64_t start, int64_t stop, int64_t K, int64_t R) {
    for (int64_t t = start; t < stop; t++) {
        float *hr = h + t * sh;
        memset(hr, 0, sizeof(float) * R);
        for (int64_t k = 0; k < K; k++) {
            float xv = x[t * sx + k];
            for (int64_t j = 0; j < R; j++) hr[j] += xv * w[k * R + j];
        }
    }
}

void segment_shrink_f32(const float *x, int64_t sx, const float *w, float *h, int64_t sh,
                        const int32_t *seg, int64_t nseg, int64_t K, int64_t R) {
    for (int64_t g = 0; g < nseg; g++) {
        int64_t start = seg[3 * g], stop = seg[3 * g + 1];
        const float *ws = w + (int64_t)seg[3 * g + 2] * K * R;
        switch (R) {
        case 8: shrink_8(x, sx, ws, h, sh, start, stop, K); break;
        case 16: shrink_16(x, sx, ws, h, sh, start, stop, K); break;
        case 32: shrink_32(x, sx, ws, h, sh, start, stop, K); break;
        case 64: shrink_64(x, sx, ws, h, sh, start, stop, K); break;
        default: shrink_any(x, sx, ws, h, sh, start, stop, K, R);
        }
    }
}

/* y[t, :N] += h[t, :R] @ w (w: R x N), N a multiple of 8: 32 columns of NT tokens are accumulated over
   R in registers, so y is read and written once and w streamed once per pair of tokens. */
#define EXPAND(NT)                                                                                \
static void expand_##NT(const float *h, int64_t sh, const float *w, float *y, int64_t sy,        \
                        int64_t t, int64_t R, int64_t N) {                                        \
    int64_t n = 0;                                                                                \
    for (; n + 32 <= N; n += 32) {                                                                \
        v8 a[NT][4];                                                                              \
        for (int i = 0; i < NT; i++)                                                              \
            for (int v = 0; v < 4; v++) a[i][v] = load8(y + (t + i) * sy + n + 8 * v);           \
        for (int64_t j = 0; j < R; j++)                                                           \
            for (int v = 0; v < 4; v++) {                                                         \
                v8 wv = load8(w + j * N + n + 8 * v);                                             \
                for (int i = 0; i < NT; i++) a[i][v] += h[(t + i) * sh + j] * wv;                 \
            }                                                                                     \
        for (int i = 0; i < NT; i++) memcpy(y + (t + i) * sy + n, a[i], sizeof a[i]);             \
    }                                                                                             \
    for (; n < N; n += 8) {                                                                       \
        v8 a[NT];                                                                                 \
        for (int i = 0; i < NT; i++) a[i] = load8(y + (t + i) * sy + n);                          \
        for (int64_t j = 0; j < R; j++) {                                                         \
            v8 wv = load8(w + j * N + n);                                                         \
            for (int i = 0; i < NT; i++) a[i] += h[(t + i) * sh + j] * wv;                        \
        }                                                                                         \
        for (int i = 0; i < NT; i++) memcpy(y + (t + i) * sy + n, &a[i], sizeof a[i]);            \
    }                                                                                             \
}
EXPAND(1)
EXPAND(2)

void segment_expand_f32(const float *h, int64_t sh, const float *w, float *y, int64_t sy,
                        const int32_t *seg, int64_t nseg, int64_t R, int64_t N) {
    for (int64_t g = 0; g < nseg; g++) {
        int64_t start = seg[3 * g], stop = seg[3 * g + 1];
        const float *ws = w + (int64_t)seg[3 * g + 2] * R * N;
        for (int64_t t = start; t < stop; t += 2) {
            int64_t nt = stop - t < 2 ? stop - t : 2;
            if (N % 8 == 0) {
                if (nt == 2) expand_2(h, sh, ws, y, sy, t, R, N); else expand_1(h, sh, ws, y, sy, t, R, N);
                continue;
            }
            for (int64_t i = 0; i < nt; i++)
                for (int64_t j = 0; j < R; j++) {
                    float hv = h[(t + i) * sh + j];
                    for (int64_t n = 0; n < N; n++) y[(t + i) * sy + n] += hv * ws[j * N + n];
                }
        }
    }
}
"""

_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
_lib: ctypes.CDLL | None = None
_tried = False


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    """What -march=native compiles for: the build is keyed by it, so a shared cache never hands one
    CPU's binary to another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str, folder: Path) -> Path:
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    key = hashlib.sha256("\0".join([SOURCE, cc, *flags, platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    target = folder / f"segment_matmul-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        src, out = Path(tmp) / "segment_matmul.c", Path(tmp) / "segment_matmul.so"
        src.write_text(SOURCE)
        try:
            subprocess.run([cc, *flags, "-o", str(out), str(src)], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError:       # e.g. a compiler without -march=native
            flags.remove("-march=native")
            subprocess.run([cc, *flags, "-o", str(out), str(src)], check=True, capture_output=True, text=True)
        os.replace(out, target)                      # atomic: concurrent builders each rename a whole file
    log.info("compiled the CPU segment kernel into %s (%.1f s, once per machine)", target, time.perf_counter() - start)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found (set CC): the stacked low-rank path uses torch.bmm")
        return None
    from loraplex.models.loading import default_cache_dir

    try:
        lib = ctypes.CDLL(str(_build(cc, default_cache_dir() / "kernels")))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("could not build the CPU segment kernel (%s): the stacked low-rank path uses torch.bmm", detail)
        return None
    for fn in (lib.segment_shrink_f32, lib.segment_expand_f32):
        fn.argtypes, fn.restype = _ARGS, None
    _lib = lib
    return lib


def available(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernel serves this layer: fp32 CPU tensors with unit-stride rows, stacks contiguous."""
    if os.environ.get("LORAPLEX_CPU_KERNEL", "1") == "0" or x.device.type != "cpu":
        return False
    if not all(t.dtype == torch.float32 for t in (x, y, a, b)):
        return False
    if x.stride(-1) != 1 or y.stride(-1) != 1 or not (a.is_contiguous() and b.is_contiguous()):
        return False
    return _load() is not None


def _library(rows: torch.Tensor, stack: torch.Tensor, out: torch.Tensor, segments: torch.Tensor) -> ctypes.CDLL:
    """The loaded library, once the layouts the C code assumes are checked (a wrong one would read or write
    out of bounds, not raise)."""
    if segments.dtype != torch.int32 or not segments.is_contiguous() or segments.device.type != "cpu":
        raise ValueError("segments must be a contiguous int32 CPU tensor of (start, stop, slot) rows")
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (rows, stack, out)):
        raise ValueError("the CPU segment kernel takes float32 CPU tensors")
    if rows.stride(-1) != 1 or out.stride(-1) != 1 or not stack.is_contiguous():
        raise ValueError("rows must have unit stride along their length and the stacked factors must be contiguous")
    lib = _load()
    if lib is None:
        raise RuntimeError("the CPU segment kernel is not built here (no C compiler, or the build failed)")
    return lib


def segment_shrink(x: torch.Tensor, a: torch.Tensor, segments: torch.Tensor, h: torch.Tensor) -> None:
    """h[start:stop] = x[start:stop] @ a[slot] for every (start, stop, slot) row of `segments` (int32).

    x: (tokens, d_in), a: (slots, d_in, r), h: (tokens, r); rows outside every segment are left as they are.
    The caller guarantees the segments lie within x and h and the slots within a (`StepPlan` builds them).
    """
    if x.shape[1] != a.shape[1] or h.shape[1] != a.shape[2] or h.shape[0] < x.shape[0]:
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, a {tuple(a.shape)}, h {tuple(h.shape)}")
    _library(x, a, h, segments).segment_shrink_f32(x.data_ptr(), x.stride(0), a.data_ptr(), h.data_ptr(), h.stride(0),
                                                  segments.data_ptr(), segments.shape[0], a.shape[1], a.shape[2])


def segment_expand(h: torch.Tensor, b: torch.Tensor, segments: torch.Tensor, y: torch.Tensor) -> None:
    """y[start:stop] += h[start:stop] @ b[slot] for every (start, stop, slot); b: (slots, r, d_out)."""
    if h.shape[1] != b.shape[1] or y.shape[1] != b.shape[2] or y.shape[0] < h.shape[0]:
        raise ValueError(f"shapes do not fit: h {tuple(h.shape)}, b {tuple(b.shape)}, y {tuple(y.shape)}")
    _library(h, b, y, segments).segment_expand_f32(h.data_ptr(), h.stride(0), b.data_ptr(), y.data_ptr(), y.stride(0),
                                                  segments.data_ptr(), segments.shape[0], b.shape[1], b.shape[2])
