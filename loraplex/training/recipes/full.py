"""The base model trained directly, for full-parameter recipes (GaLore, Flora, COAP, LISA, BAdam)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loraplex.core.io import atomic_write_bytes, tensors_to_bytes


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
