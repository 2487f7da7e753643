"""LoLDU (Shi et al. 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning", arXiv 2410.13618).

W = P L D U (LU with partial pivoting; L unit lower, U unit upper after dividing by D = diag of the
LU's upper factor). Keep the first r pivots: B = P L_{:, :r} (d_out x r), A = U_{:r, :} (r x d_in),
z₀ = D_{:r}, both factors frozen. The paper (and its code) replaces W by the residual
W_res = W - σ₀ B diag(z₀) A and trains the diagonal z (init z₀) and the scale σ (init σ₀ = alpha/r):
    W' = W_res + σ B diag(z) A.
We compute the same weight without rewriting the base layer:
    y = W x + B diag(σ z - σ₀ z₀) A x,
which is identical in value and gradient, leaves W untouched (so merging, deleting and several
adapters per layer stay exact) and is the identity at the start. Trainable parameters per layer:
r + 1 (r with `train_scale=False`). Additive, rank ≤ r, mergeable; `as_lora` gives
A' = diag(σ z - σ₀ z₀) A, B' = B.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import DecompositionInit, check_init, check_options, check_rank


def ldu_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L_r, D_r, U_r) of W = P L D U, float32; a zero pivot gets D = 1 (its U row is left as is)."""
    p, lower, upper = torch.linalg.lu(weight.detach().float())
    d = torch.diagonal(upper)
    d = torch.where(d == 0, torch.ones_like(d), d)
    unit_upper = upper / d[:, None]
    return (p @ lower)[:, :r], d[:r], unit_upper[:r]


@register
class LolduAdapter(DecompositionInit, Adapter):
    """LoLDU: y = W x + B diag(σ z - σ₀ z₀) A x with B = P L_r, A = U_r from W = P L D U; z and σ train."""

    method = "loldu"
    paper = ("Shi, Wei, Wu, Ran, Sun, He, Yang 2024, LoLDU: Low-Rank Adaptation via Lower-Diag-Upper "
             "Decomposition for Parameter-Efficient Fine-Tuning (arXiv 2410.13618)")
    serving_form = "low-rank"
    peft_type = "LOLDU"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        options = check_options(config, {"train_scale": True})
        if not isinstance(options["train_scale"], bool):
            raise ValueError(f"option train_scale must be true or false, got {options['train_scale']!r}")
        self.init = check_init(config)
        check_rank(spec, r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        new = {"dtype": config.torch_dtype, "device": spec.base.weight.device}
        self.register_buffer("loldu_B", torch.zeros(spec.out_features, r, **new))   # P L_r
        self.register_buffer("loldu_A", torch.zeros(r, spec.in_features, **new))    # U_r (unit upper rows)
        self.register_buffer("loldu_diag0", torch.zeros(r, **new))                  # z₀ = D_r
        self.register_buffer("loldu_scale0", torch.full((1,), config.scale(r, alpha), **new))  # σ₀
        self.loldu_diag = nn.Parameter(torch.zeros(r, **new))                       # z
        scale = torch.full((1,), config.scale(r, alpha), **new)                     # σ
        if options["train_scale"]:
            self.loldu_scale = nn.Parameter(scale)
        else:
            self.register_buffer("loldu_scale", scale)

    def initialise(self, spec: LayerSpec) -> None:
        """B = P L_r, A = U_r, z = z₀ = D_r from W = P L D U; σ = σ₀ (set in the constructor)."""
        b, d, a = ldu_factors(spec.weight, self.r)
        self.loldu_B.copy_(b)
        self.loldu_A.copy_(a)
        self.loldu_diag0.copy_(d)
        if self.init == "zeros":
            self.loldu_diag.zero_()      # the adapter then removes the rank-r LDU part: W' = W_res
        elif self.init == "random":  # a non-trivial adapter, for tests
            self.loldu_diag.copy_(d * (1 + torch.randn(self.r)))
        else:
            self.loldu_diag.copy_(self.loldu_diag0)

    # --- the math ---
    def coefficients(self) -> torch.Tensor:
        """σ z - σ₀ z₀: the diagonal of this adapter's change of W in the (B, A) basis."""
        return self.loldu_scale * self.loldu_diag - self.loldu_scale0 * self.loldu_diag0

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.loldu_diag.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return (((x @ self.loldu_A.t()) * self.coefficients()) @ self.loldu_B.t()).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        return (self.loldu_B.float() * self.coefficients().float()) @ self.loldu_A.float()

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.coefficients().detach().float()[:, None] * self.loldu_A.float(), self.loldu_B.float())

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"loldu_A": self.loldu_A, "loldu_B": self.loldu_B, "loldu_diag": self.loldu_diag,
                "loldu_diag0": self.loldu_diag0, "loldu_scale": self.loldu_scale,
                "loldu_scale0": self.loldu_scale0}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, train_scale={isinstance(self.loldu_scale, nn.Parameter)}"
