"""Flora: Low-Rank Adapters Are Secretly Gradient Compressors (Hao, Cao, Mou; ICML 2024).

Full-parameter training whose momentum and gradient-accumulation buffers are kept compressed by random
projections that are resampled, so the compression error does not stay in one fixed subspace (what
caps LoRA's total update at rank r). For a matrix (m x n) the projection is Gaussian with entries
N(0, 1/r), drawn from a seed (so it is never stored), on the smaller side:

    m < n:  P (r x m),  down(X) = P X  (r x n),  up(C) = Pᵀ C
    m >= n: P (n x r),  down(X) = X P  (m x r),  up(C) = C Pᵀ        (E[up(down(X))] = X)

The base optimizer is Adafactor (as in the paper's code): factored second moment
R_t = β2ₜ R + (1-β2ₜ) mean_cols(G² + ε₁), C_t likewise over rows, β2ₜ = 1 − t^decay_rate,
U_t = G / √(R_t C_t / mean(R_t)). Flora's compressed momentum replaces the m x n first moment:

    update = (1-β1) U_t + β1 up_k(c)                  (the momentum, decompressed)
    every κ steps: c ← down_{k+1}(up_k(c)), k ← k+1  (move the momentum to a fresh projection)
    c ← β1 c + (1-β1) down_k(U_t)

then the update is clipped to RMS `clip_threshold`, scaled by lr (× max(ε₂, RMS(W)) with
`scale_parameter`) and applied with decoupled weight decay. Compression applies to 2-D weights with
r <= min(m, n) and aspect ratio <= 4 (not to embeddings). State per matrix: r·max(m, n) + m + n numbers
instead of Adam's 2·m·n.

Gradient accumulation (`compress_accumulation`): after each micro-batch's backward a hook replaces the
gradient by its down-projection added to a compressed buffer; before the step the buffer is
decompressed into `.grad` with the same projection (a new seed every optimizer step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from loraplex.training.recipes import register
from loraplex.training.recipes.full import derive_seed, positive_int, tensor_bytes
from loraplex.training.recipes.lowrank import ProjectionRecipe


def flora_projection(seed: int, shape: tuple[int, int], rank: int, dtype=torch.float32,
                     device=None) -> torch.Tensor:
    """The Gaussian projection for a matrix of `shape`: (rank x m) when m < n, else (n x rank); entries
    N(0, 1/rank) from `torch.Generator().manual_seed(seed)` (CPU, float32), cast to `dtype`."""
    m, n = shape
    size = (rank, m) if m < n else (n, rank)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(size, generator=gen) / math.sqrt(rank)).to(device=device, dtype=dtype)


def down(proj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return proj @ x if x.shape[0] < x.shape[1] else x @ proj


def up(proj: torch.Tensor, c: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return proj.t() @ c if shape[0] < shape[1] else c @ proj.t()


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


class Flora(torch.optim.Optimizer):
    """Adafactor with Flora's compressed, periodically resampled momentum (see the module docstring)."""

    def __init__(self, params, lr: float, rank: int = 8, kappa: int = 1000, beta1: float = 0.9,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 weight_decay: float = 0.0, scale_parameter: bool = True, factorize_second_moment: bool = True,
                 seed: int = 0) -> None:
        if not lr > 0:
            raise ValueError(f"Flora: lr must be > 0, got {lr!r}")
        positive_int("flora", "rank", rank)
        positive_int("flora", "kappa", kappa)
        if not 0 <= beta1 < 1:
            raise ValueError(f"Flora: beta1 must lie in [0, 1), got {beta1!r}")
        super().__init__(params, {"lr": lr, "rank": rank, "kappa": kappa, "beta1": beta1, "eps": tuple(eps),
                                  "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                                  "weight_decay": weight_decay, "scale_parameter": scale_parameter,
                                  "factorize_second_moment": factorize_second_moment})
        self.seed = seed
        self.index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._packs: dict[nn.Parameter, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self.accumulation_rank: int | None = None

    # --- options per parameter ---
    @staticmethod
    def compressed(group: dict[str, Any], shape: torch.Size) -> bool:
        return (group["beta1"] > 0 and group["factorize_second_moment"] and len(shape) == 2
                and min(shape) >= group["rank"] and max(shape) / min(shape) <= 4)

    def momentum_seed(self, p: nn.Parameter, period: int) -> int:
        return derive_seed(self.seed, self.index[p], "momentum", period)

    def accumulation_seed(self, p: nn.Parameter) -> int:
        return derive_seed(self.seed, self.index[p], "accumulation", self.state[p].get("step", 0))

    # --- compressed gradient accumulation ---
    def compress_accumulation(self, rank: int) -> None:
        """Keep the gradients of 2-D parameters compressed between micro-batches (rank `rank`); call
        `decompress_gradients()` after the last backward of each step."""
        positive_int("flora", "accumulation rank", rank)
        self.accumulation_rank = rank
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim == 2 and min(p.shape) >= rank:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._compress_hook))

    @torch.no_grad()
    def _compress_hook(self, p: nn.Parameter) -> None:
        proj = flora_projection(self.accumulation_seed(p), p.shape, self.accumulation_rank, p.grad.dtype,
                                p.grad.device)
        low = down(proj, p.grad)
        self._packs[p] = low if p not in self._packs else self._packs[p] + low
        p.grad = None

    @torch.no_grad()
    def decompress_gradients(self) -> None:
        for p, low in self._packs.items():
            proj = flora_projection(self.accumulation_seed(p), p.shape, self.accumulation_rank, low.dtype, low.device)
            p.grad = up(proj, low, p.shape)
        self._packs.clear()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # --- the step ---
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._packs:
            raise RuntimeError("Flora: compressed gradients are pending; call decompress_gradients() before step()")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: nn.Parameter, group: dict[str, Any]) -> None:
        grad = p.grad.float()
        shape = grad.shape
        factored = group["factorize_second_moment"] and grad.ndim == 2
        compressed = self.compressed(group, shape)
        b1 = group["beta1"]
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            if b1 > 0:
                if compressed:
                    state["period"] = 0
                    state["seed"] = self.momentum_seed(p, 0)
                    m, n = shape
                    state["exp_avg"] = grad.new_zeros((group["rank"], n) if m < n else (m, group["rank"]))
                else:
                    state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(shape[:-2] + shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        w = p.float()
        lr = group["lr"] * (max(group["eps"][1], _rms(w).item()) if group["scale_parameter"] else 1.0)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])

        update = grad ** 2 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
            update = r_factor * col.unsqueeze(-2).rsqrt() * grad
        else:
            sq = state["exp_avg_sq"]
            sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = sq.rsqrt() * grad

        if b1 > 0 and not compressed:
            update = update * (1 - b1) + state["exp_avg"] * b1
            state["exp_avg"].copy_(update)
        elif b1 > 0:
            raw = update
            proj = flora_projection(state["seed"], shape, group["rank"], grad.dtype, grad.device)
            momentum = up(proj, state["exp_avg"], shape)
            update = raw * (1 - b1) + momentum * b1
            if state["step"] % group["kappa"] == 0:  # resample: move the momentum to a new projection
                state["period"] += 1
                state["seed"] = self.momentum_seed(p, state["period"])
                proj = flora_projection(state["seed"], shape, group["rank"], grad.dtype, grad.device)
                state["exp_avg"] = down(proj, momentum)
            state["exp_avg"] = state["exp_avg"] * b1 + down(proj, raw) * (1 - b1)

        update = update / (_rms(update) / group["clip_threshold"]).clamp(min=1.0)
        update = update * lr
        if group["weight_decay"] != 0:
            w.add_(w, alpha=-group["weight_decay"] * lr)
        w.add_(-update)
        if w.data_ptr() != p.data_ptr():
            p.copy_(w)

    def state_bytes(self) -> int:
        """Bytes of the optimizer's state tensors (moments; projections are regenerated from seeds)."""
        return tensor_bytes(list(self.state.values()))


@register
class FloraRecipe(ProjectionRecipe):
    name = "flora"
    options = {"rank": 8, "kappa": 100, "beta1": 0.9, "scale_parameter": True, "decay_rate": -0.8,
               "clip_threshold": 1.0, "compress_accumulation": True, "accumulation_rank": None, "seed": 0,
               "train_rest": False}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.check()
        positive_int(self.name, "kappa", self.opts["kappa"])
        if self.opts["accumulation_rank"] is not None:
            positive_int(self.name, "accumulation_rank", self.opts["accumulation_rank"])

    def build_optimizer(self, model, cfg) -> Flora:
        o = self.opts
        params = [p for g in self.groups(model, {}) for p in g["params"]]
        opt = Flora(params, lr=cfg.lr, rank=o["rank"], kappa=o["kappa"], beta1=float(o["beta1"]),
                    clip_threshold=float(o["clip_threshold"]), decay_rate=float(o["decay_rate"]),
                    weight_decay=cfg.weight_decay, scale_parameter=bool(o["scale_parameter"]), seed=int(o["seed"]))
        if o["compress_accumulation"] and cfg.grad_accum > 1:
            opt.compress_accumulation(o["accumulation_rank"] or o["rank"])
        return opt

    def after_backward(self, model, step: int) -> None:
        if self.optimizer is not None:
            self.optimizer.decompress_gradients()
