"""Training recipes: small objects whose hooks the training loop calls at fixed points.

A recipe changes *how* an adapter (or, for full-parameter recipes, the base model) is trained, never
what the loop looks like. The loop in `loraplex.training.loop` calls, in this order:

    config = recipe.adapter_config(config)         # before attaching (e.g. DyLoRA picks its method)
    recipe.setup(model, cfg)                        # after attaching or restoring the adapter
    optimizer = recipe.make_optimizer(model, cfg)   # default: AdamW over `param_groups`
    every step:
        loss, n = recipe.loss(model, batch, step)   # default: completion loss + methods' aux losses
        loss.backward()
        recipe.after_backward(model, step)          # gradient surgery (freezing, masking)
        clip, optimizer.step(), scheduler.step()
        fields = recipe.after_step(model, optimizer, step)  # proximal steps, restarts, rank changes
    recipe.finalize(model)                          # before the final save (fold chains, prune ranks)

Before `setup` the loop sets `recipe.total_steps` (the run's number of optimizer steps, for schedules).
`state_dict()` / `load_state_dict()` carry a recipe's own state through checkpoints (nested dicts and
lists of tensors and JSON values; no pickle). A recipe module defines one subclass and decorates it
with `@register`; `loraplex train --recipe NAME --recipe-option key=value` picks it.

Full-parameter recipes (GaLore, LISA, ...) set `trains_adapter = False`: the loop then trains the base
model's own weights through `FullParameterModel`, which saves the trained weights as safetensors.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import torch
from torch import nn

from loraplex.core.config import LoraConfig

_RECIPES: dict[str, type[Recipe]] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    if cls.name in _RECIPES and _RECIPES[cls.name] is not cls:
        raise ValueError(f"recipe {cls.name!r} registered twice")
    _RECIPES[cls.name] = cls
    return cls


def available() -> dict[str, type[Recipe]]:
    _import_all()
    return dict(_RECIPES)


def make_recipe(name: str | None, options: dict[str, Any] | None = None) -> Recipe:
    """The recipe called `name` (None: plain training) built with its options."""
    if name is None:
        return Recipe(**(options or {}))
    _import_all()
    try:
        cls = _RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(_RECIPES))}") from None
    return cls(**(options or {}))


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


class Recipe:
    """Plain training; subclasses override the hooks they need. Options arrive as keyword arguments;
    unknown ones are an error that lists the allowed names."""

    name = "plain"
    trains_adapter = True
    options: dict[str, Any] = {}  # allowed options and their defaults
    total_steps: int | None = None  # set by the loop before `setup`: the run's number of optimizer steps

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "none"
            raise ValueError(f"recipe {self.name!r}: unknown option(s) {', '.join(unknown)}; allowed: {allowed}")
        self.opts = {**self.options, **options}

    # --- before training ---
    def adapter_config(self, config: LoraConfig) -> LoraConfig:
        return config

    def full_parameters(self, hf_model: nn.Module) -> list[str]:
        """Full-parameter recipes: names of the base parameters to train (default: every matrix of
        the transformer body, not the embeddings or the output head)."""
        head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
        skip = {id(p) for m in (head, getattr(hf_model, "get_input_embeddings", lambda: None)()) if m is not None
                for p in m.parameters()}
        return [n for n, p in hf_model.named_parameters() if p.ndim == 2 and id(p) not in skip]

    def setup(self, model, cfg) -> None:
        """Called once the adapter is attached (fresh or restored from a checkpoint)."""

    def param_groups(self, model, cfg) -> list[dict[str, Any]]:
        return [{"params": model.trainable_parameters()}]

    def make_optimizer(self, model, cfg) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 foreach=True)

    # --- every step ---
    def loss(self, model, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, int]:
        from loraplex.training.loop import completion_loss

        loss, n = completion_loss(model.model, batch)
        aux = model_aux_loss(model)
        return (loss + aux if aux is not None else loss), n

    def after_backward(self, model, step: int) -> None:
        pass

    def after_step(self, model, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any] | None:
        return None

    # --- after training ---
    def finalize(self, model) -> None:
        pass

    # --- checkpoints ---
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def model_aux_loss(model) -> torch.Tensor | None:
    """Sum of the auxiliary losses of the model's adapters for the last forward pass (e.g. GOAT's and
    Conv-LoRA's router balance loss). A method opts in with a classmethod `aux_loss(model, name)`."""
    from loraplex.methods import get

    total = None
    for name, config in getattr(model, "configs", {}).items():
        fn = getattr(get(config.method), "aux_loss", None)
        value = fn(model, name) if fn is not None else None
        if isinstance(value, torch.Tensor):
            total = value if total is None else total + value
    return total
