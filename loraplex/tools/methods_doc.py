"""`docs/methods.md`, generated from the method registry, with measured numbers.

    python -m loraplex.tools.methods_doc                 # regenerate the page from the cached results
    python -m loraplex.tools.methods_doc --measure       # run the standard short run for every method first
    python -m loraplex.tools.methods_doc --measure vera pissa   # ... or for some

Per method the page gives its paper, trainable parameters on SmolLM2-135M at the default settings of
`loraplex train` (r=16, alpha=32, all linear layers), whether it merges, its serving form, and the
held-out exact match after the standard short run (`STANDARD_RUN`: the same as
`loraplex train --method NAME` with the flags in `standard_command`). Results are cached in
`docs/methods.json` next to the page, one entry per method, written after each run, so the page can be
regenerated without retraining and an interrupted measurement keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("loraplex")

# The standard short run: small enough for a CPU, long enough to move off the base model's score.
STANDARD_RUN: dict[str, Any] = {"data": "dates", "steps": 20, "batch_size": 8, "train_samples": 160,
                                "eval_samples": 50, "base_eval": False, "seed": 0}
DEFAULT_PAGE = Path("docs/methods.md")
SERVING_FORMS = {"low-rank": "plain low-rank", "low-rank after conversion": "low-rank after conversion",
                 "merged only": "merged only", "unmergeable": "unmerged only"}


def standard_command(method: str) -> str:
    flags = {"steps": "--steps", "batch_size": "--batch-size", "train_samples": "--train-samples",
             "eval_samples": "--eval-samples", "seed": "--seed"}
    parts = [f"loraplex train --method {method} --data {STANDARD_RUN['data']}"]
    parts += [f"{flag} {STANDARD_RUN[key]}" for key, flag in flags.items()]
    return " ".join(parts + ["--no-base-eval"])


def method_info(name: str, cls) -> dict[str, Any]:
    """What the registry says about a method: paper, mergeable, serving form."""
    paper = getattr(cls, "paper", "") or ""
    if not paper:
        doc = (sys.modules[cls.__module__].__doc__ or "").strip()
        paper = doc.split("\n\n")[0].replace("\n", " ")
    form = getattr(cls, "serving_form", "")
    mergeable = bool(getattr(cls, "mergeable", True)) and form != "unmergeable"
    return {"paper": paper, "mergeable": mergeable, "serving_form": SERVING_FORMS.get(form, form or "n/a")}


# --- measuring ---
def measure(names: list[str], results_path: Path, out_root: Path) -> dict[str, Any]:
    """The standard short run per method on one loaded SmolLM2 (a fresh copy each), results cached."""
    import torch

    from loraplex.models import load_model
    from loraplex.training.loop import TrainConfig, TrainingInterrupted, train

    results = load_results(results_path)
    loaded = load_model(None)
    for name in names:
        log.info("methods_doc: measuring %s", name)
        model = copy.deepcopy(loaded.model)              # a fresh base: residual methods rewrite weights
        run = dataclass_replace(loaded, model)
        cfg = TrainConfig(method=name, output=str(out_root / name), overwrite=True, **STANDARD_RUN)
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"command": standard_command(name), "run": dict(STANDARD_RUN)}
        try:
            try:
                report = train(cfg, loaded=run)
            except TrainingInterrupted:
                raise SystemExit(f"stopped while measuring {name}; the results so far are in {results_path}; "
                                 "continue with --measure --missing") from None
            entry |= {"exact_match": report["adapter_score"], "trainable_parameters": report["trainable_parameters"],
                      "final_loss": report["final_loss"], "train_seconds": report["train_seconds"]}
        except Exception as err:  # a method that cannot run here is recorded with its reason
            entry["error"] = f"{type(err).__name__}: {err}"
            log.warning("methods_doc: %s failed: %s", name, entry["error"])
        entry["wall_seconds"] = round(time.perf_counter() - t0, 1)
        entry["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results[name] = entry
        save_results(results_path, results)
        del model, run
        torch.manual_seed(0)
    return results


def dataclass_replace(loaded, model):
    import dataclasses

    return dataclasses.replace(loaded, model=model)


def count_parameters(names: list[str], results_path: Path) -> dict[str, Any]:
    """Trainable parameters on SmolLM2 at the default settings (attach only, no training)."""
    from loraplex.core.model import attach
    from loraplex.models import load_model
    from loraplex.training.loop import TrainConfig

    results = load_results(results_path)
    loaded = load_model(None)
    for name in names:
        model = copy.deepcopy(loaded.model)
        try:
            count = attach(model, TrainConfig(method=name).lora_config()).trainable_parameter_count()
            results.setdefault(name, {})["attached_parameters"] = count
        except Exception as err:
            results.setdefault(name, {})["attach_error"] = f"{type(err).__name__}: {err}"
        save_results(results_path, results)
    return results


def load_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {path} is not valid JSON ({err}); delete it to measure again") from None
    return data if isinstance(data, dict) else {}


def save_results(path: Path, results: dict[str, Any]) -> None:
    from loraplex.core.io import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(results, indent=2, sort_keys=True) + "\n").encode())


# --- the page ---
def render(results: dict[str, Any]) -> str:
    from loraplex.methods import available

    methods = available()
    lines = [
        "# Adapter methods",
        "",
        "Generated by `python -m loraplex.tools.methods_doc` from the method registry and the measured results",
        "in `docs/methods.json` (re-measure with `--measure [NAME ...]`; regenerating without it retrains nothing).",
        "",
        "- **Trainable parameters**: on SmolLM2-135M-Instruct at the defaults of `loraplex train` (r=16, alpha=32,",
        "  every linear layer of the body): from the measured run (after the initialisation; data-driven ones",
        "  see 4 batches), else from `--count` (attached without calibration data).",
        "- **Serving form**: *plain low-rank* — the adapter is a pair of factors B A as it is (served in mixed",
        "  batches like LoRA); *low-rank after conversion* — `save(..., as_lora=True)` writes it as a plain LoRA",
        "  for the unmodified base; *merged only* — the update is a full-rank weight change: merge it, or serve",
        "  it unmerged one adapter at a time; *unmerged only* — non-linear, kept as a separate module.",
        "- **Exact match**: held-out exact match (%) on the `dates` task after the standard short run:",
        f"  `{standard_command('NAME')}`",
        f"  ({STANDARD_RUN['steps']} steps of {STANDARD_RUN['batch_size']} examples, lr 2e-3 cosine, "
        f"{STANDARD_RUN['eval_samples']} held-out examples, seed {STANDARD_RUN['seed']}). 20 steps are a",
        "  smoke-level comparison on a CPU, not a tuned result.",
        "",
        "| method | paper | trainable params | mergeable | serving form | exact match (%) | final loss |",
        "|---|---|---:|:---:|---|---:|---:|",
    ]
    missing = []
    for name in sorted(methods):
        info = method_info(name, methods[name])
        r = results.get(name, {})
        params = r.get("trainable_parameters", r.get("attached_parameters"))
        if "exact_match" in r:
            score, loss = f"{r['exact_match']:.1f}", f"{r['final_loss']:.3f}"
        elif "error" in r:
            score, loss = "does not run: " + _short(r["error"]), "–"
        else:
            score, loss = "not measured", "–"
            missing.append(name)
        lines.append(f"| `{name}` | {info['paper']} | {'–' if params is None else f'{params:,}'} | "
                     f"{'yes' if info['mergeable'] else 'no'} | {info['serving_form']} | {score} | {loss} |")
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def _short(message: str, limit: int = 160) -> str:
    message = message.replace("|", "/").replace("\n", " ")
    return message if len(message) <= limit else message[: limit - 1] + "…"


def write_page(page: Path, results_path: Path) -> None:
    from loraplex.core.io import atomic_write_bytes

    page.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(page, render(load_results(results_path)).encode())


def main(argv: list[str] | None = None) -> int:
    from loraplex.methods import available

    parser = argparse.ArgumentParser(prog="python -m loraplex.tools.methods_doc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(DEFAULT_PAGE), help="the page to write (default docs/methods.md)")
    parser.add_argument("--results", default=None, help="cached results (default: methods.json next to the page)")
    parser.add_argument("--measure", nargs="*", metavar="METHOD", default=None,
                        help="run the standard short run for these methods (none given: all) before writing")
    parser.add_argument("--count", nargs="*", metavar="METHOD", default=None,
                        help="only attach and count trainable parameters (none given: all)")
    parser.add_argument("--missing", action="store_true",
                        help="with --measure: skip methods that already have a cached result")
    parser.add_argument("--runs", default="runs/methods", help="output folder of the measuring runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    page = Path(args.output)
    results_path = Path(args.results) if args.results else page.with_suffix(".json")
    known = sorted(available())
    for chosen in (args.measure, args.count):
        unknown = sorted(set(chosen or []) - set(known))
        if unknown:
            raise SystemExit(f"error: unknown method(s) {unknown}; available: {', '.join(known)}")
    if args.count is not None:
        count_parameters(args.count or known, results_path)
    if args.measure is not None:
        names = args.measure or known
        if args.missing:
            cached = load_results(results_path)
            names = [n for n in names if "exact_match" not in cached.get(n, {}) and "error" not in cached.get(n, {})]
        measure(names, results_path, Path(args.runs))
    write_page(page, results_path)
    print(f"wrote {page} ({results_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
