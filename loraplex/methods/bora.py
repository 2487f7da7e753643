"""BoRA (Wang, Fan, Bao, Jiang, Song 2024, "BoRA: Bi-dimensional Weight-Decomposed Low-Rank
Adaptation", arXiv 2412.06441).

DoRA with magnitudes on both dimensions of the weight. In the base weight's (d_out x d_in) layout:
    V  = W + s B A                                   (LoRA's direction update, s = alpha / r)
    W₁ = m_out ⊙ V / ‖V‖_row                         (DoRA's step: one norm and magnitude per output unit)
    W' = W₁ ⊙ m_inᵀ / ‖W₁‖_col                       (the other dimension: one per input feature)
    y  = W' x + b
m_out (d_out) starts at ‖W‖_row and m_in (d_in) at ‖W‖_col, with B = 0, so W₁ = W and W' = W at
init. The norms are part of the graph (exact gradients; DoRA's detach trick is not used).
Trainable parameters per layer: r (d_in + d_out) + d_in + d_out.
W' - W is full rank in general: BoRA merges (`merge` folds W' - W into the base weight, computed
from the bare base weight, and `unmerge` subtracts exactly what was added) but has no plain-LoRA
form. Each forward builds W' (d_out x d_in) once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options
from loraplex.methods.moslora import uniform


@register
class BoraAdapter(Adapter):
    """BoRA: W' = (m_out ⊙ V / ‖V‖_row) normalised per column and scaled by m_in, V = W + s B A."""

    method = "bora"
    paper = ("Wang, Fan, Bao, Jiang, Song 2024, BoRA: Bi-dimensional Weight-Decomposed Low-Rank "
             "Adaptation (arXiv 2412.06441)")
    serving_form = "merged only"
    peft_type = "BORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        check_options(config, {})
        init = check_init(config, ("kaiming", "gaussian", "random"))
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        d_in, d_out = spec.in_features, spec.out_features
        a = torch.randn(r, d_in) / r if init == "gaussian" else uniform((r, d_in), 1 / math.sqrt(d_in))
        b = uniform((d_out, r), 1 / math.sqrt(r)) if init == "random" else torch.zeros(d_out, r)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))
        w = spec.weight.detach().float()
        self.magnitude_out = nn.Parameter(w.norm(dim=1).to(device=device, dtype=dtype))
        self.magnitude_in = nn.Parameter(w.norm(dim=0).to(device=device, dtype=dtype))

    # --- the math ---
    def adapted_weight(self, base: torch.Tensor) -> torch.Tensor:
        """W' from the bare base weight `base` (d_out x d_in), float32."""
        v = base.float() + (self.lora_B.float() @ self.lora_A.float()) * self.scale
        w1 = self.magnitude_out.float()[:, None] * v / v.norm(dim=1, keepdim=True)
        return w1 * (self.magnitude_in.float() / w1.norm(dim=0))[None, :]

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        base = spec.weight.detach()
        update = self.adapted_weight(base) - base.float()
        x = x.to(update.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return F.linear(x, update).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        base = spec.weight.detach()
        return self.adapted_weight(base) - base.float()

    # W' depends on the base weight: the update is computed from the bare base (other adapters may be
    # merged into spec.weight already) and kept, so unmerge subtracts exactly what merge added.
    def merge(self, spec: LayerSpec, weight: float, base_weight: torch.Tensor | None = None) -> None:
        w = spec.weight
        base = w.detach().float() if base_weight is None else base_weight
        update = weight * (self.adapted_weight(base) - base)
        self._merged_update = update
        w.data += update.to(w.dtype)

    def unmerge(self, spec: LayerSpec, weight: float) -> None:
        w = spec.weight
        w.data -= self._merged_update.to(w.dtype)
        del self._merged_update

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B,
                "bora_magnitude_out": self.magnitude_out, "bora_magnitude_in": self.magnitude_in}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"
