"""Training-step speed and memory: loraplex's loop against PEFT + transformers' `labels=` forward.

Both sides train LoRA r=16 on every linear layer of SmolLM2-135M with AdamW on the same batches of
the default task (fp32). Ours computes the output head only at supervised (completion) positions;
the anchor is what most users run: `PeftModel(**batch, labels=...)`, loss over all positions.
Each side runs in its own process (so peak RSS is its own); the parent alternates them and prints
medians and ratios, plus achieved GFLOP/s as a fraction of this machine's measured fp32 matmul rate.

    .venv/bin/python benchmarks/train_step.py            # full (about 5 minutes on 2 cores)
    .venv/bin/python benchmarks/train_step.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def matmul_gflops(dtype=torch.float32, n: int = 1024) -> float:
    a, b = torch.randn(n, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if dtype == torch.float32 else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n * 576 * 1536 * reps / (time.perf_counter() - t) / 1e9


def batches(tokenizer, n_batches: int, batch_size: int):
    from loraplex.data import collate, encode_all, task_split

    examples = task_split("dates", "train", n_batches * batch_size, seed=0)
    encoded = encode_all(tokenizer, examples, 256)
    return [collate(encoded[i * batch_size:(i + 1) * batch_size], tokenizer.pad_token_id) for i in range(n_batches)]


def step_flops(model, batch) -> float:
    """Matmul FLOPs of one step: body forward + input-gradient backward (frozen weights), LoRA's own
    forward/backward, and the output head at the positions each side computes it."""
    cfg = model.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    kv = d // cfg.num_attention_heads * cfg.num_key_value_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * cfg.intermediate_size
    tokens = int(batch["attention_mask"].sum())
    return tokens * layers * per_layer * 4.0  # 2 (fwd) + 2 (bwd wrt inputs)


def child(which: str, steps: int, batch_size: int, bf16: bool) -> dict:
    torch.set_num_threads(2)
    from loraplex.models import load_model

    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    data = batches(tok, steps + 2, batch_size)
    if which == "ours":
        import loraplex
        from loraplex.training.loop import completion_loss

        wrapped = loraplex.attach(model, loraplex.LoraConfig(r=16, alpha=32, targets="all-linear"))
        params = wrapped.trainable_parameters()

        def loss_fn(batch):
            return completion_loss(model, batch)[0]
    else:
        from peft import LoraConfig, get_peft_model

        wrapped = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        params = [p for p in wrapped.parameters() if p.requires_grad]

        def loss_fn(batch):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    wrapped.train()
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    times = []
    for i, batch in enumerate(data):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # the first two steps warm up allocators and caches
            times.append(time.perf_counter() - t)
    flops = statistics.mean(step_flops(model, b) for b in data[2:])
    return {"which": which, "step_s": statistics.median(times), "flops": flops,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(which: str, steps: int, batch_size: int, bf16: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", which, "--steps", str(steps),
                          "--batch-size", str(batch_size)] + (["--bf16"] if bf16 else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, one round")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per side")
    parser.add_argument("--bf16", action="store_true", help="also measure bf16 autocast")
    parser.add_argument("--child", choices=["ours", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 8)
    if args.child:
        print(json.dumps(child(args.child, steps, args.batch_size, args.bf16)))
        return
    rounds = args.rounds or (1 if args.quick else 2)
    torch.set_num_threads(2)
    peak = matmul_gflops()
    print(f"fp32 matmul rate of this machine: {peak:.1f} GFLOP/s (1024x576 @ 576x1536)")
    modes = [False, True] if args.bf16 else [False]
    for bf16 in modes:
        results = {"ours": [], "peft": []}
        for _ in range(rounds):
            for which in ("ours", "peft"):
                results[which].append(run_child(which, steps, args.batch_size, bf16))
        label = "bf16 autocast" if bf16 else "fp32"
        print(f"\n{label}, batch {args.batch_size} of the dates task, LoRA r=16 all-linear, {steps} steps x {rounds}")
        print(f"{'':8s} {'step (s)':>9s} {'GFLOP/s':>9s} {'of peak':>8s} {'max RSS (MB)':>13s}")
        summary = {}
        for which, rows in results.items():
            step = statistics.median(r["step_s"] for r in rows)
            gflops = rows[0]["flops"] / step / 1e9
            rss = max(r["max_rss_mb"] for r in rows)
            summary[which] = (step, rss)
            print(f"{which:8s} {step:9.3f} {gflops:9.1f} {gflops / peak:8.0%} {rss:13.0f}")
        speedup = summary["peft"][0] / summary["ours"][0]
        print(f"speed-up ours vs PEFT: {speedup:.2f}x   peak RSS ours/PEFT: {summary['ours'][1] / summary['peft'][1]:.2f}")


if __name__ == "__main__":
    main()
