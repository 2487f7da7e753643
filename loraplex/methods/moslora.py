"""MoSLoRA (Wu, Wang, Zhao, Wong 2024, "Mixture-of-Subspaces in Low-Rank Adaptation", arXiv 2406.11909).

A learnable r x r mixer M fuses LoRA's rank-one subspaces:
    y = W x + s · B M A x,        A: r x d_in,  M: r x r,  B: d_out x r,  s = alpha / r
(alpha / sqrt(r) with rslora). Initialisation as the reference code: A and M kaiming-uniform
(bound 1/sqrt(fan_in): 1/sqrt(d_in) for A, 1/sqrt(r) for M), B = 0, so the adapter starts as the
identity. Option `mixer_init` picks M's start: "kaiming" (default, the paper's), "orthogonal" or
"identity" (MoSLoRA then starts as LoRA).
Trainable parameters per layer: r (d_in + d_out) + r². Additive and rank ≤ r, so mergeable and a
plain LoRA after conversion: `as_lora` gives A' = M A, B' = s B.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options

MIXER_INITS = ("kaiming", "orthogonal", "identity")


def uniform(shape: tuple[int, ...], bound: float) -> torch.Tensor:
    """U(-bound, bound): kaiming_uniform_(a=sqrt(5)) has bound 1/sqrt(fan_in)."""
    return torch.empty(shape).uniform_(-bound, bound)


@register
class MosLoraAdapter(Adapter):
    """MoSLoRA: y = W x + s · B M A x with a trainable r x r mixer M."""

    method = "moslora"
    paper = "Wu, Wang, Zhao, Wong 2024, Mixture-of-Subspaces in Low-Rank Adaptation (arXiv 2406.11909)"
    serving_form = "low-rank after conversion"
    peft_type = "MOSLORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        options = check_options(config, {"mixer_init": "kaiming"})
        if options["mixer_init"] not in MIXER_INITS:
            raise ValueError(f"option mixer_init must be one of {MIXER_INITS}, got {options['mixer_init']!r}")
        init = check_init(config, ("kaiming", "gaussian", "random"))
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        d_in, d_out = spec.in_features, spec.out_features
        a = torch.randn(r, d_in) / r if init == "gaussian" else uniform((r, d_in), 1 / math.sqrt(d_in))
        if options["mixer_init"] == "kaiming":
            m = uniform((r, r), 1 / math.sqrt(r))
        elif options["mixer_init"] == "orthogonal":
            m = nn.init.orthogonal_(torch.empty(r, r))
        else:
            m = torch.eye(r)
        b = uniform((d_out, r), 1 / math.sqrt(r)) if init == "random" else torch.zeros(d_out, r)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_AB = nn.Parameter(m.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))

    # --- the math ---
    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return (((x @ self.lora_A.t()) @ self.lora_AB.t()) @ self.lora_B.t() * self.scale).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        return self.lora_B.float() @ self.lora_AB.float() @ self.lora_A.float() * self.scale

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.lora_AB.detach().float() @ self.lora_A.detach().float()
        return a, self.lora_B.detach().float() * self.scale

    # --- files (the reference code's names) ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_AB.weight": self.lora_AB, "lora_B.weight": self.lora_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"
