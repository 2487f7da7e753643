"""The stacked low-rank products of one decode or prefill step, per layer shape of SmolLM2-135M:
the compiled CPU segment kernel (`loraplex/serving/cpu_kernels.py`) against torch.bmm over the
(slots, rows, d) block, and against the time it takes just to read the factors.

    python benchmarks/segment_kernel.py [--slots 64] [--rank 8] [--rows 1,2,64] [--threads 1]

Each product reads the factors of a different copy of the stack (40 copies, ~100-200 MB) so the
figures include the memory traffic a real step has (no stack stays in cache between layers).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from loraplex.serving import cpu_kernels  # noqa: E402

SHAPES = {"q/o (576->576)": (576, 576), "k/v (576->192)": (576, 192), "gate/up (576->1536)": (576, 1536),
          "down (1536->576)": (1536, 576)}


def per_call_us(fn, copies: int, reps: int = 40) -> float:
    for i in range(3):
        fn(i % copies)
    start = time.perf_counter()
    for i in range(reps):
        fn(i % copies)
    return (time.perf_counter() - start) / reps * 1e6


def measure(s: int, r: int, rows: int, d_in: int, d_out: int, copies: int = 40) -> tuple[float, float, float]:
    """Microseconds per layer: reading the factors, torch.bmm + baddbmm_, the kernel (checked equal first)."""
    a = [torch.randn(s, d_in, r) for _ in range(copies)]
    b = [torch.randn(s, r, d_out) for _ in range(copies)]
    x = torch.randn(s * rows, d_in)
    y = torch.zeros(s * rows, d_out)
    h = torch.zeros(s * rows, r)
    segments = torch.tensor([[k * rows, (k + 1) * rows, k] for k in range(s)], dtype=torch.int32)

    def bmm(i):
        y.view(s, rows, d_out).baddbmm_(torch.bmm(x.view(s, rows, d_in), a[i]), b[i])

    def kernel(i):
        cpu_kernels.segment_shrink(x, a[i], segments, h)
        cpu_kernels.segment_expand(h, b[i], segments, y)

    want = y + torch.bmm(torch.bmm(x.view(s, rows, d_in), a[0]), b[0]).view(s * rows, d_out)
    kernel(0)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-3)
    return (per_call_us(lambda i: (a[i].sum(), b[i].sum()), copies), per_call_us(bmm, copies),
            per_call_us(kernel, copies))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=64, help="adapters in the stack (default 64)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rows", default="1,2,64", help="tokens per adapter: 1-2 decode, 64 prefill (default 1,2,64)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    probe = torch.zeros(1, 8)
    if not cpu_kernels.available(probe, probe, torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)):
        print("the CPU segment kernel is not available here (no C compiler, or LORAPLEX_CPU_KERNEL=0)")
        return 1
    s, r = args.slots, args.rank
    print(f"# stacked products, {s} adapters of rank {r}, fp32, {torch.get_num_threads()} thread(s); "
          f"microseconds per layer (shrink + expand)\n")
    print(f"{'layer':22s} {'tokens/adapter':>14s} {'read':>8s} {'bmm':>8s} {'kernel':>8s} {'bmm/kernel':>10s} "
          f"{'kernel/read':>11s}")
    for rows in (int(v) for v in args.rows.split(",")):
        for name, (d_in, d_out) in SHAPES.items():
            t_read, t_bmm, t_kernel = measure(s, r, rows, d_in, d_out)
            print(f"{name:22s} {rows:14d} {t_read:8.0f} {t_bmm:8.0f} {t_kernel:8.0f} {t_bmm / t_kernel:9.2f}x "
                  f"{t_kernel / t_read:10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
