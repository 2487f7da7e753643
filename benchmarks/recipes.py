"""Training recipes against plain LoRA on the default task, at the same budget.

Each recipe (and plain LoRA) runs `loraplex.training.loop.train` in its own process (so the peak RSS
is its own) with the same model, data, seed, steps and learning rate. Reported per recipe:
  * steps to reach the target held-out exact match (evaluated every `--eval-every` steps),
  * the final held-out exact match,
  * peak memory (max RSS of the process) and median step time,
each also relative to plain LoRA.

    .venv/bin/python benchmarks/recipes.py                          # every recipe, SmolLM2-135M
    .venv/bin/python benchmarks/recipes.py --recipes lora-plus,lora-fa --steps 40
    .venv/bin/python benchmarks/recipes.py --tiny --steps 4         # smoke run on a tiny random model
    .venv/bin/python benchmarks/recipes.py --markdown docs/recipes.md

A name `recipe:policy` runs that policy of the adaptive-rank allocator (`all` includes each policy).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PLAIN = "plain"
# recipes measured once per policy ("adaptive-rank" alone is its default policy, ALoRA)
VARIANTS = {"adaptive-rank": ["adaptive-rank", "adaptive-rank:increlora", "adaptive-rank:prilora",
                              "adaptive-rank:dynamic-rank-dora"]}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from loraplex.training.loop import TrainConfig, train

    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny import tiny_loaded

        loaded = tiny_loaded()
    else:
        from loraplex.models import load_model

        loaded = load_model(args.model)
    recipe, _, policy = args.child.partition(":")            # "adaptive-rank:increlora": that policy
    recipe = None if recipe == PLAIN else recipe
    options = json.loads(args.options) if args.options else {}
    recipe_options = {**({"policy": policy} if policy else {}), **options.get(args.child, {})}
    cfg = TrainConfig(model=args.model, recipe=recipe, recipe_options=recipe_options, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, r=args.r, alpha=2.0 * args.r, eval_every=args.eval_every,
                      eval_samples=args.eval_samples, train_samples=args.train_samples, output=args.output,
                      overwrite=True, base_eval=False, checkpoint_every=0, seed=args.seed)
    report = train(cfg, loaded=loaded)
    rows = [json.loads(line) for line in (Path(args.output) / "train_log.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_exact_match"]) for r in rows if "eval_exact_match" in r]
    evals.append((report["steps"], report["adapter_score"]))
    times = [r["tokens"] / r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]  # each step's own time
    print(json.dumps({"final": report["adapter_score"], "evals": evals,
                      "step_s": statistics.median(times) if times else report["train_seconds"],
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "trainable": report["trainable_parameters"]}))


def run_child(name: str, args: argparse.Namespace, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--output", str(folder / name)]
    for key in ("steps", "batch_size", "lr", "r", "eval_every", "eval_samples", "train_samples", "seed", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.model:
        cmd += ["--model", args.model]
    if args.tiny:
        cmd.append("--tiny")
    if args.options:
        cmd += ["--options", args.options]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steps_to(evals: list, target: float) -> int | None:
    return next((step for step, score in evals if score >= target), None)


def table(results: dict[str, dict], target: float) -> list[str]:
    base = results.get(PLAIN, {})
    base_steps = steps_to(base.get("evals", []), target) if "evals" in base else None
    lines = [f"| recipe | steps to {target:g}% EM | final EM % | peak RSS MB (x plain) | step s (x plain) | "
             "trainable params |", "|---|---|---|---|---|---|"]

    def ratio(value, ref):
        return f" ({value / ref:.2f}x)" if ref else ""

    for name, res in results.items():
        if "error" in res:
            lines.append(f"| {name} | error: {res['error'][:80]} | | | | |")
            continue
        reached = steps_to(res["evals"], target)
        steps_cell = "not reached" if reached is None else str(reached)
        if reached is not None and base_steps:
            steps_cell += f" ({reached / base_steps:.2f}x)"
        final = f"{res['final']:.1f}" + (f" ({res['final'] - base['final']:+.1f})" if "final" in base else "")
        lines.append(f"| {name} | {steps_cell} | {final} | {res['rss_mb']:.0f}{ratio(res['rss_mb'], base.get('rss_mb'))} "
                     f"| {res['step_s']:.3f}{ratio(res['step_s'], base.get('step_s'))} | {res['trainable']:,} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="all", help="comma-separated recipe names, or 'all' (plain LoRA always runs)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=50)
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--target", type=float, default=50.0, help="held-out exact match (%%) to reach")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test of this script)")
    p.add_argument("--options", default="", help='JSON: {"recipe": {"option": value}}')
    p.add_argument("--markdown", default=None, help="write the table (with this command line) to this file")
    p.add_argument("--results", default=None,
                   help="JSON file of finished runs: read at start (those recipes are not run again) and rewritten "
                        "after each run, so an interrupted measurement continues where it stopped")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    from loraplex.training.recipes import available

    names = ([v for n in sorted(available()) for v in VARIANTS.get(n, [n])] if args.recipes == "all"
             else [n.strip() for n in args.recipes.split(",") if n.strip()])
    unknown = sorted({n.partition(":")[0] for n in names} - set(available()))
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; available: {', '.join(sorted(available()))}")
    results: dict[str, dict] = {}
    done = json.loads(Path(args.results).read_text()) if args.results and Path(args.results).exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [PLAIN, *names]:
            if name in done and "error" not in done[name]:
                print(f"{name}: kept from {args.results}", file=sys.stderr, flush=True)
                results[name] = done[name]
                continue
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_child(name, args, Path(tmp))
            if args.results:
                write_atomic(Path(args.results), json.dumps({**done, **results}, indent=1))
            if args.markdown:
                write_markdown(args, results)
    print("\n".join(table(results, args.target)))
    if args.markdown:
        write_markdown(args, results)
        print(f"wrote {args.markdown}", file=sys.stderr)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_markdown(args: argparse.Namespace, results: dict[str, dict]) -> None:
    lines = table(results, args.target)
    command = " ".join(["python", "benchmarks/recipes.py", *sys.argv[1:]])
    model = "tiny random Llama (smoke test)" if args.tiny else (args.model or "SmolLM2-135M-Instruct (embedded)")
    text = [
        "# Training recipes against plain LoRA", "",
        f"Default task, {model}; every run: {args.steps} steps of batch {args.batch_size}, lr {args.lr}, "
        f"LoRA r={args.r} alpha={2 * args.r} on all linear layers (the recipe's own adapter where it builds one), "
        f"seed {args.seed}, {args.threads} threads, held-out exact match on {args.eval_samples} examples every "
        f"{args.eval_every} steps. Peak memory is the max RSS of the run's own process; step time the median.", "",
        "Produced by:", "", "```", command, "```", "", *lines, "",
        "The exact-match columns are deterministic for the seed; step time and peak RSS swing with the machine's "
        "load (other jobs on a 2-core machine: about ±20 %). Short budgets favour recipes without schedules: "
        "those that anneal, freeze or select over a long run may not have finished. Rows `adaptive-rank:POLICY` "
        "are the rank allocator's policies (`adaptive-rank` alone is ALoRA). GaLore against `galore-torch`: "
        "`docs/benchmarks.md`.", "",
    ]
    write_atomic(Path(args.markdown), "\n".join(text))


if __name__ == "__main__":
    main()
