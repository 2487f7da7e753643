"""Training checkpoints without pickle: adapter in PEFT format, optimizer/scheduler/RNG in safetensors + JSON.

A checkpoint is a folder written next to its final place and renamed into it, so a run killed while
writing one still has the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from loraplex.core.io import atomic_write_bytes, tensors_to_bytes

CHECKPOINT_DIR = "checkpoint"


def _split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested dict/list by references into `tensors` (JSON-able result)."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {"__dict__": [[_split_state(k, f"{prefix}.k{i}", tensors), _split_state(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(state.items())]}
    if isinstance(state, (list, tuple)):
        return {"__list__": [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)],
                "tuple": isinstance(state, tuple)}
    return state


def _join_state(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, dict) and "__tensor__" in state:
        return tensors[state["__tensor__"]]
    if isinstance(state, dict) and "__dict__" in state:
        return {_join_state(k, tensors): _join_state(v, tensors) for k, v in state["__dict__"]}
    if isinstance(state, dict) and "__list__" in state:
        items = [_join_state(v, tensors) for v in state["__list__"]]
        return tuple(items) if state.get("tuple") else items
    return state


def save_checkpoint(output: Path, model, adapter_name: str, optimizer, scheduler, progress: dict[str, Any],
                    recipe=None) -> Path:
    """Write `output/checkpoint` atomically (build `checkpoint.tmp`, then swap it in)."""
    final = output / CHECKPOINT_DIR
    tmp = output / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp / "adapter", name=adapter_name)
    tensors: dict[str, torch.Tensor] = {}
    meta = {
        "optimizer": _split_state(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": _split_state(scheduler.state_dict(), "scheduler", tensors),
        "python_random": _split_state(random.getstate(), "python_random", tensors),
        "progress": progress,
        "recipe": _split_state(recipe.state_dict() if recipe is not None else {}, "recipe", tensors),
    }
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write_bytes(tmp / "state.safetensors", tensors_to_bytes(tensors, {"format": "pt"}))
    atomic_write_bytes(tmp / "state.json", json.dumps(meta).encode())
    old = output / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint: `checkpoint`, or `checkpoint.old` if a swap was cut short."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        folder = output / name
        if (folder / "state.json").exists() and (folder / "state.safetensors").exists():
            return folder
    return None


def load_checkpoint(folder: Path, optimizer, scheduler, recipe=None) -> dict[str, Any]:
    """Restore optimizer, scheduler, recipe and RNG states; returns the saved progress dict."""
    tensors = load_file(folder / "state.safetensors")
    meta = json.loads((folder / "state.json").read_text())
    optimizer.load_state_dict(_join_state(meta["optimizer"], tensors))
    scheduler.load_state_dict(_join_state(meta["scheduler"], tensors))
    if recipe is not None and "recipe" in meta:
        recipe.load_state_dict(_join_state(meta["recipe"], tensors))
    state = _join_state(meta["python_random"], tensors)
    random.setstate((state[0], tuple(state[1]), state[2]))
    torch.set_rng_state(tensors["rng.torch"])
    return meta["progress"]
