"""LoRA, rsLoRA and DoRA.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
    y = W x + s · B A x,        A: r x d_in, B: d_out x r (zero at init), s = alpha / r.
rsLoRA (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"):
    the same with s = alpha / sqrt(r).
DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"):
    W' = m ⊙ (W + s B A) / ‖W + s B A‖_row,    m initialised to ‖W‖_row (one norm per output unit),
    so y = (m / n) ⊙ (W x + s B A x) + b with n = ‖W + s B A‖_row treated as a constant in the
    backward pass (the paper's §4.3 gradient trick; PEFT does the same).

Embeddings use A: r x num_embeddings, B: dim x r (ΔW = (B A)ᵀ); convolutions use A as a conv with
the base kernel to r channels and B as a 1x1 conv back, as in PEFT, so files are interchangeable.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.adapter import CONV, EMBEDDING, GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register


class _LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ with a hand-written backward.

    It saves only x and the small x Aᵀ (never forms B A) and skips gradients for the frozen W.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        xa = x2 @ lora_a.t()
        y.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scale = scale
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gb = g @ lora_b                                   # (N, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gb, lora_a, alpha=s).view(*grad_out.shape[:-1], x2.shape[-1])
        if ctx.needs_input_grad[3]:
            grad_a = (gb.t() @ x2).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ xa).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None


# True while `loraplex.load` builds adapters whose tensors it then copies from the file (`values_from_file`).
_values_from_file: contextvars.ContextVar[bool] = contextvars.ContextVar("loraplex_lora_values_from_file",
                                                                        default=False)


@contextlib.contextmanager
def values_from_file() -> Iterator[None]:
    """Plain LoRA adapters built inside this block start uninitialised instead of drawing random values.

    Only for callers that overwrite every factor right after (loading a file): drawing ~10^6 random
    numbers per adapter is the slowest part of building one.
    """
    token = _values_from_file.set(True)
    try:
        yield
    finally:
        _values_from_file.reset(token)


def _uniform(shape: tuple[int, ...], bound: float, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-bound, bound)


@register
class LoraAdapter(Adapter):
    """LoRA / rsLoRA / DoRA on Linear, GPT-2 Conv1D, Embedding, Conv1d and Conv2d layers."""

    method = "lora"
    kinds = (LINEAR, GPT2_CONV1D, EMBEDDING, CONV)
    paper = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv 2106.09685)"
    serving_form = "low-rank"

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        kind = spec.kind
        use_dora = bool(config.dora)
        if use_dora and kind not in (LINEAR, GPT2_CONV1D):
            raise ValueError(f"DoRA is supported on Linear and GPT-2 Conv1D layers, not on "
                             f"{type(spec.base).__name__}; drop `dora=True` or exclude this layer")
        # One adapter is built per layer (hundreds per attach), so this is kept lean: plain values go
        # straight into __dict__, which is what nn.Module.__setattr__ does for a value that is neither
        # a tensor nor a module under a name not registered yet, without its checks.
        attrs = self.__dict__
        attrs["scale"] = config.scale(r, alpha)
        if config.dropout > 0:
            self.dropout = nn.Dropout(config.dropout)
        else:
            attrs["dropout"] = None
        attrs["use_dora"] = use_dora
        attrs["kind"] = kind
        dtype, device = config.torch_dtype, spec.base.weight.device
        d_in, d_out = spec.in_features, spec.out_features
        if kind == CONV:
            kernel = tuple(spec.base.kernel_size)
            a_shape, b_shape = (r, d_in, *kernel), (d_out, r, *(1,) * len(kernel))
            fan_in = d_in * math.prod(kernel)
        else:
            a_shape, b_shape, fan_in = (r, d_in), (d_out, r), d_in
        init = config.init
        if _values_from_file.get() and type(self) is LoraAdapter:
            # `loraplex.load` overwrites both factors from the file right away (or drops the adapter
            # on a bad file): skip the random draws and the zero fill
            a = torch.empty(a_shape, dtype=dtype, device=device)
            b = torch.empty(b_shape, dtype=dtype, device=device)
        elif kind == EMBEDDING:
            # PEFT: A = 0, B ~ N(0, 1) so that B A = 0 but gradients reach A.
            a = torch.zeros(a_shape, dtype=dtype, device=device)
            b = torch.randn(b_shape, dtype=dtype, device=device)
            if init == "random":
                a.normal_()
        else:
            if init == "gaussian":
                a = torch.randn(a_shape, dtype=dtype, device=device) / r
            else:  # kaiming_uniform_(a=sqrt(5)) has bound 1/sqrt(fan_in)
                a = _uniform(a_shape, 1 / math.sqrt(fan_in), dtype, device)
            b = (_uniform(b_shape, 1 / math.sqrt(r), dtype, device) if init == "random"
                 else torch.zeros(b_shape, dtype=dtype, device=device))
        self._parameters["lora_A"] = nn.Parameter(a)   # register_parameter's name checks cost more than
        self._parameters["lora_B"] = nn.Parameter(b)   # the rest of building a layer's adapter
        if self.use_dora:
            with torch.no_grad():
                norm = self._weight_norm(spec, self.lora_delta_weight(spec))
            self.magnitude = nn.Parameter(norm.to(dtype))

    # --- the math ---
    def lora_delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        """s · B A in the base weight's layout (float32)."""
        a, b = self.lora_A.float(), self.lora_B.float()
        if spec.kind == EMBEDDING:
            return (b @ a).t() * self.scale
        if spec.kind == CONV:
            return torch.einsum("or,ri...->oi...", b.flatten(1), a) * self.scale
        return (b @ a) * self.scale

    @staticmethod
    def _weight_norm(spec: LayerSpec, delta: torch.Tensor) -> torch.Tensor:
        return (spec.weight.float() + delta).norm(dim=1)

    def _low_rank(self, x: torch.Tensor, spec: LayerSpec, dropout: bool = True) -> torch.Tensor:
        """s · B A x for this layer kind, in the adapter's dtype (`dropout=False`: x is dropped out already)."""
        if spec.kind == EMBEDDING:
            base = spec.base
            xa = F.embedding(x, self.lora_A.t(), base.padding_idx, base.max_norm, base.norm_type,
                             base.scale_grad_by_freq, base.sparse)
            return (xa @ self.lora_B.t()) * self.scale
        x = x.to(self.lora_A.dtype)
        if self.dropout is not None and dropout:
            x = self.dropout(x)
        if spec.kind == CONV:
            conv = F.conv1d if self.lora_A.dim() == 3 else F.conv2d
            base = spec.base
            xa = conv(x, self.lora_A, None, base.stride, base.padding, base.dilation)
            return conv(xa, self.lora_B) * self.scale
        return ((x @ self.lora_A.t()) @ self.lora_B.t()) * self.scale

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        dropped = None
        if self.use_dora and self.dropout is not None and self.training:
            dropped = self.dropout(x)  # one mask: PEFT's W and B A both see the same dropped-out input
        low_rank = self._low_rank(x, spec) if dropped is None else self._low_rank(dropped, spec, dropout=False)
        if not self.use_dora:
            return low_rank.to(base_out.dtype)
        # DoRA: (m/n - 1) ⊙ W x + (m/n) ⊙ s B A x, n detached.
        norm = self._weight_norm(spec, self.lora_delta_weight(spec).detach()).detach()
        ratio = (self.magnitude.float() / norm).to(low_rank.dtype)
        bias = spec.bias
        wx = base_out if bias is None else base_out - bias
        if dropped is not None:
            wx = F.linear(dropped, spec.weight)
        return ((ratio - 1) * wx.to(low_rank.dtype) + ratio * low_rank).to(base_out.dtype)

    def fused_forward(self, x: torch.Tensor, spec: LayerSpec, weight: float) -> torch.Tensor | None:
        if (self.use_dora or spec.kind not in (LINEAR, GPT2_CONV1D) or (self.dropout is not None and self.training)
                or x.dtype != self.lora_A.dtype or spec.weight.dtype != x.dtype):
            return None
        w, b = spec.weight, spec.bias
        if w.requires_grad or (b is not None and b.requires_grad):
            return None
        if torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad or x.requires_grad):
            return _LoraLinearFunction.apply(x, w, b, self.lora_A, self.lora_B, self.scale * weight)
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ w.t() if b is None else torch.addmm(b, x2, w.t())
        y.addmm_(x2 @ self.lora_A.t(), self.lora_B.t(), alpha=self.scale * weight)
        return y.view(*x.shape[:-1], y.shape[-1])

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        if self.use_dora or spec.kind not in (LINEAR, GPT2_CONV1D):
            return super().as_lora(spec)
        return self.lora_A.detach().float(), self.lora_B.detach().float() * self.scale

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        if self.use_dora:
            raise TypeError("DoRA merges through `merge`, not as an additive delta")
        return self.lora_delta_weight(spec)

    # DoRA merge: forward adds w ⊙ [(m/n - 1) ⊙ W0 x + (m/n) ⊙ sBA x] with n = ‖W0 + sBA‖_row and W0
    # the bare base weight, so merging adds E = w ((m/n - 1) ⊙ W0 + (m/n) ⊙ sBA). E is computed from W0
    # even when other adapters are merged already (their deltas must neither enter n nor be rescaled),
    # and kept so unmerge subtracts exactly what merge added.
    def _dora_update(self, spec: LayerSpec, weight: float, base: torch.Tensor) -> torch.Tensor:
        delta = self.lora_delta_weight(spec)
        ratio = (self.magnitude.float() / (base + delta).norm(dim=1))[:, None]
        return weight * ((ratio - 1) * base + ratio * delta)

    def merge(self, spec: LayerSpec, weight: float, base_weight: torch.Tensor | None = None) -> None:
        if not self.use_dora:
            return super().merge(spec, weight, base_weight)
        w = spec.weight
        update = self._dora_update(spec, weight, w.float() if base_weight is None else base_weight)
        self._dora_merged = update
        w.data += update.to(w.dtype)

    def unmerge(self, spec: LayerSpec, weight: float) -> None:
        if not self.use_dora:
            return super().unmerge(spec, weight)
        w = spec.weight
        w.data -= self._dora_merged.to(w.dtype)
        del self._dora_merged

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        if self.kind == EMBEDDING:
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        out = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
        if self.use_dora:
            out["lora_magnitude_vector"] = self.magnitude
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, dora={self.use_dora}"
