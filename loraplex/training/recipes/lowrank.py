"""Shared pieces of the gradient-projection recipes (GaLore, COAP; Flora uses `projection_side`).

A matrix gradient G (m x n) is projected onto a rank-r subspace with an orthonormal projector P:
    right side (P: r x n):  R = G Pᵀ  (m x r),  back: N P  (m x n)
    left side  (P: m x r):  R = Pᵀ G  (r x n),  back: P N  (m x n)
Adam runs on R; its normalised update N = m̂ / (√v̂ + eps) is projected back and scaled by `scale`
(GaLore, Zhao et al. 2024, Algorithm 2). The side is chosen so the state is r x max(m, n): `std` puts
the projector on the smaller dimension.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from loraplex.training.recipes.full import (
    FullParameterModel,
    FullParameterRecipe,
    choice,
    embedding_and_head_ids,
    positive_int,
    tensor_bytes,
)

PROJ_TYPES = ("std", "reverse_std", "right", "left")


def projection_side(shape: torch.Size | tuple[int, ...], proj_type: str) -> str:
    """'right' or 'left' for a gradient of `shape` (GaLore's rule; `std`: right when m >= n)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("right", "left"):
        return proj_type
    raise ValueError(f"proj_type must be one of {', '.join(PROJ_TYPES)}, got {proj_type!r}")


def project(grad: torch.Tensor, projector: torch.Tensor, side: str) -> torch.Tensor:
    return grad @ projector.t() if side == "right" else projector.t() @ grad


def project_back(low: torch.Tensor, projector: torch.Tensor, side: str) -> torch.Tensor:
    return low @ projector if side == "right" else projector @ low


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay in the form of `galore-torch`'s AdamW (bias correction folded
    into the step size, `eps` added to √v, decay applied after the update); parameter groups that carry
    a `rank` key have their 2-D gradients projected (subclasses say how the projector is found and
    refreshed: `refresh_projector`).

    Per projected parameter the state is: `step` (int), `projector` (r x n or m x r), `exp_avg` and
    `exp_avg_sq` (the shape of the projected gradient) — about r x max(m, n) numbers per moment
    instead of m x n."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias})
        for group in self.param_groups:
            if "rank" in group:
                positive_int(type(self).__name__, "rank", group["rank"])
                projection_side((1, 1), group.setdefault("proj_type", "std"))
                group.setdefault("scale", 1.0)

    def refresh_projector(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                          side: str) -> None:
        """Set or update `state['projector']` before step `state['step']` (0-based) projects `grad`."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                state.setdefault("step", 0)
                projected = "rank" in group and grad.ndim == 2
                if projected:
                    side = projection_side(grad.shape, group["proj_type"])
                    self.refresh_projector(p, grad, state, group, side)
                    grad = project(grad, state["projector"], side)
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                update = exp_avg / denom
                if projected:
                    update = project_back(update, state["projector"], side) * group["scale"]
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0.0:  # decoupled decay, after the update (as galore-torch)
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

    def state_bytes(self) -> int:
        """Bytes of the optimizer's state tensors (moments and projectors)."""
        return tensor_bytes(list(self.state.values()))


class ProjectionRecipe(FullParameterRecipe):
    """Recipe base for GaLore / COAP / Flora: the 2-D matrices of the transformer body are projected;
    with `train_rest=True` the embeddings, output head and 1-D weights (norms, biases) are trained too,
    with unprojected state (as the GaLore paper's pre-training runs do)."""

    def full_parameters(self, hf_model: nn.Module) -> list[str]:
        if self.opts.get("train_rest"):
            return [n for n, _ in hf_model.named_parameters()]
        return super().full_parameters(hf_model)

    def split(self, model: FullParameterModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(projected matrices, the rest)."""
        skip = embedding_and_head_ids(model.model)
        projected, rest = [], []
        for _, p in model.named_trainable():
            (projected if p.ndim == 2 and id(p) not in skip else rest).append(p)
        return projected, rest

    def groups(self, model: FullParameterModel, extra: dict[str, Any]) -> list[dict[str, Any]]:
        projected, rest = self.split(model)
        if not projected:
            raise ValueError(f"recipe {self.name!r}: no 2-D weight matrix to project among the trained parameters")
        groups = [{"params": projected, **extra}]
        return groups + ([{"params": rest}] if rest else [])

    def check(self) -> None:
        positive_int(self.name, "rank", self.opts["rank"])
        if "proj_type" in self.opts:
            choice(self.name, "proj_type", self.opts["proj_type"], PROJ_TYPES)
