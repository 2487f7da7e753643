"""COAP: Memory-Efficient Training with Correlation-Aware Gradient Projection (Xiao et al., CVPR 2025).

Adam in a rank-r subspace of each weight's gradient, like GaLore (`lowrank.ProjectedAdamW`), but the
projector P is kept correlated with the optimizer's history instead of being replaced by a fresh SVD:

- start (step 0): P from a randomized SVD of G (Ω: n x r Gaussian from `seed`; Y = G Ω, Q = qr(Y),
  B = Qᵀ G, P = top-r right singular vectors of B); left-side matrices use Gᵀ.
- every `update_interval` steps (eq. 5): one SGD step (learning rate `proj_lr`, gradient norm clipped to
  1) on the correlation-aware loss
      L(P) = MSE(G Pᵀ P, G) · (1 − mean_rows cos(M P, G))        (right side; left: P Pᵀ G and P M),
  the reconstruction error of the gradient weighted by how badly the projected first moment M, taken
  back to full size, points along the gradient;
- every `update_interval · reproject_factor` steps (eq. 6): a randomized SVD of G warm-started with
  Ω = Pᵀ (the previous subspace) replaces the SGD step.

With `restore_state` the moments are carried into the new subspace: M ← (M P_old) P_newᵀ and
V ← ((√V P_old) P_newᵀ)² (the reference implementation's option; off by default there for LLaMA).
The rank is `rank`, or min(m, n) // `rank_ratio` when that is set. State per m x n matrix:
2·m·r + r·n numbers (right side) instead of 2·m·n.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from loraplex.training.recipes import register
from loraplex.training.recipes.full import derive_seed, positive_int
from loraplex.training.recipes.lowrank import ProjectedAdamW, ProjectionRecipe, project_back


def randomized_range(matrix: torch.Tensor, rank: int, omega: torch.Tensor) -> torch.Tensor:
    """Top-`rank` right singular vectors (rank x n) of `matrix` (m x n) by one randomized-SVD pass
    with the sketch `omega` (n x rank): Q = qr(matrix Ω), then the SVD of Qᵀ matrix."""
    q, _ = torch.linalg.qr(matrix @ omega, mode="reduced")
    _, _, vh = torch.linalg.svd(q.t() @ matrix, full_matrices=False)
    return vh[:rank]


def correlation_loss(projector: torch.Tensor, moment: torch.Tensor, grad: torch.Tensor, side: str) -> torch.Tensor:
    """COAP's eq. 5: MSE(reconstructed G, G) · (1 − mean row cosine(M taken back, G))."""
    if side == "right":
        recon, moment_full = grad @ projector.t() @ projector, moment @ projector
    else:
        recon, moment_full = projector @ projector.t() @ grad, projector @ moment
    return F.mse_loss(recon, grad) * (1 - F.cosine_similarity(moment_full, grad, dim=1).mean())


class CoapAdamW(ProjectedAdamW):
    """AdamW with COAP projection for groups that set `rank` (and `update_interval`, `reproject_factor`,
    `proj_lr`, `scale`, `restore_state`, `rank_ratio`, `seed`); other groups are plain AdamW."""

    def __init__(self, params, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            if "rank" in group:
                for key, default in (("update_interval", 32), ("reproject_factor", 5)):
                    positive_int("coap", key, group.setdefault(key, default))
                group.setdefault("proj_lr", 0.1)
                group.setdefault("restore_state", False)
                group.setdefault("rank_ratio", None)
                group.setdefault("seed", 0)
        self._index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _rank(self, grad: torch.Tensor, group: dict[str, Any]) -> int:
        if group["rank_ratio"]:
            return max(int(min(grad.shape) // group["rank_ratio"]), 1)
        return min(group["rank"], min(grad.shape))

    def _svd_projector(self, p, grad, group, side, warm: torch.Tensor | None) -> torch.Tensor:
        """Projector from a randomized SVD; right side: rank x n; left side: m x rank."""
        matrix = grad.float() if side == "right" else grad.float().t()
        rank = self._rank(grad, group)
        if warm is None:
            gen = torch.Generator(device="cpu").manual_seed(derive_seed(group["seed"], self._index[id(p)]))
            omega = torch.randn(matrix.shape[1], rank, generator=gen).to(matrix.device)
        else:  # warm start from the previous subspace
            omega = (warm.t() if side == "right" else warm).float()
        vh = randomized_range(matrix, rank, omega)
        return (vh if side == "right" else vh.t()).to(grad.dtype)

    def refresh_projector(self, p, grad, state, group, side) -> None:
        step = state["step"]
        if "projector" not in state:
            state["projector"] = self._svd_projector(p, grad, group, side, None)
            return
        if step % group["update_interval"] != 0:
            return
        old = state["projector"]
        if group["restore_state"]:  # the moments at full size, to be re-projected below
            m_full = project_back(state["exp_avg"], old, side)
            v_full = project_back(state["exp_avg_sq"].sqrt(), old, side)
        if step % (group["update_interval"] * group["reproject_factor"]) == 0:
            new = self._svd_projector(p, grad, group, side, old)
        else:
            new = self._sgd_update(old, state["exp_avg"], grad, side, group["proj_lr"])
        state["projector"] = new
        if group["restore_state"]:
            low = (lambda t: t @ new.t()) if side == "right" else (lambda t: new.t() @ t)
            state["exp_avg"] = low(m_full)
            state["exp_avg_sq"] = low(v_full) ** 2

    @staticmethod
    def _sgd_update(projector, moment, grad, side, lr) -> torch.Tensor:
        """One clipped SGD step on `correlation_loss` with respect to the projector."""
        with torch.enable_grad():
            leaf = projector.detach().clone().requires_grad_(True)
            correlation_loss(leaf, moment.detach(), grad.detach(), side).backward()
        g = leaf.grad
        g = g * (1.0 / (g.norm() + 1e-6)).clamp(max=1.0)  # clip the gradient norm to 1 (as clip_grad_norm_)
        return (leaf.detach() - lr * g).to(projector.dtype)


@register
class Coap(ProjectionRecipe):
    name = "coap"
    options = {"rank": 16, "rank_ratio": None, "update_interval": 32, "reproject_factor": 5, "proj_lr": 0.1,
               "scale": 1.0, "restore_state": False, "seed": 0, "train_rest": False}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.check()
        for key in ("update_interval", "reproject_factor"):
            positive_int(self.name, key, self.opts[key])
        ratio = self.opts["rank_ratio"]
        if ratio is not None and not (isinstance(ratio, (int, float)) and ratio >= 1):
            raise ValueError(f"recipe 'coap': option rank_ratio must be a number >= 1 (rank = min(m, n) // "
                             f"rank_ratio) or None, got {ratio!r}")

    def build_optimizer(self, model, cfg) -> CoapAdamW:
        extra = {k: self.opts[k] for k in ("rank", "rank_ratio", "update_interval", "reproject_factor", "proj_lr",
                                           "restore_state", "seed")}
        extra["scale"] = float(self.opts["scale"])
        return CoapAdamW(self.groups(model, extra), lr=cfg.lr, weight_decay=cfg.weight_decay)
