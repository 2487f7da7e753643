"""Shared pieces of the restart and dynamic-rank recipe tests (test_recipe_*.py).

A tiny net (a Linear and a GPT-2 Conv1D, both adapted), a hand-driven training loop that calls a
recipe's hooks in the order `loraplex.training.loop.train` does, and a small `TrainConfig` on the
tiny Llama for end-to-end loop tests.
"""

from __future__ import annotations

import types

import torch
from conftest import randomize
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraplex.training.loop import TrainConfig


class Net(nn.Module):
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 12), adapted, then a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 8)
        self.gpt2 = Conv1D(12, 8)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.gpt2(torch.tanh(self.lin(x)))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return randomize(Net()).eval()


def data(seed: int = 2, rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 10, generator=g), torch.randn(rows, 5, generator=g)


def base_weight(layer) -> torch.Tensor:
    """The base weight in (out, in) layout, float64."""
    w = layer.base_layer.weight.detach().double()
    return w.t() if isinstance(layer.base_layer, Conv1D) else w


def hook_cfg(lr: float = 0.05) -> types.SimpleNamespace:
    return types.SimpleNamespace(lr=lr, weight_decay=0.0, steps=100)


def mse(model, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def hook_step(model, recipe, optimizer, step: int, x, y, loss_fn=mse) -> dict:
    """One step as the training loop runs it (without clipping and schedule)."""
    loss = loss_fn(model, x, y)
    loss.backward()
    recipe.after_backward(model, step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return recipe.after_step(model, optimizer, step) or {}


def small_config(tmp_path, name: str = "run", **overrides) -> TrainConfig:
    values = dict(data="dates", steps=6, batch_size=4, train_samples=24, eval_samples=2, max_length=512,
                  r=4, alpha=8, lr=1e-2, warmup_steps=1, checkpoint_every=2, output=str(tmp_path / name),
                  base_eval=False, eval_batch_size=2, targets=["q_proj", "v_proj", "up_proj"])
    values.update(overrides)
    return TrainConfig(**values)


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")
