"""GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection (Zhao et al., ICML 2024).

Full-parameter training whose Adam state lives in a rank-r subspace of each weight's gradient. For a
gradient G_t (m x n), every `update_proj_gap` steps (from step 0) the projector is refreshed from the SVD
G_t = U S Vᵀ: P = Vᵀ[:r] (right, when m >= n under `std`) or P = U[:, :r] (left). Then

    R_t = G_t Pᵀ  (or Pᵀ G_t),   M_t = β1 M + (1-β1) R_t,   V_t = β2 V + (1-β2) R_t²,
    W ← W − η √(1-β2ᵗ)/(1-β1ᵗ) · α · (M_t / (√V_t + ε)) P   (or α P (...)),   W ← W − η λ W,

with α = `scale`. The moments are not re-projected when P changes (as in the paper and `galore-torch`).
State per m x n matrix: 2·m·r + r·n numbers instead of 2·m·n. This optimizer reproduces
`galore_torch.GaLoreAdamW` step for step (tests/test_recipe_galore.py) and stores its projector in the
state dict, so a checkpoint resumes exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from loraplex.training.recipes import register
from loraplex.training.recipes.full import positive_int
from loraplex.training.recipes.lowrank import ProjectedAdamW, ProjectionRecipe


class GaLoreAdamW(ProjectedAdamW):
    """AdamW with GaLore projection for parameter groups that set `rank` (with `update_proj_gap`,
    `scale`, `proj_type` in std | reverse_std | right | left); other groups are plain AdamW."""

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            if "rank" in group:
                positive_int("galore", "update_proj_gap", group.setdefault("update_proj_gap", 200))

    def refresh_projector(self, p, grad, state, group, side) -> None:
        if "projector" in state and state["step"] % group["update_proj_gap"] != 0:
            return
        matrix = grad.float()  # the SVD runs in float32 whatever the training dtype
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        projector = vh[:group["rank"]] if side == "right" else u[:, :group["rank"]]
        state["projector"] = projector.to(grad.dtype)


@register
class GaLore(ProjectionRecipe):
    name = "galore"
    options = {"rank": 16, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "train_rest": False}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.check()
        positive_int(self.name, "update_proj_gap", self.opts["update_proj_gap"])

    def build_optimizer(self, model, cfg) -> GaLoreAdamW:
        o = self.opts
        extra = {"rank": o["rank"], "update_proj_gap": o["update_proj_gap"], "scale": float(o["scale"]),
                 "proj_type": o["proj_type"]}
        return GaLoreAdamW(self.groups(model, extra), lr=cfg.lr, weight_decay=cfg.weight_decay)
