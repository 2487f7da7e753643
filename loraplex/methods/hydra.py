"""Hydra (Kim, Yang, Kim, Hong, Park 2023, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning", arXiv 2309.06922).

A parallel LoRA branch on the layer's input plus a sequential LoRA branch on the pretrained layer's
output (a learned linear combination of the pretrained features):
    y₀ = W x + b                                   (the bare base layer)
    y  = y₀ + s · B_p A_p x + s · B_s A_s y₀,
    A_p: r x d_in, B_p: d_out x r,  A_s: r x d_out, B_s: d_out x r,  s = alpha / r (alpha/sqrt(r) with rslora).
So ΔW = s (B_p A_p + B_s A_s W) and Δb = s B_s A_s b (the reference code's re-parameterisation).
Initialisation as the reference code (NLU): A's kaiming-uniform (bound 1/sqrt(fan_in)), B's = 0.
Dropout (config.dropout) applies to each branch's input.
Trainable parameters per layer: r (d_in + d_out) + 2 r d_out.
Mergeable (weight and bias). ΔW has rank ≤ 2r: on layers without a bias `as_lora` gives
A' = [A_p; A_s W] (2r x d_in), B' = s [B_p, B_s]; a layer with a bias also changes its bias, which a
plain LoRA cannot express (serve those merged).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options
from loraplex.methods.moslora import uniform


# --- merging an update of the base bias (shared with GLoRA) ---
def bare_bias(spec: LayerSpec, adapter: nn.Module) -> torch.Tensor | None:
    """The layer's bias without what OTHER merged adapters added to it (float32), or None.

    Adapters that change the bias record what they merged in `spec._merged_bias` (one dict per
    adapted layer), so an update that depends on the base bias is computed from the bare one, as
    `merge`'s `base_weight` does for the weight.
    """
    bias = spec.bias
    if bias is None:
        return None
    bare = bias.detach().float().clone()
    for key, added in getattr(spec, "_merged_bias", {}).items():
        if key != id(adapter):
            bare -= added
    return bare


def add_to_bias(spec: LayerSpec, adapter: nn.Module, update: torch.Tensor) -> None:
    spec.bias.data += update.to(spec.bias.dtype)
    if not hasattr(spec, "_merged_bias"):
        spec._merged_bias = {}
    spec._merged_bias[id(adapter)] = update


def remove_from_bias(spec: LayerSpec, adapter: nn.Module) -> None:
    update = spec._merged_bias.pop(id(adapter))
    spec.bias.data -= update.to(spec.bias.dtype)


@register
class HydraAdapter(Adapter):
    """Hydra: y = y₀ + s B_p A_p x + s B_s A_s y₀ with y₀ = W x + b (parallel + sequential LoRA)."""

    method = "hydra"
    paper = ("Kim, Yang, Kim, Hong, Park 2023, Hydra: Multi-head Low-rank Adaptation for Parameter Efficient "
             "Fine-tuning (arXiv 2309.06922)")
    serving_form = "low-rank after conversion"
    peft_type = "HYDRA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        check_options(config, {})
        init = check_init(config, ("kaiming", "random"))
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        d_in, d_out = spec.in_features, spec.out_features

        def up() -> torch.Tensor:
            return uniform((d_out, r), 1 / math.sqrt(r)) if init == "random" else torch.zeros(d_out, r)

        self.hydra_par_A = nn.Parameter(uniform((r, d_in), 1 / math.sqrt(d_in)).to(device=device, dtype=dtype))
        self.hydra_par_B = nn.Parameter(up().to(device=device, dtype=dtype))
        self.hydra_seq_A = nn.Parameter(uniform((r, d_out), 1 / math.sqrt(d_out)).to(device=device, dtype=dtype))
        self.hydra_seq_B = nn.Parameter(up().to(device=device, dtype=dtype))

    # --- the math ---
    def _drop(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.hydra_par_A.dtype)
        return t if self.dropout is None else self.dropout(t)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        parallel = self._drop(x) @ self.hydra_par_A.t() @ self.hydra_par_B.t()
        sequential = self._drop(base_out) @ self.hydra_seq_A.t() @ self.hydra_seq_B.t()
        return ((parallel + sequential) * self.scale).to(base_out.dtype)

    def _updates(self, base: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW, Δb) from the bare base weight and bias, float32."""
        seq = self.hydra_seq_B.float() @ self.hydra_seq_A.float()                  # d_out x d_out
        dw = (self.hydra_par_B.float() @ self.hydra_par_A.float() + seq @ base) * self.scale
        return dw, None if bias is None else (seq @ bias) * self.scale

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        return self._updates(spec.weight.detach().float(), None)[0]

    def merge(self, spec: LayerSpec, weight: float, base_weight: torch.Tensor | None = None) -> None:
        w = spec.weight
        base = w.detach().float() if base_weight is None else base_weight
        dw, db = self._updates(base, bare_bias(spec, self))
        self._merged_update = weight * dw
        w.data += self._merged_update.to(w.dtype)
        if db is not None:
            add_to_bias(spec, self, weight * db)

    def unmerge(self, spec: LayerSpec, weight: float) -> None:
        w = spec.weight
        w.data -= self._merged_update.to(w.dtype)
        del self._merged_update
        if spec.bias is not None:
            remove_from_bias(spec, self)

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        if spec.bias is not None:
            raise TypeError("Hydra's sequential branch also changes the layer's bias (Δb = s B_s A_s b), which a "
                            "plain LoRA cannot express; merge the adapter instead (merge_and_unload)")
        a = torch.cat([self.hydra_par_A.float(), self.hydra_seq_A.float() @ spec.weight.detach().float()])
        b = torch.cat([self.hydra_par_B.float(), self.hydra_seq_B.float()], dim=1) * self.scale
        return a.detach(), b.detach()

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"hydra_par_A": self.hydra_par_A, "hydra_par_B": self.hydra_par_B,
                "hydra_seq_A": self.hydra_seq_A, "hydra_seq_B": self.hydra_seq_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"
