"""The base model trained directly, for full-parameter recipes (GaLore, Flora, COAP, LISA, BAdam).

Shared pieces of those recipes live here:

- `FullParameterModel`: the base model behind the interface the training loop expects of an adapter.
- `FullParameterRecipe`: the recipe base class (`trains_adapter = False`; logs `optimizer_state_bytes`).
- `tensor_bytes` / `transformer_layers` / `derive_seed`: state-memory accounting, finding the stack of
  transformer layers, and reproducible per-purpose seeds (so a resumed run draws the same random numbers).
- `ActiveSetAdamW`: AdamW over a changing subset of blocks (LISA's sampled layers, BAdam's block), whose
  optimizer state exists only for the active blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraplex.core.io import atomic_write_bytes, tensors_to_bytes
from loraplex.training.recipes import Recipe


class FullParameterModel(nn.Module):
    """The base model trained directly (full-parameter recipes): the same `model`, `save`,
    `trainable_parameters` and `adapted_layers` the loop uses on an `AdapterModel`.

    `save` writes the trainable weights as `model.safetensors` (only those, not the frozen rest), so a
    checkpoint of a 135M model stays the size of what was trained."""

    def __init__(self, model: nn.Module, trainable: list[str]) -> None:
        super().__init__()
        self.model = model
        self.trainable_names = list(trainable)
        named = dict(model.named_parameters())
        missing = [n for n in self.trainable_names if n not in named]
        if missing:
            raise ValueError(f"no such parameters: {missing[:5]}")
        for name, p in named.items():
            p.requires_grad_(name in set(self.trainable_names))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.trainable_names]

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        named = dict(self.model.named_parameters())
        return [(n, named[n]) for n in self.trainable_names]

    def adapted_layers(self, name: str | None = None) -> dict:
        return {}

    def save(self, path, name: str | None = None) -> None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        named = dict(self.model.named_parameters())
        tensors = {n: named[n].detach().contiguous() for n in self.trainable_names}
        atomic_write_bytes(folder / "model.safetensors", tensors_to_bytes(tensors, {"format": "pt"}))

    def load(self, path) -> FullParameterModel:
        from safetensors.torch import load_file

        tensors = load_file(Path(path) / "model.safetensors")
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in tensors.items():
                named[n].copy_(t)
        return self


# --------------------------------------------------------------------------- helpers
def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors inside a nested dict/list/tuple (an optimizer's `state`)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on `parts` (e.g. base seed, parameter index, period): random
    draws made from it are the same in an interrupted-and-resumed run as in an uninterrupted one."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def transformer_layers(hf_model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer layers: the longest `nn.ModuleList` whose children share one type
    (`model.layers` in Llama, `transformer.h` in GPT-2), with its qualified name."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in hf_model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1 \
                and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(hf_model).__name__} has no stack of transformer layers (an nn.ModuleList of "
                         "identical blocks); LISA and BAdam switch between such layers")
    return best


def embedding_and_head_ids(hf_model: nn.Module) -> set[int]:
    """ids of the input-embedding and output-head parameters (one id when they are tied)."""
    modules = [getattr(hf_model, "get_input_embeddings", lambda: None)(),
               getattr(hf_model, "get_output_embeddings", lambda: None)()]
    return {id(p) for m in modules if m is not None for p in m.parameters()}


def positive_int(recipe: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"recipe {recipe!r}: option {name} must be a positive integer, got {value!r}")
    return value


def choice(recipe: str, name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"recipe {recipe!r}: option {name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


# --------------------------------------------------------------------------- recipe base
class FullParameterRecipe(Recipe):
    """Base of the full-parameter recipes: the loop wraps the base model in `FullParameterModel`,
    trains `full_parameters(...)` with `make_optimizer(...)`, and logs the optimizer's state size."""

    trains_adapter = False
    optimizer: torch.optim.Optimizer | None = None

    def build_optimizer(self, model: FullParameterModel, cfg) -> torch.optim.Optimizer:
        raise NotImplementedError

    def make_optimizer(self, model, cfg) -> torch.optim.Optimizer:
        if not isinstance(model, FullParameterModel):
            raise TypeError(f"recipe {self.name!r} trains the base model's own weights; it needs a "
                            f"FullParameterModel, got {type(model).__name__}")
        self.optimizer = self.build_optimizer(model, cfg)
        return self.optimizer

    def after_step(self, model, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any] | None:
        return {"optimizer_state_bytes": optimizer.state_bytes()}


# --------------------------------------------------------------------------- active-set AdamW
class ActiveSetAdamW(torch.optim.AdamW):
    """AdamW that updates only the active blocks (plus `always`), switching blocks every
    `switch_every` steps. Inactive blocks are frozen (`requires_grad=False`: no gradient is computed
    for them) and their optimizer state is dropped when they leave the active set, so the state holds
    only the active blocks. Subclasses say which blocks the k-th period activates (`choose`).

    `state_dict()` carries the step and period counters and the active set, so a resumed run continues
    the same schedule."""

    def __init__(self, params, blocks: Sequence[Sequence[nn.Parameter]], always: Iterable[nn.Parameter],
                 switch_every: int, **adamw: Any) -> None:
        self.blocks = [list(b) for b in blocks]
        self.always_ids = {id(p) for p in always}
        self.switch_every = switch_every
        self.steps_done, self.period = 0, 0
        self.active: list[int] = []
        super().__init__(params, **adamw)
        self._activate(self.choose(0))

    def choose(self, period: int) -> list[int]:
        raise NotImplementedError

    def _activate(self, indices: Sequence[int]) -> None:
        bad = [i for i in indices if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"block indices {bad} out of range (0..{len(self.blocks) - 1})")
        self.active = sorted(int(i) for i in indices)
        on = {id(p) for i in self.active for p in self.blocks[i]} | self.always_ids
        for block in self.blocks:
            for p in block:
                p.requires_grad_(id(p) in on)
                if id(p) not in on:
                    p.grad = None
                    self.state.pop(p, None)  # a block leaving the active set frees its moments

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.steps_done += 1
        self._bytes_at_update = tensor_bytes(list(self.state.values()))
        if self.steps_done % self.switch_every == 0:
            self.period += 1
            self._activate(self.choose(self.period))
        return loss

    def state_bytes(self) -> int:
        """Bytes of the state tensors as of the last update (before a block switch that followed it
        dropped the leaving blocks' moments); before any step, the current state."""
        return getattr(self, "_bytes_at_update", None) or tensor_bytes(list(self.state.values()))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["active_set"] = {"steps_done": self.steps_done, "period": self.period, "active": list(self.active)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("active_set", None)
        if extra is None:
            raise ValueError("optimizer state has no 'active_set' entry: it was not saved by a LISA/BAdam optimizer")
        super().load_state_dict(state_dict)
        self.steps_done, self.period = int(extra["steps_done"]), int(extra["period"])
        self._activate(extra["active"])
