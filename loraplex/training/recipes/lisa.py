"""LISA: Layerwise Importance Sampling for Memory-Efficient LLM Fine-Tuning (Pan et al., NeurIPS 2024).

Full-parameter training in periods of K = `interval` steps (Algorithm 1). The embeddings, the output
head and everything outside the transformer layers (final norm) are always trained; at the start of
each period γ = `layers` of the N_L transformer layers are sampled uniformly without replacement
(p_ℓ = γ / N_L) and unfrozen, all other layers are frozen. AdamW runs over the active set; frozen layers
get no gradient and hold no optimizer state (a layer's moments are dropped when it is frozen again),
so the state is that of the embeddings, head and γ layers instead of the whole model.

The k-th period's layers are drawn from a generator seeded with (`seed`, k), so a resumed run samples
the same layers as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraplex.training.recipes import register
from loraplex.training.recipes.full import (
    ActiveSetAdamW,
    FullParameterRecipe,
    derive_seed,
    positive_int,
    transformer_layers,
)


class LisaAdamW(ActiveSetAdamW):
    """AdamW over `always` plus `gamma` layers sampled uniformly every `switch_every` steps."""

    def __init__(self, params, blocks, always, switch_every: int, gamma: int, seed: int = 0, **adamw: Any) -> None:
        if not 1 <= gamma <= len(blocks):
            raise ValueError(f"LISA: the number of active layers must be between 1 and the model's {len(blocks)} "
                             f"layers, got {gamma}")
        self.gamma, self.seed = gamma, seed
        super().__init__(params, blocks, always, switch_every, **adamw)

    def choose(self, period: int) -> list[int]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "lisa", period))
        return torch.randperm(len(self.blocks), generator=gen)[:self.gamma].tolist()


def layer_blocks(hf_model: nn.Module, trained: list[tuple[str, nn.Parameter]]) -> tuple[list[list[nn.Parameter]],
                                                                                          list[nn.Parameter]]:
    """Split the trained parameters into one block per transformer layer and the rest."""
    prefix, layers = transformer_layers(hf_model)
    in_layer = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    blocks: list[list[nn.Parameter]] = [[] for _ in layers]
    rest = []
    for _, p in trained:
        (blocks[in_layer[id(p)]] if id(p) in in_layer else rest).append(p)
    return blocks, rest


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms and biases), as BAdam and LISA's trainers do."""
    mats, vecs = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    return [g for g in ({"params": mats, "weight_decay": weight_decay}, {"params": vecs, "weight_decay": 0.0})
            if g["params"]]


@register
class Lisa(FullParameterRecipe):
    name = "lisa"
    options = {"layers": 2, "interval": 20, "seed": 0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        positive_int(self.name, "layers", self.opts["layers"])
        positive_int(self.name, "interval", self.opts["interval"])

    def full_parameters(self, hf_model: nn.Module) -> list[str]:
        return [n for n, _ in hf_model.named_parameters()]  # all of it; layers are switched on and off

    def build_optimizer(self, model, cfg) -> LisaAdamW:
        blocks, always = layer_blocks(model.model, model.named_trainable())
        params = [p for b in blocks for p in b] + always
        return LisaAdamW(decay_groups(params, cfg.weight_decay), blocks, always, self.opts["interval"],
                         self.opts["layers"], seed=int(self.opts["seed"]), lr=cfg.lr, foreach=True)
