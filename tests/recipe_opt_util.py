"""Shared pieces of the optimizer-side recipe tests: a tiny model with an adapter, a training batch
of the default task, and a short `train()` run driven through the real loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny import tiny_loaded

from loraplex.core.config import LoraConfig
from loraplex.core.model import attach
from loraplex.data import collate, encode, task_split
from loraplex.training.loop import TrainConfig, train

_LOADED = None


def loaded():
    """A fresh copy of the tiny Llama + char tokenizer (built once per process: building is slow)."""
    global _LOADED
    if _LOADED is None:
        _LOADED = tiny_loaded()
    return copy.deepcopy(_LOADED)


def batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    tok = loaded().tokenizer
    examples = task_split("dates", "train", n, seed)
    return collate([encode(tok, ex, 512) for ex in examples], tok.pad_token_id)


def adapted(recipe=None, seed: int = 0, **config):
    """The tiny model with a LoRA adapter (after the recipe's `adapter_config`, as the loop does)."""
    values = dict(r=4, alpha=8.0, init="random")
    values.update(config)
    cfg = LoraConfig(**values)
    if recipe is not None:
        cfg = recipe.adapter_config(cfg)
    torch.manual_seed(seed)
    return attach(loaded().model, cfg)


def train_config(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    values = dict(data="dates", steps=4, batch_size=4, train_samples=16, eval_samples=2, max_length=512,
                  r=4, alpha=8, lr=1e-2, warmup_steps=1, checkpoint_every=2, output=str(tmp_path / name),
                  base_eval=False, eval_batch_size=2)
    values.update(overrides)
    return TrainConfig(**values)


def run(tmp_path: Path, name: str = "run", stop_after: int | None = None, **overrides) -> dict:
    return train(train_config(tmp_path, name, **overrides), loaded=loaded(), stop_after=stop_after)


def saved_adapter(tmp_path: Path, name: str = "run") -> dict[str, torch.Tensor]:
    return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


def log_rows(tmp_path: Path, name: str = "run") -> list[dict]:
    return [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]


def initial_adapter(tmp_path: Path, **overrides) -> dict[str, torch.Tensor]:
    """The adapter a run starts from: a zero-learning-rate run of one step writes it unchanged."""
    overrides = {**overrides, "steps": 1, "lr": 1e-30, "warmup_steps": 0}
    run(tmp_path, "init", **overrides)
    return saved_adapter(tmp_path, "init")
