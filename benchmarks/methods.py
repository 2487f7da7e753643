"""Step time and peak memory of every adapter method, relative to plain LoRA and to PEFT's implementation.

Every method trains SmolLM2-135M (fp32, CPU) at the defaults of `loraplex train` (r=16, alpha=32, every
linear layer of the body) with AdamW on the same batches of the default task, loss on the completion
tokens (`completion_loss`, the loss `loraplex train` uses). Where PEFT 0.21 implements the method
(PiSSA, EVA, LoRA-GA, OLoRA: PEFT's LoRA with that init; GLoRA, VeRA, FourierFT, VB-LoRA, Bone = MiSS,
RandLoRA, Kronecker = LoKr) the same adapter is loaded into PEFT from our file and trained the same
way, right after ours (so both see the same machine load).

Per configuration: one warm-up step, then `--steps` timed steps (median reported). Peak memory is the
largest resident set size during the steps above the resident size just before them (freed memory is
handed back to the OS first, `malloc_trim`): gradients, optimizer state and activations, not the base
weights. The bar: no method slower than 1.5x PEFT's implementation.

    .venv/bin/python benchmarks/methods.py                        # every method, 3 timed steps
    .venv/bin/python benchmarks/methods.py --methods vera kron --steps 2 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

PEFT_METHODS = ("pissa", "eva", "lora-ga", "olora", "glora", "vera", "fourierft", "vb-lora", "bone", "randlora",
                "kron")
BAR = 1.5


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def trim() -> None:
    with contextlib.suppress(OSError):   # not glibc: the numbers just include retained memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """Samples the resident set size every 2 ms in a thread; `peak` is the largest seen."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def make_batches(tokenizer, n: int, batch_size: int):
    from loraplex.data import task_split
    from loraplex.data.tokenize import collate, encode_all

    examples = task_split("dates", "train", n * batch_size, seed=0)
    encoded = encode_all(tokenizer, examples, 256)
    return [collate(encoded[i * batch_size:(i + 1) * batch_size], tokenizer.pad_token_id) for i in range(n)]


def time_steps(hf_model, params, batches, aux=None) -> tuple[list[float], int]:
    """(seconds of each timed step, peak extra memory in bytes); batches[0] is the warm-up step."""
    from loraplex.training.loop import completion_loss

    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    hf_model.train()
    trim()
    times = []
    with PeakRss() as peak:
        base = rss_bytes()
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            loss, _ = completion_loss(hf_model, batch)
            extra = aux() if aux is not None else None
            if isinstance(extra, torch.Tensor):
                loss = loss + extra
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i > 0:
                times.append(time.perf_counter() - t0)
    return times, max(0, peak.peak - base)


def run_ours(base, method: str, batches, save_to: Path | None):
    from loraplex.core.model import attach
    from loraplex.methods import get
    from loraplex.training.loop import TrainConfig
    from loraplex.training.recipes import model_aux_loss

    model = copy.deepcopy(base)
    calibration = batches[:1] if hasattr(get(method), "calibrate") else None
    pm = attach(model, TrainConfig(method=method).lora_config(), calibration_data=calibration)
    if save_to is not None:
        pm.save(save_to)
    times, memory = time_steps(pm.model, pm.trainable_parameters(), batches, aux=lambda: model_aux_loss(pm))
    return times, memory, pm.trainable_parameter_count()


def run_peft(base, folder: Path, batches):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder), is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    times, memory = time_steps(model.base_model.model, params, batches)
    return times, memory, sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> int:
    from loraplex.methods import available

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=None, help="methods to run (default: all; lora always)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's implementations")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N decoder layers of SmolLM2 (a quick run; real weights)")
    parser.add_argument("--markdown", metavar="FILE", help="append the table to FILE")
    args = parser.parse_args(argv)
    known = sorted(available())
    methods = args.methods or known
    unknown = sorted(set(methods) - set(known))
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; available: {', '.join(known)}")
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("error: --steps and --batch-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from loraplex.models import load_model

    loaded = load_model(None)
    if args.layers:
        body = loaded.model.model
        if not 1 <= args.layers <= len(body.layers):
            raise SystemExit(f"error: --layers must be in [1, {len(body.layers)}]")
        body.layers = body.layers[: args.layers]
        loaded.model.config.num_hidden_layers = args.layers
    batches = make_batches(loaded.tokenizer, args.steps + 1, args.batch_size)
    rows, lora = [], None
    run_ours(loaded.model, "lora", batches[:2], None)   # warm-up: the first configuration runs slow (allocator)
    for method in ["lora"] + [m for m in methods if m != "lora"]:
        with tempfile.TemporaryDirectory() as tmp:
            peft_side = method in PEFT_METHODS and not args.no_peft
            try:
                times, memory, n = run_ours(loaded.model, method, batches, Path(tmp) if peft_side else None)
            except Exception as err:   # e.g. a method that cannot run on a causal LM
                print(f"{method}: does not run ({type(err).__name__}: {str(err)[:120]})", file=sys.stderr)
                rows.append({"method": method, "error": f"{type(err).__name__}"})
                continue
            row = {"method": method, "params": n, "ms": 1e3 * statistics.median(times), "mb": memory / 2**20}
            if peft_side:
                try:
                    p_times, p_memory, p_n = run_peft(loaded.model, Path(tmp), batches)
                    row |= {"peft_ms": 1e3 * statistics.median(p_times), "peft_mb": p_memory / 2**20,
                            "peft_params": p_n}
                except Exception as err:
                    row["peft_error"] = f"{type(err).__name__}: {str(err)[:120]}"
        if method == "lora":
            lora = row
        rows.append(row)
        print(format_row(row, lora), flush=True)
    table = render(rows, lora, args)
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(table + "\n")
    slow = [r["method"] for r in rows if "peft_ms" in r and r["ms"] > BAR * r["peft_ms"]]
    if slow:
        print(f"slower than {BAR}x PEFT: {', '.join(slow)}", file=sys.stderr)
    return 0


def format_row(row: dict, lora: dict | None) -> str:
    if "error" in row:
        return f"{row['method']:12s} does not run: {row['error']}"
    rel = "" if lora is None else f" {row['ms'] / lora['ms']:5.2f}x LoRA time {row['mb'] / max(lora['mb'], 1):5.2f}x mem"
    peft = (f" | PEFT {row['peft_ms']:8.0f} ms {row['ms'] / row['peft_ms']:5.2f}x time" if "peft_ms" in row
            else f" | PEFT failed: {row['peft_error']}" if "peft_error" in row else "")
    return f"{row['method']:12s} {row['ms']:8.0f} ms/step {row['mb']:7.0f} MB{rel}{peft}"


def render(rows: list[dict], lora: dict | None, args) -> str:
    model = "SmolLM2-135M" + (f", first {args.layers} layers" if args.layers else "")
    lines = [f"### Methods: training step on {model} (CPU fp32, batch {args.batch_size}, r=16, median of "
             f"{args.steps} steps, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')})", "",
             "| method | trainable | ms/step | peak extra MB | time / LoRA | memory / LoRA | PEFT ms/step | "
             "time / PEFT | memory / PEFT |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['method']}` | does not run: {r['error']} | | | | | | | |")
            continue
        lt = f"{r['ms'] / lora['ms']:.2f}" if lora else "–"
        lm = f"{r['mb'] / max(lora['mb'], 1):.2f}" if lora else "–"
        if "peft_ms" in r:
            peft = f"{r['peft_ms']:.0f} | {r['ms'] / r['peft_ms']:.2f} | {r['mb'] / max(r['peft_mb'], 1):.2f}"
        else:
            peft = "– | – | –" if "peft_error" not in r else f"failed: {r['peft_error']} | | "
        lines.append(f"| `{r['method']}` | {r['params']:,} | {r['ms']:.0f} | {r['mb']:.0f} | {lt} | {lm} | {peft} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
