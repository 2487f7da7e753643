"""EDoRA (Nasiri & Garraghan 2025, "EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via
Singular Value Decomposition", arXiv 2501.12067).

DoRA's magnitude/direction decomposition with LoRA-XS's update as the directional change:
    V = W + s · B R A,    W' = m ⊙ V / ‖V‖_row,    y = W' x + b,
    B = U_r (d_out x r) and A = Σ_r V_rᵀ (r x d_in) frozen from the truncated SVD of W, R (r x r)
    trainable (R ~ N(0, σ²), σ = 1e-5, as the reference code), m (one per output unit) trainable,
    initialised to ‖W + s B R A‖_row so the adapter starts as the identity.
As in DoRA (§4.3) and the reference code, ‖V‖ is treated as a constant in the backward pass:
    y = W x + b + (m/n - 1) ⊙ W x + (m/n) ⊙ s B R A x,    n = ‖W + s B R A‖_row (detached).

Mergeable (W' is a fixed matrix), but not low-rank: W' - W = (m/n - 1) ⊙ W + (m/n) ⊙ s B R A has
full rank, so there is no plain-LoRA form (`as_lora` raises).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import (
    DecompositionInit,
    check_init,
    check_options,
    check_rank,
    positive_float,
    xs_factors,
)


@register
class EDoraAdapter(DecompositionInit, Adapter):
    """EDoRA: DoRA whose direction update is s·B R A with B, A frozen from the SVD of W (R, m train)."""

    method = "edora"
    paper = ("Nasiri, Garraghan 2025, EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via Singular "
             "Value Decomposition (arXiv 2501.12067)")
    serving_form = "merged only"
    peft_type = "EDORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"init_sigma": 1e-5}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        options = check_options(config, self.option_defaults)
        self.init = check_init(config)
        self.init_sigma = positive_float(options["init_sigma"], "init_sigma", allow_zero=True)
        check_rank(spec, r)
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        new = {"dtype": config.torch_dtype, "device": spec.base.weight.device}
        self.register_buffer("lora_A", torch.zeros(r, spec.in_features, **new))
        self.register_buffer("lora_B", torch.zeros(spec.out_features, r, **new))
        self.lora_R = nn.Parameter(torch.zeros(r, r, **new))
        self.magnitude = nn.Parameter(torch.zeros(spec.out_features, **new))

    def initialise(self, spec: LayerSpec) -> None:
        """B = U_r, A = Σ_r V_rᵀ from the SVD of W; R ~ N(0, σ²); m = ‖W + s B R A‖_row."""
        b, a = xs_factors(spec.weight, self.r)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        r = self.r
        if self.init == "zeros":
            self.lora_R.zero_()
        elif self.init == "random":  # a non-trivial adapter, for tests
            self.lora_R.copy_(torch.randn(r, r) / math.sqrt(r))
        else:
            self.lora_R.copy_(torch.randn(r, r) * self.init_sigma)
        self.magnitude.copy_((spec.weight.float() + self.direction_delta()).norm(dim=1))

    # --- the math ---
    def direction_delta(self) -> torch.Tensor:
        """s · B R A (float32, (d_out, d_in))."""
        return self.lora_B.float() @ self.lora_R.float() @ self.lora_A.float() * self.scale

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        dtype = self.lora_R.dtype
        dropped = self.dropout(x) if self.dropout is not None and self.training else None
        xa = (x if dropped is None else dropped).to(dtype)
        low_rank = ((xa @ self.lora_A.t()) @ self.lora_R.t()) @ self.lora_B.t() * self.scale
        norm = (spec.weight.float() + self.direction_delta().detach()).norm(dim=1).detach()
        ratio = (self.magnitude.float() / norm).to(dtype)
        if dropped is None:
            bias = spec.bias
            wx = base_out if bias is None else base_out - bias
        else:  # one dropout mask for W x and B R A x, as the reference code
            wx = F.linear(dropped, spec.weight)
        return ((ratio - 1) * wx.to(dtype) + ratio * low_rank).to(base_out.dtype)

    def _update(self, base: torch.Tensor, weight: float) -> torch.Tensor:
        """weight · ((m/n - 1) ⊙ W0 + (m/n) ⊙ sBRA), n = ‖W0 + sBRA‖_row, W0 the bare base weight."""
        delta = self.direction_delta()
        ratio = (self.magnitude.float() / (base + delta).norm(dim=1))[:, None]
        return weight * ((ratio - 1) * base + ratio * delta)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        """W' - W on the current (unmerged) base weight."""
        return self._update(spec.weight.float(), 1.0)

    def merge(self, spec: LayerSpec, weight: float, base_weight: torch.Tensor | None = None) -> None:
        w = spec.weight
        update = self._update(w.float() if base_weight is None else base_weight, weight)
        self._merged_update = update  # unmerge subtracts exactly what merge added
        w.data += update.to(w.dtype)

    def unmerge(self, spec: LayerSpec, weight: float) -> None:
        w = spec.weight
        w.data -= self._merged_update.to(w.dtype)
        del self._merged_update

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B, "lora_R.weight": self.lora_R,
                "lora_magnitude_vector": self.magnitude}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"
