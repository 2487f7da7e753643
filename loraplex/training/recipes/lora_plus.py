"""LoRA+: a larger learning rate for B than for A.

Hayou, Ghosh, Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models" (arXiv 2402.12354):
    η_B = λ · η_A,   λ = `lr_ratio` (the paper recommends λ ≈ 2^4 = 16, our default).
Param groups as PEFT's `create_loraplus_optimizer` builds them: A factors (and other matrices) at η,
B factors and every 1-D trainable parameter (biases, DoRA magnitudes) at λ·η, embedding-layer B factors
at `embedding_lr`. The schedule multiplies every group's rate by the same factor, so the ratio holds at
every step.
"""

from __future__ import annotations

from typing import Any

import torch

from loraplex.core.adapter import EMBEDDING
from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._factors import number


@register
class LoraPlus(Recipe):
    """LoRA+ (Hayou et al. 2024): B learns lr_ratio times faster than A."""

    name = "lora-plus"
    options = {"lr_ratio": 16.0, "embedding_lr": 1e-6}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.ratio = number(self.name, self.opts, "lr_ratio", low=0, low_open=True)
        self.embedding_lr = number(self.name, self.opts, "embedding_lr", low=0, low_open=True)

    def param_groups(self, model, cfg) -> list[dict[str, Any]]:
        embedding_b = set()
        for layer in model.adapted_layers().values():
            if layer.spec.kind == EMBEDDING:
                embedding_b.update(id(a.lora_B) for a in layer.adapters.values() if hasattr(a, "lora_B"))
        groups: dict[str, list[torch.nn.Parameter]] = {"A": [], "B": [], "embedding": []}
        for name, p in model.named_trainable_parameters().items():
            if id(p) in embedding_b:
                groups["embedding"].append(p)
            elif "lora_B" in name or p.ndim == 1:
                groups["B"].append(p)
            else:
                groups["A"].append(p)
        if not groups["B"]:
            raise ValueError("recipe 'lora-plus' found no B factor (lora_B) to give the larger learning rate; "
                             "use it with method 'lora' or another method with lora_A / lora_B factors")
        lrs = {"A": cfg.lr, "B": cfg.lr * self.ratio, "embedding": self.embedding_lr}
        return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]
