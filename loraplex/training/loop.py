"""The training recipe behind `loraplex train`, top to bottom, in plain PyTorch.

1. load the model and data, 2. score the base model, 3. attach the adapter, 4. train (loss on the
completion tokens only, output head computed only at those positions), checkpointing as we go,
5. score the adapter and write the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loraplex.core.config import LoraConfig
from loraplex.core.io import atomic_write_files
from loraplex.core.model import attach
from loraplex.training import unpadded
from loraplex.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.full import FullParameterModel

log = logging.getLogger("loraplex")
ADAPTER_NAME = "default"


@dataclass
class TrainConfig:
    """Everything `loraplex train` needs; YAML files and flags fill these fields by name."""

    model: str | None = None          # None = the embedded SmolLM2-135M-Instruct
    data: str = "dates"               # a built-in task name or a JSONL/CSV file
    method: str = "lora"
    recipe: str | None = None
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: Any = "all-linear"
    rslora: bool = False
    dora: bool = False
    init: str = "kaiming"
    method_options: dict[str, Any] = field(default_factory=dict)
    recipe_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 60
    epochs: float | None = None       # when set, overrides `steps`
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 5
    schedule: str = "cosine"          # cosine | linear | constant
    max_grad_norm: float = 1.0
    train_samples: int = 2000
    eval_samples: int = 100
    eval_every: int = 0               # 0 = only before and after training
    eval_batch_size: int = 50
    max_length: int = 256
    checkpoint_every: int = 20
    calibration_batches: int = 4      # for data-driven initialisations (PiSSA, EVA, LoRA-GA, ...)
    output: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    bf16: bool = False
    skip_bad_lines: bool = False
    base_eval: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.schedule not in ("cosine", "linear", "constant"):
            problems.append(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        for name in ("steps", "batch_size", "grad_accum", "train_samples", "eval_samples", "max_length",
                     "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr!r}")
        if self.epochs is not None and not self.epochs > 0:
            problems.append(f"epochs must be > 0, got {self.epochs!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def lora_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                          method=self.method, rslora=self.rslora, dora=self.dora, init=self.init,
                          options=dict(self.method_options))


class TrainingInterrupted(RuntimeError):
    """Raised after Ctrl-C / SIGTERM once the checkpoint is safely written."""


# --- the loss ---
def completion_loss(hf_model, batch: dict[str, torch.Tensor], chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over supervised tokens; the output head runs only at those positions, and
    the body only on real tokens where it can (`unpadded`: right-padded batches of transformers models)."""
    body = getattr(hf_model, hf_model.base_model_prefix)
    head = hf_model.get_output_embeddings()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    real = unpadded.hidden_states(hf_model, body, batch)
    if real is None:
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        states = hidden[:, :-1][mask]
    else:
        hidden, layout = real
        states = hidden.index_select(0, layout.rows_at(F.pad(mask, (0, 1))))   # the same positions, in order
    targets = targets[mask]
    n = targets.numel()
    if n == 0:
        raise ValueError("a batch has no supervised tokens (every completion is empty or truncated away)")
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):  # chunks bound the (tokens x vocab) logits held at once
        logits = head(states[i:i + chunk]).float()
        total = total + F.cross_entropy(logits, targets[i:i + chunk], reduction="sum")
    return total / n, n


def lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return fn


# --- helpers ---
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_output(cfg: TrainConfig) -> Path:
    out = Path(cfg.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write to output folder {out}: {err.strerror or err}. "
                      "Pass --output with a writable folder.") from None
    has_checkpoint = find_checkpoint(out) is not None
    if cfg.resume and not has_checkpoint:
        raise FileNotFoundError(f"--resume: {out} holds no checkpoint to resume from")
    if not cfg.resume and not cfg.overwrite and (has_checkpoint or (out / "report.json").exists()):
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start "
                              "over, or another --output")
    if cfg.overwrite and not cfg.resume:
        for name in ("report.json", "report.md", "train_log.jsonl", "loss.png"):
            (out / name).unlink(missing_ok=True)
        import shutil

        for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "adapter", "weights"):
            shutil.rmtree(out / name, ignore_errors=True)
    return out


@contextlib.contextmanager
def _clear_write_errors(out: Path):
    """A full disk or a folder that became unwritable: say so, and what is still safe to resume from."""
    try:
        yield
    except OSError as err:
        raise OSError(f"cannot write the results to {out}: {err.strerror or err}. Nothing was passed off as a "
                      f"result (no report.json); free some space and finish with --resume --output {out}") from err


class _StopFlag:
    """Turns the first Ctrl-C / SIGTERM into a request to checkpoint and stop; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested (signal %d): writing a checkpoint after this step", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def plot_loss(log_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log_rows if "loss" in r]
    losses = [r["loss"] for r in log_rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=1.2, label="train loss")
    evals = [r for r in log_rows if "eval_exact_match" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval_exact_match"] for r in evals], "o-", color="tab:orange",
                 label="held-out exact match (%)")
        ax2.set_ylabel("exact match (%)")
        ax2.set_ylim(0, 100)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_yscale("log")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# --- the recipe ---
def train(cfg: TrainConfig, *, loaded=None, stop_after: int | None = None) -> dict[str, Any]:
    """Run a training job; returns the report. `loaded` injects a model (tests); `stop_after` simulates
    a stop request after that many steps."""
    from loraplex.data import load_data
    from loraplex.data.tokenize import collate, encode_all, length_bucketed_batches
    from loraplex.models import load_model
    from loraplex.training.evaluate import exact_match_score

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = prepare_output(cfg)
    seed_everything(cfg.seed)
    if loaded is None:
        loaded = load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer

    # 1. data
    train_examples = load_data(cfg.data, "train", cfg.train_samples, cfg.seed, skip_bad_lines=cfg.skip_bad_lines)
    test_examples = load_data(cfg.data, "test", cfg.eval_samples, cfg.seed, skip_bad_lines=cfg.skip_bad_lines)
    if not test_examples:
        raise ValueError(f"{cfg.data}: the held-out split is empty; give more (distinct) examples")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    max_length = min(cfg.max_length, context) if context else cfg.max_length
    if max_length < cfg.max_length:
        log.info("max_length %d exceeds the model's context of %d tokens; using %d", cfg.max_length, context, context)
    encoded = encode_all(tokenizer, train_examples, max_length)
    lengths = [len(e.input_ids) for e in encoded]
    batches_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total_steps = (math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum) if cfg.epochs else cfg.steps)
    log.info("data %s: %d training examples (%d-%d tokens), %d held out; %d steps of %d x %d",
             cfg.data, len(encoded), min(lengths), max(lengths), len(test_examples), total_steps,
             cfg.batch_size, cfg.grad_accum)

    def micro_batch(index: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(index, batches_per_epoch)
        order = length_bucketed_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        return collate([encoded[i] for i in order[position]], tokenizer.pad_token_id)

    checkpoint = find_checkpoint(out) if cfg.resume else None
    progress: dict[str, Any] = {}
    if checkpoint is not None:
        progress = json.loads((checkpoint / "state.json").read_text())["progress"]

    # 2. the base model's score
    base_score = progress.get("base_score")
    if base_score is None and cfg.base_eval:
        log.info("scoring the base model on %d held-out examples", len(test_examples))
        base_score = exact_match_score(model, tokenizer, test_examples, batch_size=cfg.eval_batch_size)["exact_match"]
        log.info("base model exact match: %.1f%%", base_score)

    # 3. the recipe and the adapter (restored from the checkpoint when resuming)
    recipe = make_recipe(cfg.recipe, cfg.recipe_options)
    recipe.total_steps = total_steps  # schedules (AFLoRA's freezing, ...) need the run's length
    if not recipe.trains_adapter:  # full-parameter recipes train the base weights themselves
        model = FullParameterModel(model, recipe.full_parameters(model))
        if checkpoint is not None:
            model.load(checkpoint / "adapter")
    elif checkpoint is not None:
        from loraplex.core.io import load

        model = load(model, checkpoint / "adapter", name=ADAPTER_NAME)
    else:
        from loraplex.methods import get

        adapter_config = recipe.adapter_config(cfg.lora_config())
        calibration = None
        if hasattr(get(adapter_config.method), "calibrate"):  # data-driven inits see a few training batches
            calibration = [micro_batch(i) for i in range(min(cfg.calibration_batches, batches_per_epoch))]
            t0 = time.perf_counter()
        model = attach(model, adapter_config, ADAPTER_NAME, calibration_data=calibration)
        if calibration is not None:
            log.info("%s initialisation from %d calibration batches took %.1f s", adapter_config.method,
                     len(calibration), time.perf_counter() - t0)
    recipe.setup(model, cfg)
    trainable = model.trainable_parameters()
    n_trainable = sum(p.numel() for p in trainable)
    log.info("%s (r=%d) on %d layers%s: %s trainable parameters", cfg.method, cfg.r,
             len(model.adapted_layers(ADAPTER_NAME)), f", recipe {cfg.recipe}" if cfg.recipe else "",
             f"{n_trainable:,}")
    optimizer = recipe.make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, cfg.warmup_steps, total_steps))
    start_step, train_seconds, rows = 0, 0.0, []
    if checkpoint is not None:
        progress = load_checkpoint(checkpoint, optimizer, scheduler, recipe)
        start_step, train_seconds = progress["step"], progress["train_seconds"]
        log.info("resumed from %s at step %d", checkpoint, start_step)
    log_path = out / "train_log.jsonl"
    if start_step > 0 and log_path.exists():
        rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("step", 0) <= start_step]
    log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # 4. train
    def progress_state(step: int) -> dict[str, Any]:
        return {"step": step, "train_seconds": train_seconds, "base_score": base_score, "total_steps": total_steps}

    model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    with _StopFlag() as stop, log_path.open("a") as log_file:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            loss_sum, tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = micro_batch(step * cfg.grad_accum + micro)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, _ = recipe.loss(model, batch, step)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                tokens += int(batch["attention_mask"].sum())
            recipe.after_backward(model, step)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            extra = recipe.after_step(model, optimizer, step) or {}
            dt = time.perf_counter() - t0
            train_seconds += dt
            row = {"step": step + 1, "loss": round(loss_sum, 5), "lr": scheduler.get_last_lr()[0],
                   "grad_norm": round(grad_norm, 4), "tokens": tokens, "tokens_per_s": round(tokens / dt, 1),
                   "elapsed_s": round(train_seconds, 2), **extra}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total_steps:
                row["eval_exact_match"] = exact_match_score(model, tokenizer, test_examples,
                                                            batch_size=cfg.eval_batch_size)["exact_match"]
                model.train()
            rows.append(row)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if stop_after is not None and step + 1 == stop_after:
                stop.requested = True
            done = step + 1
            if stop.requested or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total_steps):
                with _clear_write_errors(out):
                    save_checkpoint(out, model, ADAPTER_NAME, optimizer, scheduler, progress_state(done), recipe)
                if stop.requested:
                    bar.close()
                    raise TrainingInterrupted(f"stopped at step {done}/{total_steps}; checkpoint in "
                                              f"{out / 'checkpoint'}. Continue with --resume --output {out}")
    bar.close()

    # 5. results (the report is written last: a run cut short never leaves one behind)
    result_dir = out / ("adapter" if recipe.trains_adapter else "weights")
    with _clear_write_errors(out):
        # the checkpoint holds the state before `finalize` (which may reshape the adapter), so a resume of
        # a finished run pairs the optimizer with the parameters it was built for
        save_checkpoint(out, model, ADAPTER_NAME, optimizer, scheduler, progress_state(total_steps), recipe)
        recipe.finalize(model)
        model.save(result_dir, name=ADAPTER_NAME)
    log.info("scoring the adapter on %d held-out examples", len(test_examples))
    scored = exact_match_score(model, tokenizer, test_examples, batch_size=cfg.eval_batch_size)
    report = {
        "metric": "exact_match",
        "base_score": base_score,
        "adapter_score": scored["exact_match"],
        "gain": None if base_score is None else scored["exact_match"] - base_score,
        "train_seconds": round(train_seconds, 2),
        "steps": total_steps,
        "trainable_parameters": n_trainable,
        "final_loss": rows[-1]["loss"] if rows else None,
        "tokens_per_s": round(sum(r["tokens"] for r in rows) / max(train_seconds, 1e-9), 1),
        "model": loaded.source,
        "data": cfg.data,
        "method": cfg.method,
        "recipe": cfg.recipe,
        "eval_examples": scored["n"],
        "samples": scored["samples"],
        "config": dataclasses.asdict(cfg),
        "adapter": str(result_dir),
    }
    with _clear_write_errors(out):
        plot_loss(rows, out / "loss.png")
        atomic_write_files({out / "report.md": render_report_md(report).encode(),
                            out / "report.json": json.dumps(report, indent=2).encode()})
    return report


def render_report_md(report: dict[str, Any]) -> str:
    base = "n/a" if report["base_score"] is None else f"{report['base_score']:.1f}%"
    lines = [
        f"# loraplex training report: {report['data']} with {report['method']}",
        "",
        f"- model: {report['model']}",
        f"- held-out exact match: base {base} -> adapter {report['adapter_score']:.1f}% "
        f"({report['eval_examples']} examples)",
        f"- steps: {report['steps']}, training time: {report['train_seconds']:.0f} s, "
        f"{report['tokens_per_s']:.0f} tokens/s",
        f"- trainable parameters: {report['trainable_parameters']:,}",
        f"- final loss: {report['final_loss']}",
        f"- adapter (PEFT format): `{report['adapter']}`",
        "",
        "![loss](loss.png)",
        "",
        "| prompt | reference | prediction |",
        "|---|---|---|",
    ]
    for s in report["samples"]:
        cells = [str(s[k]).replace("|", "\\|").replace("\n", " ") for k in ("prompt", "reference", "prediction")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
