"""LoRA-Mini (Singh, Aher, Garg 2024, "LoRA-Mini: Adaptation Matrices Decomposition and Selective
Training", arXiv 2411.15804).

LoRA's A and B are each split in two; the two outer matrices are frozen, only the inner two train:
    y = W x + s · B_aux B_train A_train A_aux x,
    A_aux: a x d_in (frozen),  A_train: r x a,  B_train: b x r,  B_aux: d_out x b (frozen),
    s = alpha / r (alpha / sqrt(r) with rslora).
So A = A_train A_aux and B = B_aux B_train are LoRA's factors, but only r (a + b) numbers train
(a LoRA of the same rank trains r (d_in + d_out)). `a` and `b` come from option `aux_dim`
(default 64), capped at d_in and d_out: a = min(aux_dim, d_in), b = min(aux_dim, d_out).
Initialisation: the frozen factors are random, as `nn.Linear`'s default (kaiming-uniform, bound
1/sqrt(fan_in): 1/sqrt(d_in) for A_aux, 1/sqrt(b) for B_aux); A_train kaiming-uniform (bound
1/sqrt(a)), B_train = 0, so the adapter starts as the identity. The frozen factors are buffers and
are saved with the adapter (a file must reproduce them exactly).
Additive and rank ≤ r: mergeable, and a plain LoRA after conversion: A' = A_train A_aux,
B' = s B_aux B_train.
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
class LoraMiniAdapter(Adapter):
    """LoRA-Mini: y = W x + s · B_aux B_train A_train A_aux x; only A_train and B_train train."""

    method = "lora-mini"
    paper = ("Singh, Aher, Garg 2024, LoRA-Mini: Adaptation Matrices Decomposition and Selective Training "
             "(arXiv 2411.15804)")
    serving_form = "low-rank after conversion"
    peft_type = "LORA_MINI"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        options = check_options(config, {"aux_dim": 64})
        aux = options["aux_dim"]
        if not isinstance(aux, int) or isinstance(aux, bool) or aux < 1:
            raise ValueError(f"option aux_dim (inner size of the frozen outer matrices) must be a positive "
                             f"integer, got {aux!r}")
        init = check_init(config, ("kaiming", "random"))
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        d_in, d_out = spec.in_features, spec.out_features
        a, b = min(aux, d_in), min(aux, d_out)
        b_train = uniform((b, r), 1 / math.sqrt(r)) if init == "random" else torch.zeros(b, r)
        self.register_buffer("lora_A_aux", uniform((a, d_in), 1 / math.sqrt(d_in)).to(device=device, dtype=dtype))
        self.lora_A_train = nn.Parameter(uniform((r, a), 1 / math.sqrt(a)).to(device=device, dtype=dtype))
        self.lora_B_train = nn.Parameter(b_train.to(device=device, dtype=dtype))
        self.register_buffer("lora_B_aux", uniform((d_out, b), 1 / math.sqrt(b)).to(device=device, dtype=dtype))

    # --- the math ---
    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.lora_A_train.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = x @ self.lora_A_aux.t() @ self.lora_A_train.t()          # (..., r)
        return (h @ self.lora_B_train.t() @ self.lora_B_aux.t() * self.scale).to(base_out.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA's (A, B) = (A_train A_aux, B_aux B_train), float32."""
        return (self.lora_A_train.float() @ self.lora_A_aux.float(),
                self.lora_B_aux.float() @ self.lora_B_train.float())

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        a, b = self.factors()
        return b @ a * self.scale

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors()
        return a.detach(), b.detach() * self.scale

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"lora_A_aux": self.lora_A_aux, "lora_A_train": self.lora_A_train,
                "lora_B_train": self.lora_B_train, "lora_B_aux": self.lora_B_aux}

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, a={self.lora_A_aux.shape[0]}, "
                f"b={self.lora_B_aux.shape[1]}")
