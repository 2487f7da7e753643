"""GaLore benchmark: loraplex's `GaLoreAdamW` against `galore-torch`'s on SmolLM2-135M (fp32).

    .venv/bin/python benchmarks/galore.py                       # 6 steps, rank 128, all layers, CPU
    .venv/bin/python benchmarks/galore.py --steps 4 --layers 2  # a short run on a small shared CPU
    .venv/bin/python benchmarks/galore.py --device cuda

Both optimizers train the same parameters of two deep copies of one model (every 2-D weight of the
transformer body, or of its first `--layers` layers, projected with rank r, update_proj_gap 200,
scale 0.25, proj_type std) on the same random batches. Per step we time the optimizer's `step()` alone (forward/backward are identical code
for both) and, separately, step 0, where both compute the SVD projectors. The two sides run
interleaved (ours, theirs, ours, ...) and the reported ratio is the median of per-step ratios, which
cancels most drift on a shared machine. Also reported: optimizer-state bytes (moments + projectors)
of each against full AdamW's 2·params·4 bytes, and the largest parameter difference after the run
(the two implementations should agree to float32 rounding).

galore-torch is a benchmark/test dependency only (`pip install galore-torch`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from loraplex.training.recipes.full import tensor_bytes, transformer_layers  # noqa: E402
from loraplex.training.recipes.galore import GaLoreAdamW  # noqa: E402


def galore_groups(model, rank: int, gap: int, layers: int | None) -> list[dict]:
    """Every 2-D weight of the first `layers` transformer layers (None: all), the rest frozen."""
    _, stack = transformer_layers(model)
    keep = {id(p) for layer in stack[:layers] for p in layer.parameters()}
    mats = []
    for p in model.parameters():
        train = p.ndim == 2 and id(p) in keep
        p.requires_grad_(train)
        if train:
            mats.append(p)
    return [{"params": mats, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}]


def their_state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        total += tensor_bytes([v for k, v in state.items() if k != "projector"])
        if "projector" in state:
            total += tensor_bytes(state["projector"].ortho_matrix)
    return total


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None,
                        help="train only the first N transformer layers (default: all 30); a small CPU spends "
                             "~2 s per 1536x576 SVD, 210 of them per side at step 0 with all layers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from galore_torch import GaLoreAdamW as TheirGaLore

    from loraplex.models import load_model

    loaded = load_model("smollm2")
    ours_model = loaded.model.to(args.device).train()
    their_model = copy.deepcopy(ours_model)
    ours = GaLoreAdamW(galore_groups(ours_model, args.rank, 200, args.layers), lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TheirGaLore(galore_groups(their_model, args.rank, 200, args.layers), lr=1e-4)
    trained = [p for g in ours.param_groups for p in g["params"]]
    initial = [p.detach().clone() for p in trained]
    gen = torch.Generator().manual_seed(0)
    vocab = ours_model.config.vocab_size
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq), generator=gen).to(args.device)
               for _ in range(args.steps)]
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for step, ids in enumerate(batches):
        order = [("ours", ours_model, ours), ("theirs", their_model, theirs)]
        for name, model, opt in order if step % 2 == 0 else order[::-1]:
            model(input_ids=ids, labels=ids).loss.backward()
            sync(args.device)
            t = time.perf_counter()
            opt.step()
            sync(args.device)
            times[name].append(time.perf_counter() - t)
            opt.zero_grad(set_to_none=True)
    diff = max((a - b).abs().max().item() for a, b in zip(ours_model.parameters(), their_model.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(trained, initial))
    ratios = [a / b for a, b in zip(times["ours"][1:], times["theirs"][1:])]
    numel = sum(p.numel() for p in trained)
    result = {
        "model": loaded.source, "device": args.device, "threads": args.threads, "rank": args.rank,
        "layers": args.layers or len(transformer_layers(ours_model)[1]),
        "steps": args.steps, "trained_parameters": numel,
        "svd_step_s": {"ours": round(times["ours"][0], 3), "theirs": round(times["theirs"][0], 3),
                       "ratio": round(times["ours"][0] / times["theirs"][0], 3)},
        "step_s_median": {"ours": round(statistics.median(times["ours"][1:]), 4),
                          "theirs": round(statistics.median(times["theirs"][1:]), 4),
                          "ratio": round(statistics.median(ratios), 3)},
        "state_bytes": {"ours": ours.state_bytes(), "theirs": their_state_bytes(theirs),
                        "adamw": 2 * numel * 4},
        "max_param_diff": diff,
        "max_param_change": moved,
    }
    result["state_bytes"]["ours_over_theirs"] = round(result["state_bytes"]["ours"] / result["state_bytes"]["theirs"], 4)
    result["state_bytes"]["ours_over_adamw"] = round(result["state_bytes"]["ours"] / result["state_bytes"]["adamw"], 4)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
