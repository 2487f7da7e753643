"""PaCA (Woo et al. 2025, "PaCA: Partial Connection Adaptation for Efficient Fine-Tuning",
arXiv 2503.01905).

Fine-tune r randomly chosen input columns of the pre-trained weight itself (its "partial
connections") instead of adding adapter layers:
    J = r column indices drawn at random (`torch.randperm(d_in)[:r]`, seeded by the global RNG),
    W'[:, J] = s · P,    the other columns of W unchanged,    s = alpha / r,
    P (d_out x r) trainable, initialised to W[:, J] / s (so W' = W at the start).
Computed without touching the base layer as
    y = W x + (s · P - W[:, J]) x_J,
whose backward keeps only the r selected input features x_J (PaCA's activation-memory saving);
W[:, J] is a frozen copy taken when the adapter is installed. The indices are saved with P.
Trainable parameters per layer: d_out · r. Mergeable; ΔW = (s P - W[:, J]) E_J has rank ≤ r, so
`as_lora` gives a plain LoRA: A = E_J (rows of the identity), B = s P - W[:, J].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options


@register
class PacaAdapter(Adapter):
    """PaCA: train s·P, the new values of r random input columns of W: y = W x + (s P - W[:, J]) x_J."""

    method = "paca"
    paper = ("Woo, Kim, Jang, Choi, Yun, Lee, Lim, Jeong 2025, PaCA: Partial Connection Adaptation for Efficient "
             "Fine-Tuning (arXiv 2503.01905)")
    serving_form = "low-rank after conversion"
    peft_type = "PACA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        check_options(config, {})
        init = check_init(config, ("kaiming", "zeros", "random"))
        if r > spec.in_features:
            raise ValueError(f"r={r} columns exceed in_features={spec.in_features} of this layer")
        self.scale = config.scale(r, alpha)
        self.d_in = spec.in_features
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        self.register_buffer("paca_indices", torch.randperm(spec.in_features)[:r].to(device))
        self.register_buffer("paca_base", torch.zeros(spec.out_features, r, device=device, dtype=dtype),
                             persistent=False)
        self._copy_columns(spec)
        p = self.paca_base.float() / self.scale
        if init == "zeros":     # the selected columns start at zero
            p = torch.zeros_like(p)
        elif init == "random":  # a non-trivial adapter, for tests
            p = p + torch.randn_like(p) / math.sqrt(spec.in_features) / self.scale
        self.paca_w = nn.Parameter(p.to(dtype))

    def _copy_columns(self, spec: LayerSpec) -> None:
        with torch.no_grad():
            self.paca_base.copy_(spec.weight.detach()[:, self.paca_indices])

    def on_install(self, spec: LayerSpec) -> None:
        # Loading copies saved indices in after construction: take the frozen columns again.
        self._copy_columns(spec)

    # --- the math ---
    def column_change(self) -> torch.Tensor:
        """s · P - W[:, J] (d_out x r)."""
        return self.paca_w * self.scale - self.paca_base

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.paca_w.dtype).index_select(-1, self.paca_indices)
        if self.dropout is not None:
            x = self.dropout(x)
        return (x @ self.column_change().t()).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        update = torch.zeros(spec.out_features, spec.in_features, device=self.paca_w.device)
        update[:, self.paca_indices] = self.column_change().float()
        return update

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.zeros(self.r, spec.in_features, device=self.paca_w.device)
        a[torch.arange(self.r, device=a.device), self.paca_indices] = 1.0
        return a, self.column_change().detach().float()

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"paca_w": self.paca_w, "paca_indices": self.paca_indices}

    def from_peft(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        indices = tensors.get("paca_indices")
        if indices is not None:
            if indices.dtype not in (torch.int64, torch.int32) or indices.numel() != self.r:
                raise ValueError(f"{where}.paca_indices: expected {self.r} integer column indices")
            if indices.unique().numel() != self.r or indices.min() < 0 or indices.max() >= self.d_in:
                raise ValueError(f"{where}.paca_indices: column indices must be distinct and in [0, d_in)")
        super().from_peft(tensors, where)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"
