"""BAdam: A Memory Efficient Full Parameter Optimization Method for Large Language Models
(Luo, Yu, Li; NeurIPS 2024).

Block coordinate descent with Adam as the inner solver: the parameters are split into D blocks (one per
transformer layer; optionally the embeddings and the head/final norm as blocks of their own); in each
period of K = `interval` steps only block π_j is trained (K Adam steps on it, all others frozen), then
the next block takes over (`order`: ascending, descending, random — a fresh random permutation of the
blocks every D periods —, or fixed). The optimizer state is reset when the block changes, so only the
active block has Adam moments: about 2·(model size / D) numbers instead of 2·(model size).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraplex.training.recipes import register
from loraplex.training.recipes.full import (
    ActiveSetAdamW,
    FullParameterRecipe,
    choice,
    derive_seed,
    positive_int,
    transformer_layers,
)
from loraplex.training.recipes.lisa import decay_groups, layer_blocks

ORDERS = ("ascending", "descending", "random", "fixed")


class BlockAdamW(ActiveSetAdamW):
    """AdamW on one block at a time, the next block every `switch_every` steps."""

    def __init__(self, params, blocks, switch_every: int, order: str = "ascending", start: int | None = None,
                 seed: int = 0, **adamw: Any) -> None:
        choice("badam", "order", order, ORDERS)
        self.order, self.seed = order, seed
        self.start = (len(blocks) - 1 if order == "descending" else 0) if start is None else start
        if not 0 <= self.start < len(blocks):
            raise ValueError(f"BAdam: start block must be in 0..{len(blocks) - 1}, got {start}")
        super().__init__(params, blocks, [], switch_every, **adamw)

    def choose(self, period: int) -> list[int]:
        d = len(self.blocks)
        if self.order == "ascending":
            return [(self.start + period) % d]
        if self.order == "descending":
            return [(self.start - period) % d]
        if self.order == "fixed":
            return [self.start]
        epoch, position = divmod(period, d)  # random: a new permutation of all blocks every d periods
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "badam", epoch))
        return [int(torch.randperm(d, generator=gen)[position])]


@register
class BAdam(FullParameterRecipe):
    name = "badam"
    options = {"interval": 50, "order": "ascending", "start": None, "include_embedding": False,
               "include_head": False, "seed": 0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        positive_int(self.name, "interval", self.opts["interval"])
        choice(self.name, "order", self.opts["order"], ORDERS)

    def full_parameters(self, hf_model: nn.Module) -> list[str]:
        _, layers = transformer_layers(hf_model)
        in_layers = {id(p) for p in layers.parameters()}
        emb = {id(p) for p in hf_model.get_input_embeddings().parameters()}
        keep = set(in_layers)
        if self.opts["include_embedding"]:
            keep |= emb
        if self.opts["include_head"]:  # the output head (unless tied to the embeddings) and the final norm
            keep |= {id(p) for p in hf_model.parameters() if id(p) not in in_layers and id(p) not in emb}
        return [n for n, p in hf_model.named_parameters() if id(p) in keep]

    def build_optimizer(self, model, cfg) -> BlockAdamW:
        blocks, rest = layer_blocks(model.model, model.named_trainable())
        emb = {id(p) for p in model.model.get_input_embeddings().parameters()}
        if self.opts["include_embedding"]:
            blocks.append([p for p in rest if id(p) in emb])
        head = [p for p in rest if id(p) not in emb]
        if head:
            blocks.append(head)
        blocks = [b for b in blocks if b]
        params = [p for b in blocks for p in b]
        return BlockAdamW(decay_groups(params, cfg.weight_decay), blocks, self.opts["interval"], self.opts["order"],
                          self.opts["start"], seed=int(self.opts["seed"]), lr=cfg.lr, foreach=True)
