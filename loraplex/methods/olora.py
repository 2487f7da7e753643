"""OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
arXiv 2406.01775), as PEFT's `init_lora_weights="olora"`, so PEFT's OLoRA files load here.

    W = Q R                                       (QR decomposition of the base weight, out x in)
    A₀ = R[:r, :],   B₀ = Q[:, :r]                (B₀ has orthonormal columns)
    W_res = W - s B₀ A₀,                          s = alpha / r  (alpha / √r with rslora)
    y = W_res x + b + s B A x,                    A, B trained, starting from A₀, B₀.

Like PiSSA (whose residual machinery it shares) the base weight becomes W_res on install and gets W
back on delete; the init is deterministic in W, so a file holds A and B only and loading recomputes
the QR (as PEFT does). `save(dir, as_lora=True)` writes s (B A - B₀ A₀) as a plain rank-2r LoRA.
"""

from __future__ import annotations

import torch

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora import LoraAdapter
from loraplex.methods.pissa import ResidualBase, read_options


@register
class OloraAdapter(ResidualBase, LoraAdapter):
    """OLoRA on Linear and GPT-2 Conv1D layers (no options)."""

    method = "olora"
    kinds = (LINEAR, GPT2_CONV1D)
    paper = ("Büyükakyüz 2024, OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models "
             "(arXiv 2406.01775)")
    serving_form = "low-rank after conversion"

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        read_options(config, {}, self.method)
        if config.dora:
            raise ValueError("method 'olora' does not combine with dora=True")
        self.check_free(spec, self.method)
        if r > min(spec.in_features, spec.out_features):
            raise ValueError(f"OLoRA rank r={r} exceeds min(in, out) = {min(spec.in_features, spec.out_features)}")
        super().__init__(spec, r, alpha, config)
        q, rr = torch.linalg.qr(spec.weight.detach().float())
        with torch.no_grad():
            self.lora_A.copy_(rr[:r])
            self.lora_B.copy_(q[:, :r])
        # the offset uses the factors as stored, so W_res + s B₀ A₀ = W up to one rounding
        self.init_offset(self.lora_A.detach().clone(), self.lora_B.detach().clone(), self.scale)

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        return {"init_lora_weights": "olora"}

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return self.residual_as_lora(self.scale)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"
