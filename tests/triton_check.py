"""Checks of the Triton serving kernel, run by `test_serving_triton.py` in a fresh process.

Without a GPU, run it under Triton's CPU interpreter (`TRITON_INTERPRET=1`, set before Triton is
imported, hence the separate process); on a CUDA machine, `--device cuda` compiles and runs the kernel.
Prints "ok" when every check passes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny import char_tokenizer, tiny_llama  # noqa: E402

from loraplex.core.config import LoraConfig  # noqa: E402
from loraplex.core.model import AdapterModel  # noqa: E402
from loraplex.serving import Engine, SamplingParams, StepPlan  # noqa: E402
from loraplex.serving import triton_kernels as tk  # noqa: E402
from loraplex.serving.layers import LoraWeights, PlanContext, ServingModule  # noqa: E402


def check_kernel(device: str) -> None:
    """segment_matmul against a loop of per-segment products: shrink (writes) and expand (adds)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 37, generator=g)
    a, b = torch.randn(5, 37, 6, generator=g), torch.randn(5, 6, 45, generator=g)
    # one token, a segment longer than a tile (16 rows), a slot used twice, rows no segment covers
    segs = [(0, 1, 3), (3, 21, 0), (21, 22, 4), (25, 59, 1), (60, 70, 0)]
    y = torch.randn(70, 45, generator=g)
    want_h, want_y = torch.zeros(70, 6), y.clone()
    for start, stop, slot in segs:
        want_h[start:stop] = x[start:stop] @ a[slot]
        want_y[start:stop] += want_h[start:stop] @ b[slot]
    seg = torch.tensor(segs, dtype=torch.int32, device=device)
    h = tk.segment_matmul(x.to(device), a.to(device), seg, 34)
    out = y.to(device)
    tk.segment_matmul(h, b.to(device), seg, 34, out=out)
    assert torch.allclose(h.cpu(), want_h, atol=1e-4), (h.cpu() - want_h).abs().max()
    assert torch.allclose(out.cpu(), want_y, atol=1e-4), (out.cpu() - want_y).abs().max()


def check_layer(device: str, calls: list[int]) -> None:
    """A ServingModule's stacked groups through the kernel equal the batched-product (PyTorch) path."""
    torch.manual_seed(1)
    ctx = PlanContext()
    layer = ServingModule(torch.nn.Linear(24, 20).to(device), "linear", ctx)
    ranks = {f"s{i}": 4 for i in range(6)} | {f"t{i}": 8 for i in range(3)}
    for name, r in ranks.items():
        a, b = torch.randn(r, 24), torch.randn(20, r) / r
        layer.add_lora(name, LoraWeights("linear", a.t().contiguous().to(device), b.t().contiguous().to(device)))
    layer.remove_lora("s1")                                   # a free slot in the rank-4 stack
    one = lambda n, w=1.0: ((n, w),)  # noqa: E731
    rows = ([(), one("s0"), one("s0"), one("s2"), one("s3", 0.5), one("s4")] + [one("s5")] * 5
            + [one("t0"), one("t1"), one("t1"), one("t2"), (("s0", 0.5), ("t2", 2.0))])
    for tokens in (1, 4):                                     # decode-like and prefill-like steps
        ctx.plan = StepPlan(rows, device=device)
        x = torch.randn(len(rows), tokens, 24, device=device)
        before = calls[0]
        with torch.no_grad():
            os.environ["LORAPLEX_TRITON"] = "0"
            want = layer(x)
            os.environ["LORAPLEX_TRITON"] = "1"
            got = layer(x)
        assert calls[0] - before == 4, calls            # two stacks (ranks 4 and 8), shrink + expand each
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def check_engine(device: str) -> None:
    """The engine's greedy answers with the kernel equal those of the PyTorch path."""
    tok = char_tokenizer()
    base = tiny_llama(len(tok), seed=0)
    prompts = [tok(p, add_special_tokens=False)["input_ids"]
               for p in ["hello world", "abc", "The quick brown fox", "zz", "lorem ipsum", "x=1;", "SELECT *", "ok?"]]
    with tempfile.TemporaryDirectory() as tmp:
        ws = AdapterModel(copy.deepcopy(base))
        for i in range(8):           # two ranks, each with enough adapters for the stacked path
            torch.manual_seed(10 + i)
            ws.add_adapter("x", LoraConfig(r=4 if i < 5 else 6, init="random", targets="all-linear"))
            ws.save(Path(tmp) / f"a{i}", name="x")
            ws.delete_adapter("x")
        answers = {}
        for flag in ("0", "1"):
            os.environ["LORAPLEX_TRITON"] = flag
            engine = Engine(copy.deepcopy(base).to(device), tok, max_active=8, max_cached=8, max_batch=16)
            for i in range(8):
                engine.add_adapter(f"a{i}", Path(tmp) / f"a{i}")
            names = [f"a{i}" for i in range(len(prompts))]
            outs = engine.generate(prompts, names, SamplingParams(max_tokens=8, ignore_eos=True))
            answers[flag] = [o.text for o in outs]
    assert answers["0"] == answers["1"], answers
    assert len(set(answers["1"])) > 3                     # the adapters change the answers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu", help="cpu (needs TRITON_INTERPRET=1) or cuda")
    args = ap.parse_args()
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("on CPU, run with TRITON_INTERPRET=1 (Triton's interpreter)")
    torch.set_num_threads(1)
    calls = [0]
    real = tk.segment_matmul

    def counted(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    tk.segment_matmul = counted
    check_kernel(args.device)
    check_layer(args.device, calls)
    before = calls[0]
    check_engine(args.device)
    assert calls[0] > before, "the engine never used the kernel"
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
