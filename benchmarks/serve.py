"""Serving throughput: loraplex's multi-adapter engine against the bare base, PEFT mixed batches, and
one batch per adapter in turn (SmolLM2-135M, fp32, CPU).

    .venv/bin/python benchmarks/serve.py            # 1, 8, 64 and 256 distinct adapters, 256 requests x 32 tokens
    .venv/bin/python benchmarks/serve.py --quick    # 1 and 8 adapters, 8 requests x 8 tokens (checks it works)
    .venv/bin/python benchmarks/serve.py --adapters 64 --disk 1024   # + 1024 adapters on disk (paging, compressed)

Every system serves the same requests (the same prompts, request i on adapter i mod n), greedy, exactly
`--tokens` new tokens each (EOS ignored), and is timed from submission to the last token. With
`--spread S` the requests want different numbers of new tokens, spread evenly over tokens ± S (real
traffic): the engines drop a finished row from the batch, Hugging Face `generate` runs each batch to
its longest row and the extra tokens are cut (what static batching costs); throughput counts only
the tokens the requests asked for.

  base-engine  our engine, every request on the bare base model (no adapter installed)
  base-hf      Hugging Face `generate` on the bare base, all requests in one left-padded batch
  loraplex     our engine, requests spread over n adapters: continuous batching, rows grouped by adapter,
               shrink/expand per group at each adapter's rank
  peft-mixed   PEFT `generate(..., adapter_names=[...])`: one left-padded batch mixing the n adapters
  peft-turn    PEFT, one batch per adapter in turn (`set_adapter`, then generate that adapter's requests)
  compressed   our engine serving the n adapters jointly compressed into a shared basis (`loraplex compress`,
               rank --jd-rank): every adapter resident, y += ((x V) Σ_iᵀ) Uᵀ per row

With `--disk N`, N adapters (attention layers, rank --disk-rank, written straight in PEFT's format) lie on
disk and the requests are spread over all of them (request i on adapter i·N/requests):

  paged        the engine reads adapters on first use (background thread), at most --max-active on the
               device and --max-cached in host memory, least recently used evicted
  compressed   the N adapters compressed into one set first (time reported), all resident

Throughput is generated tokens per second. The machine may be shared, so the systems of one setting run
interleaved (the order alternates each round) and each ratio is the median of per-round ratios measured
in the same run. After the runs, adapters are unloaded from the engine and the memory they held is
reported (engine accounting, and the process RSS).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
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

from loraplex.core.config import LoraConfig  # noqa: E402
from loraplex.core.io import PREFIX  # noqa: E402
from loraplex.core.model import AdapterModel  # noqa: E402
from loraplex.serving import Engine, SamplingParams  # noqa: E402
from loraplex.serving.adapters import base_modules, read_adapter, release_freed_host_memory  # noqa: E402
from loraplex.serving.compress import compress  # noqa: E402


def read_rate_gb_s(megabytes: int = 512) -> float:
    """Memory read rate of this process (a sum over a fresh fp32 buffer): what bounds reading adapter factors."""
    buf = torch.ones(megabytes * 2**20 // 4)
    buf.sum()
    start = time.perf_counter()
    buf.sum()
    return buf.numel() * 4 / (time.perf_counter() - start) / 1e9


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def load_base(spec: str):
    if spec == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import char_tokenizer, tiny_llama

        tok = char_tokenizer()
        return tiny_llama(len(tok), hidden=64, layers=4), tok
    from loraplex.models import load_model

    loaded = load_model(spec)
    return loaded.model, loaded.tokenizer


def make_adapters(base, n: int, r: int, folder: Path, targets="all-linear") -> list[Path]:
    """n random (non-identity) LoRA adapters (default: on every linear layer), saved in PEFT's format."""
    ws = AdapterModel(copy.deepcopy(base))
    paths = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        ws.add_adapter("x", LoraConfig(r=r, alpha=2.0 * r, init="random", targets=targets))
        with torch.no_grad():     # "random" init: B ~ U(±1/sqrt(r)); keep the deltas modest on a real model
            for name, p in ws.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        ws.save(folder / f"a{i}", name="x")
        ws.delete_adapter("x")
        paths.append(folder / f"a{i}")
    return paths


def write_raw_adapters(base, n: int, r: int, folder: Path, targets: list[str]) -> list[Path]:
    """n random LoRA adapters written straight as PEFT files (safetensors + adapter_config.json): quick for
    thousands. A ~ N(0, 1/d_in), B ~ N(0, 0.05²/r), alpha = 2r."""
    from safetensors.torch import save_file

    layers = [(p, m) for p, m in base_modules(base).items()
              if isinstance(m, torch.nn.Linear) and p.rsplit(".", 1)[-1] in targets]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": sorted(targets), "bias": "none", "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
    g = torch.Generator().manual_seed(7)
    paths = []
    for i in range(n):
        tensors = {}
        for path, m in layers:
            tensors[f"{PREFIX}{path}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) / m.in_features ** 0.5
            tensors[f"{PREFIX}{path}.lora_B.weight"] = 0.05 * torch.randn(m.out_features, r, generator=g) / r ** 0.5
        out = folder / f"d{i}"
        out.mkdir(parents=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(config))
        paths.append(out)
    return paths


def compressed_engine(base, tok, paths: list[Path], rank: int, folder: Path, iters: int = 3,
                      **kw) -> tuple[Engine, float]:
    """An engine serving `paths` compressed into one set (names a0..); returns it and the compression seconds."""
    modules = base_modules(base)
    start = time.perf_counter()
    hosts = [read_adapter(p, f"a{i}", modules, torch.float32) for i, p in enumerate(paths)]
    cset = compress(hosts, rank, iters=iters, dtype=torch.float32, name="jd")
    seconds = time.perf_counter() - start
    del hosts
    cset.save(folder)
    engine = Engine(copy.deepcopy(base), tok, **kw)
    engine.add_compressed(folder)
    return engine, seconds


def wanted_lengths(n: int, tokens: int, spread: int) -> list[int]:
    """New tokens per request: `tokens` each, or spread evenly over tokens ± spread in a fixed shuffled order."""
    if spread <= 0:
        return [tokens] * n
    steps = [tokens - spread + (2 * spread * i) // max(1, n - 1) for i in range(n)]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    return [max(1, steps[k]) for k in order]


def prompts_for(tok, n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    out = []
    for i in range(n):
        k = max(4, length - (i % 5))          # slightly different lengths: padding is part of the job
        idx = torch.randint(0, len(vocab), (k,), generator=g).tolist()
        out.append([vocab[j] for j in idx])
    return out


def hf_generate(model, prompts: list[list[int]], lengths: list[int], pad_id: int, **kw) -> int:
    """Hugging Face `generate`, greedy, one batch run to the longest of `lengths` (each row's wanted new
    tokens; a row's extra tokens are computed and cut, which is what static batching costs): returns
    the wanted tokens. EOS is switched off in the generation config (not forced away with
    `min_new_tokens`, whose per-step pass over the logits would be an overhead no real user pays)."""
    tokens = max(lengths)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    config = copy.deepcopy(model.generation_config)
    config.update(eos_token_id=None, max_new_tokens=tokens, min_new_tokens=None, do_sample=False,
                  pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **kw)
    assert out.shape[1] - width == tokens, "generate stopped early"
    return sum(lengths)


def interleaved(fns: dict[str, Callable[[], int]], reps: int) -> dict[str, list[float]]:
    """tokens/s of every function, `reps` rounds, order reversed every other round (after one warm-up)."""
    names = list(fns)
    for n in names:
        start = time.perf_counter()
        fns[n]()
        print(f"  (warm-up {n}: {time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    out: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for n in (names if rep % 2 == 0 else names[::-1]):
            gc.collect()
            start = time.perf_counter()
            tokens = fns[n]()
            out[n].append(tokens / (time.perf_counter() - start))
    return out


def ratio(t: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(t[a], t[b]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="base model (default smollm2; 'tiny' = a small random Llama)")
    ap.add_argument("--adapters", default=None, help="comma-separated adapter counts (default 1,8,64)")
    ap.add_argument("--requests", type=int, default=None, help="requests per setting (default 64)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 32)")
    ap.add_argument("--spread", type=int, default=0,
                    help="new tokens vary by up to ± this much between requests (mean --tokens; default 0)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per setting (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--targets", default="all-linear", help="layers the adapters adapt (comma-separated names)")
    ap.add_argument("--jd-rank", type=int, default=32, help="shared basis rank of the compressed sets (0: skip)")
    ap.add_argument("--jd-iters", type=int, default=3, help="alternating iterations of the compression fit")
    ap.add_argument("--disk-jd-rank", type=int, default=32, help="shared basis rank for the --disk set (0: skip)")
    ap.add_argument("--disk", type=int, default=0, help="also serve requests over this many adapters on disk")
    ap.add_argument("--disk-rank", type=int, default=8)
    ap.add_argument("--disk-targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--disk-requests", type=int, default=None, help="requests of the --disk setting (default 256)")
    ap.add_argument("--max-active", type=int, default=64, help="device slots of the paged --disk engine")
    ap.add_argument("--max-cached", type=int, default=128, help="host cache of the paged --disk engine")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-peft-turn", action="store_true", help="leave out PEFT one batch per adapter (slow)")
    ap.add_argument("--quick", action="store_true", help="1 and 8 adapters, 8 requests x 8 tokens, one round")
    args = ap.parse_args()
    quick = args.quick
    counts = [int(x) for x in (args.adapters or ("1,8" if quick else "1,8,64,256")).split(",")] if args.adapters != "" else []
    n_req = args.requests or (8 if quick else max([256, *counts]))
    tokens = args.tokens or (8 if quick else 32)
    plen = args.prompt_len or (16 if quick else 32)
    reps = args.reps or (1 if quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)

    base, tok = load_base(args.model)
    base.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts = prompts_for(tok, n_req, plen)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    each = f"{tokens} ± {args.spread}" if args.spread else f"{tokens}"
    print(f"# serving throughput: {args.model}, {n_req} requests x {each} new tokens, prompts ~{plen} tokens, "
          f"LoRA r={args.rank} on {args.targets}, fp32")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f", {reps} round(s) per setting; memory read rate {read_rate_gb_s():.1f} GB/s\n")
    workdir = tempfile.TemporaryDirectory(prefix="loraplex-serve-bench-")
    tmp = Path(workdir.name)
    start = time.perf_counter()
    paths = make_adapters(base, max(counts), args.rank, tmp, targets) if counts else []
    print(f"  ({len(paths)} adapters written in {time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    lengths = wanted_lengths(n_req, tokens, args.spread)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]

    peft_model = None
    if not args.skip_peft and counts:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name="a0")
        for i in range(1, max(counts)):
            peft_model.load_adapter(str(paths[i]), adapter_name=f"a{i}")
        peft_model.eval()
        print(f"  (PEFT model with {max(counts)} adapters ready)", file=sys.stderr, flush=True)

    rows = []
    engine_base = Engine(copy.deepcopy(base), tok, max_batch=n_req, max_queue=n_req, prefill_per_step=n_req,
                         max_prefill_tokens=n_req * (plen + 8))
    for n in counts:
        engine = Engine(copy.deepcopy(base), tok, max_active=n, max_cached=n, max_batch=n_req, max_queue=n_req,
                        prefill_per_step=n_req, max_prefill_tokens=n_req * (plen + 8))
        for i in range(n):
            engine.add_adapter(f"a{i}", paths[i])
        names = [f"a{i % n}" for i in range(n_req)]

        def run_engine(e=engine, names=names):
            out = e.generate(prompts, names, params)
            return sum(c.completion_tokens for c in out)

        fns: dict[str, Callable[[], int]] = {
            "base-engine": lambda: sum(c.completion_tokens for c in engine_base.generate(prompts, None, params)),
            "base-hf": lambda: hf_generate(base, prompts, lengths, pad),
            "loraplex": run_engine,
        }
        if peft_model is not None:
            fns["peft-mixed"] = lambda names=names: hf_generate(peft_model, prompts, lengths, pad, adapter_names=names)

            def turn(names=names, n=n):
                total = 0
                for a in range(n):
                    peft_model.set_adapter(f"a{a}")
                    mine = [i for i, nm in enumerate(names) if nm == f"a{a}"]
                    total += hf_generate(peft_model, [prompts[i] for i in mine], [lengths[i] for i in mine], pad)
                return total

            if not args.skip_peft_turn:
                fns["peft-turn"] = turn
        jd_engine = None
        if args.jd_rank > 0 and n > 1:
            jd_engine, secs = compressed_engine(base, tok, paths[:n], args.jd_rank, tmp / f"jd{n}", args.jd_iters,
                                                max_batch=n_req,
                                                max_queue=n_req, prefill_per_step=n_req,
                                                max_prefill_tokens=n_req * (plen + 8))
            print(f"  ({n} adapters compressed at R={args.jd_rank} in {secs:.1f} s)", file=sys.stderr, flush=True)
            fns["compressed"] = lambda e=jd_engine, names=names: sum(c.completion_tokens
                                                                    for c in e.generate(prompts, names, params))
        t = interleaved(fns, reps)
        med = {k: statistics.median(v) for k, v in t.items()}
        pairs = [("loraplex", "base-engine"), ("loraplex", "base-hf")]
        if jd_engine is not None:
            pairs += [("compressed", "base-engine")]
        if peft_model is not None:
            pairs += [("loraplex", "peft-mixed"), ("peft-mixed", "base-hf")]
            if "peft-turn" in fns:
                pairs += [("loraplex", "peft-turn"), ("peft-turn", "base-hf")]
        ratios = {f"{a}/{b}": ratio(t, a, b) for a, b in pairs}
        rows.append({"n": n, "tokens/s": med, "ratios": ratios})
        print(f"## {n} distinct adapter(s)")
        for k, v in med.items():
            print(f"  {k:12s} {v:9.1f} tokens/s")
        for k, v in ratios.items():
            print(f"  {k:22s} {v:6.2f}x")
        print()

        if n == max(counts):          # memory: what unloading gives back
            gc.collect()
            release_freed_host_memory()        # so the RSS difference below is the adapters' alone
            before_mem, before_rss = engine.memory(), rss_bytes()
            for i in range(n):
                engine.remove_adapter(f"a{i}", wait=10)
            gc.collect()
            after_mem, after_rss = engine.memory(), rss_bytes()
            print(f"## unloading {n} adapters from the engine")
            print(f"  adapter bytes (host tier):   {before_mem['host_bytes'] / 2**20:8.1f} MiB -> "
                  f"{after_mem['host_bytes'] / 2**20:.1f} MiB")
            print(f"  adapter bytes (device tier): {before_mem['device_bytes'] / 2**20:8.1f} MiB -> "
                  f"{after_mem['device_bytes'] / 2**20:.1f} MiB")
            print(f"  stacked factors (device):    {before_mem['stack_bytes'] / 2**20:8.1f} MiB -> "
                  f"{after_mem['stack_bytes'] / 2**20:.1f} MiB")
            print(f"  process RSS:                 {before_rss / 2**20:8.1f} MiB -> {after_rss / 2**20:.1f} MiB "
                  f"({(before_rss - after_rss) / 2**20:+.1f} MiB freed)\n")
        del engine, jd_engine
        gc.collect()
    if args.disk:
        disk_setting(args, base, tok, tmp, engine_base, plen, tokens, reps)
    workdir.cleanup()
    return 0


def disk_setting(args, base, tok, tmp: Path, engine_base: Engine, plen: int, tokens: int, reps: int) -> None:
    """--disk N adapters on disk, requests spread over all of them: paged engine and compressed set vs base."""
    n, n_req = args.disk, args.disk_requests or 256
    start = time.perf_counter()
    paths = write_raw_adapters(base, n, args.disk_rank, tmp / "disk", args.disk_targets.split(","))
    size = sum(f.stat().st_size for p in paths for f in p.iterdir())
    print(f"  ({n} adapters, {size / 2**20:.0f} MiB, written in {time.perf_counter() - start:.1f} s)",
          file=sys.stderr, flush=True)
    prompts = prompts_for(tok, n_req, plen, seed=1)
    names = [f"d{(i * n) // n_req}" for i in range(n_req)]        # every request on its own adapter
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    kw = dict(max_batch=min(n_req, 64), max_queue=n_req, prefill_per_step=16, max_prefill_tokens=16 * (plen + 8))
    base_eng = Engine(copy.deepcopy(base), tok, **kw)

    def fresh_paged() -> Engine:
        e = Engine(copy.deepcopy(base), tok, max_active=args.max_active, max_cached=args.max_cached,
                   load_lookahead=8, **kw)
        e.add_adapter_dir(tmp / "disk")
        return e

    paged = {"engine": fresh_paged()}

    def run_paged() -> int:
        # a cold engine each round: every adapter is read from disk during the run
        e = paged["engine"]
        out = e.generate(prompts, names, params)
        paged["loads"] = e.pool.loads
        paged["engine"] = fresh_paged()
        return sum(c.completion_tokens for c in out)

    fns: dict[str, Callable[[], int]] = {
        "base-engine": lambda: sum(c.completion_tokens for c in base_eng.generate(prompts, None, params)),
        "paged": run_paged,
    }
    if args.disk_jd_rank > 0:
        jd, secs = compressed_engine(base, tok, paths, args.disk_jd_rank, tmp / "jd-disk", args.jd_iters, **kw)
        print(f"  ({n} adapters compressed at R={args.disk_jd_rank} in {secs:.1f} s; "
              f"{jd.memory()['compressed_bytes'] / 2**20:.1f} MiB resident)", file=sys.stderr, flush=True)
        jd_names = [f"a{(i * n) // n_req}" for i in range(n_req)]
        fns["compressed"] = lambda: sum(c.completion_tokens for c in jd.generate(prompts, jd_names, params))
    t = interleaved(fns, reps)
    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"## {n} adapters on disk ({size / 2**20:.0f} MiB, LoRA r={args.disk_rank} on {args.disk_targets}), "
          f"{n_req} requests each on its own adapter")
    print(f"  paged: max_active={args.max_active}, max_cached={args.max_cached}, {paged.get('loads', 0)} adapter "
          "reads per round")
    for k, v in med.items():
        print(f"  {k:12s} {v:9.1f} tokens/s")
    for k in fns:
        if k != "base-engine":
            print(f"  {k + '/base-engine':22s} {ratio(t, k, 'base-engine'):6.2f}x")
    print()


if __name__ == "__main__":
    sys.exit(main())
