"""MELoRA (Ren, Shi, Wu, Zhang, Ren, de Rijke, Chen, Pei 2024, "MELoRA: Mini-Ensemble Low-Rank
Adapters for Parameter-Efficient Fine-Tuning", arXiv 2402.17263).

n mini-LoRAs, each on its own slice of the input and of the output (option `n`, default 4; it must
divide d_in and d_out):
    x = [x_1; ...; x_n] (slices of d_in / n),   y = W x + [s B_1 A_1 x_1; ...; s B_n A_n x_n],
    A_i: r x (d_in / n),  B_i: (d_out / n) x r,  s = alpha / r (alpha / sqrt(r) with rslora),
i.e. ΔW = s · block-diag(B_1 A_1, ..., B_n A_n): rank up to n·r for r (d_in + d_out) trainable
parameters (a LoRA of rank n·r trains n times more). `r` is the rank of each mini-LoRA, as in the
reference code (which scales each mini-LoRA by alpha_i / r_i). Initialisation as the reference code:
A_i kaiming-uniform (bound 1/sqrt(d_in / n)), B_i = 0.
Stored stacked: `melora_A` (n, r, d_in/n), `melora_B` (n, d_out/n, r).
Additive: mergeable, and a plain LoRA of rank n·r after conversion (block-diagonal A' and B').
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options
from loraplex.methods.moslora import uniform


@register
class MeLoraAdapter(Adapter):
    """MELoRA: n mini-LoRAs on disjoint input/output slices, ΔW = s · block-diag(B_i A_i)."""

    method = "melora"
    paper = ("Ren, Shi, Wu, Zhang, Ren, de Rijke, Chen, Pei 2024, MELoRA: Mini-Ensemble Low-Rank Adapters for "
             "Parameter-Efficient Fine-Tuning (arXiv 2402.17263)")
    serving_form = "low-rank after conversion"
    peft_type = "MELORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        options = check_options(config, {"n": 4})
        n = options["n"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"option n (number of mini-LoRAs) must be a positive integer, got {n!r}")
        d_in, d_out = spec.in_features, spec.out_features
        if d_in % n or d_out % n:
            raise ValueError(f"option n={n} must divide both d_in={d_in} and d_out={d_out} of this layer "
                             "(each mini-LoRA takes an equal slice); pick another n or exclude this layer")
        init = check_init(config, ("kaiming", "random"))
        self.n = n
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        a = uniform((n, r, d_in // n), 1 / math.sqrt(d_in // n))
        b = uniform((n, d_out // n, r), 1 / math.sqrt(r)) if init == "random" else torch.zeros(n, d_out // n, r)
        self.melora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.melora_B = nn.Parameter(b.to(device=device, dtype=dtype))

    # --- the math ---
    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.melora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        slices = x.reshape(*x.shape[:-1], self.n, x.shape[-1] // self.n)          # (..., n, d_in/n)
        h = torch.einsum("...ni,nri->...nr", slices, self.melora_A)
        out = torch.einsum("...nr,nor->...no", h, self.melora_B)                  # (..., n, d_out/n)
        return (out.flatten(-2) * self.scale).to(base_out.dtype)

    def block_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block-diagonal (A', B'), float32: A' (n r x d_in) = block-diag(A_i), B' (d_out x n r) = block-diag(B_i)."""
        a = torch.block_diag(*self.melora_A.float().unbind(0))
        b = torch.block_diag(*self.melora_B.float().unbind(0))
        return a, b

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        return torch.block_diag(*(self.melora_B.float() @ self.melora_A.float()).unbind(0)) * self.scale

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.block_factors()
        return a.detach(), b.detach() * self.scale

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"melora_A": self.melora_A, "melora_B": self.melora_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, n={self.n}, alpha={self.alpha}, scale={self.scale:.4g}"
