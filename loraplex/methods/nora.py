"""NoRA (Lin et al. 2024, "NoRA: Nested Low-Rank Adaptation for Efficient Fine-Tuning Large Models",
arXiv 2408.10280).

A frozen outer LoRA from the SVD of W with a trainable inner LoRA nested inside it:
    y = W x + s · B_o (B_i A_i) A_o x,    s = alpha / r (alpha / sqrt(r) with rslora),
    outer (frozen): B_o = U_r Σ_r (d_out x r), A_o = V_rᵀ (r x d_in), from W ≈ U_r Σ_r V_rᵀ (the
        authors' code puts Σ on the output side),
    inner (trainable): B_i (r x r'), A_i (r' x r), r' = `inner_r` (option, default max(1, r // 4)),
        initialised as LoRA: A_i Kaiming-uniform (bound 1/sqrt(r)), B_i = 0, so ΔW = 0 at the start.
Trainable parameters per layer: 2 r r'. Additive, rank ≤ r', mergeable; `as_lora` gives
A' = A_i A_o, B' = s B_o B_i (rank r').
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import DecompositionInit, check_init, check_options, check_rank, truncated_svd


@register
class NoraAdapter(DecompositionInit, Adapter):
    """NoRA: y = W x + s·B_o B_i A_i A_o x, outer pair frozen from the SVD of W, inner pair trains."""

    method = "nora"
    paper = ("Lin, Li, Li, Zou, Xue, Guo 2024, NoRA: Nested Low-Rank Adaptation for Efficient Fine-Tuning "
             "Large Models (arXiv 2408.10280)")
    serving_form = "low-rank"
    peft_type = "NORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        options = check_options(config, {"inner_r": None})
        init = check_init(config)
        check_rank(spec, r)
        inner = options["inner_r"]
        inner = max(1, r // 4) if inner is None else inner
        if not isinstance(inner, int) or isinstance(inner, bool) or not 1 <= inner <= r:
            raise ValueError(f"option inner_r must be an integer with 1 <= inner_r <= r={r}, got {inner!r}")
        self.inner_r, self.init = inner, init
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        new = {"dtype": config.torch_dtype, "device": spec.base.weight.device}
        self.register_buffer("outer_B", torch.zeros(spec.out_features, r, **new))
        self.register_buffer("outer_A", torch.zeros(r, spec.in_features, **new))
        self.inner_A = nn.Parameter(torch.zeros(inner, r, **new))
        self.inner_B = nn.Parameter(torch.zeros(r, inner, **new))

    def initialise(self, spec: LayerSpec) -> None:
        """Outer pair from the SVD of W (B_o = U_r Σ_r, A_o = V_rᵀ); inner pair as LoRA (B_i = 0)."""
        r, inner = self.r, self.inner_r
        u, s, vh = truncated_svd(spec.weight, r)
        self.outer_B.copy_(u * s)
        self.outer_A.copy_(vh)
        if self.init == "gaussian":
            self.inner_A.copy_(torch.randn(inner, r) / inner)
        else:  # kaiming_uniform_(a=sqrt(5)) on a (r' x r) matrix has bound 1/sqrt(r); "zeros" too, as LoRA
            self.inner_A.uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r))
        if self.init == "random":  # a non-trivial adapter, for tests
            self.inner_B.uniform_(-1 / math.sqrt(inner), 1 / math.sqrt(inner))

    # --- the math ---
    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.inner_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = x @ self.outer_A.t()               # (.., r)   frozen outer down-projection
        h = (h @ self.inner_A.t()) @ self.inner_B.t()   # (.., r)   trainable inner LoRA
        return (h @ self.outer_B.t() * self.scale).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        b, a = self._factors()
        return b @ a

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s B_o B_i, A_i A_o) in float32."""
        return (self.outer_B.float() @ self.inner_B.float() * self.scale,
                self.inner_A.float() @ self.outer_A.float())

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        b, a = self._factors()
        return a.detach(), b.detach()

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"nora_outer_A": self.outer_A, "nora_outer_B": self.outer_B,
                "nora_inner_A": self.inner_A, "nora_inner_B": self.inner_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, inner_r={self.inner_r}, alpha={self.alpha}, scale={self.scale:.4g}"
