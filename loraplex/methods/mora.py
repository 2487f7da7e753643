"""MoRA (Jiang et al. 2024, "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning",
arXiv 2405.12130).

One trainable square matrix M (r̂ x r̂) between a fixed, parameter-free compression of the input
(d_in -> r̂) and decompression of the output (r̂ -> d_out):
    y = W x + f_decomp(M · f_comp(x)),      r̂ = floor(sqrt((d_in + d_out) · r) + 1/2),
so M has as many parameters as a rank-r LoRA, (d_in + d_out)·r ≈ r̂², but ΔW can have rank up to r̂.
M starts at zero (the identity adapter); there is no scale (the reference code uses 1; `alpha` is
not used).

Two operator pairs (option `mora_type`, default "sharing"; the reference code's types 1 and 6):
  "sharing" (paper Eq. 6, type 1): x is padded to a multiple of r̂ by repeating its first entries,
      cut into blocks of r̂ and the blocks are summed: c_k = Σ_{p ≡ k (mod r̂)} x_{p mod d_in};
      the output repeats M c cyclically: y_o = (M c)_{o mod r̂}.  So ΔW = T M S with 0/1 matrices S, T.
  "rope" (paper Eq. 9, type 6; r̂ rounded down to even): the padded x is cut into n = ceil(d_in/r̂)
      blocks x_b, each rotated by RoPE at position b, x̃_b = x_b ⊙ cos θ_b + rotate_half(x_b) ⊙ sin θ_b
      with θ_b = b · (ω_0..ω_{r̂/2-1}, ω_0..ω_{r̂/2-1}), ω_j = 10000^(-2j/r̂), rotate_half(v) = (-v₂, v₁),
      and M is applied per block: ΔW = block-diag(M R_0, ..., M R_{n-1}) (columns of the padding wrap
      around to the first inputs); the n·r̂ outputs are cut to d_out, or repeated when shorter.
Both are linear in x, hence mergeable: `delta_weight` applies the same operators to the identity.
Trainable parameters per layer: r̂².
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options

TYPES = {"sharing": "sharing", "rope": "rope", 1: "sharing", 6: "rope"}


def mora_rank(d_in: int, d_out: int, r: int, mora_type: str) -> int:
    """r̂ = floor(sqrt((d_in + d_out) r) + 1/2), rounded down to even for the RoPE operators."""
    r_hat = int(math.sqrt((d_in + d_out) * r) + 0.5)
    return r_hat // 2 * 2 if mora_type == "rope" else r_hat


@register
class MoraAdapter(Adapter):
    """MoRA: y = W x + f_decomp(M f_comp(x)), one trainable r̂ x r̂ matrix M (r̂² ≈ (d_in + d_out) r)."""

    method = "mora"
    paper = ("Jiang, Huang, Luo, Zhang, Huang, Wei, Deng, Sun, Zhang, Wang, Zhuang 2024, MoRA: High-Rank "
             "Updating for Parameter-Efficient Fine-Tuning (arXiv 2405.12130)")
    serving_form = "merged only"
    peft_type = "MORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"mora_type": "sharing"}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        options = check_options(config, self.option_defaults)
        if options["mora_type"] not in TYPES:
            raise ValueError(f"option mora_type must be 'sharing' (type 1) or 'rope' (type 6), "
                             f"got {options['mora_type']!r}")
        self.mora_type = TYPES[options["mora_type"]]
        init = check_init(config, ("kaiming", "zeros", "random"))
        self.d_in, self.d_out = spec.in_features, spec.out_features
        self.r_hat = mora_rank(self.d_in, self.d_out, r, self.mora_type)
        if self.r_hat < (2 if self.mora_type == "rope" else 1) or self.r_hat > self.d_in:
            raise ValueError(f"MoRA's square size r̂={self.r_hat} (from r={r}) must lie in "
                             f"[{2 if self.mora_type == 'rope' else 1}, d_in={self.d_in}]; choose another r")
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        m = torch.zeros(self.r_hat, self.r_hat)
        if init == "random":  # a non-trivial adapter, for tests
            m = torch.randn(self.r_hat, self.r_hat) / math.sqrt(self.r_hat)
        self.mora_M = nn.Parameter(m.to(device=device, dtype=dtype))

    # --- the operators ---
    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_in) padded cyclically to n·r̂ and cut into n blocks: (..., n, r̂)."""
        n = -(-self.d_in // self.r_hat)
        pad = n * self.r_hat - self.d_in
        if pad:
            x = torch.cat([x, x[..., :pad]], dim=-1)
        return x.reshape(*x.shape[:-1], n, self.r_hat)

    def _rotations(self, n: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos θ and sin θ (n x r̂) of RoPE at positions 0..n-1 (frequencies 10000^(-2j/r̂), repeated)."""
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.r_hat, 2, device=device).float() / self.r_hat))
        angles = torch.outer(torch.arange(n, device=device).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _apply(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """f_decomp(M f_comp(x)) for x (..., d_in), no dropout."""
        blocks = self._blocks(x)
        if self.mora_type == "sharing":
            out = blocks.sum(dim=-2) @ m.t()                                     # (..., r̂)
            repeats = -(-self.d_out // self.r_hat)
            return out.repeat(*(1,) * (out.dim() - 1), repeats)[..., : self.d_out]
        cos, sin = self._rotations(blocks.shape[-2], x.device, x.dtype)
        half = self.r_hat // 2
        rotated = blocks * cos + torch.cat([-blocks[..., half:], blocks[..., :half]], dim=-1) * sin
        out = (rotated @ m.t()).flatten(-2)                                       # (..., n·r̂)
        if out.shape[-1] < self.d_out:
            repeats = -(-self.d_out // out.shape[-1])
            out = out.repeat(*(1,) * (out.dim() - 1), repeats)
        return out[..., : self.d_out]

    # --- the math ---
    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.mora_M.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return self._apply(x, self.mora_M).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        """ΔW, column i being the adapter's response to the basis vector e_i (the map is linear)."""
        eye = torch.eye(self.d_in, device=self.mora_M.device, dtype=torch.float32)
        return self._apply(eye, self.mora_M.float()).t()

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"mora_M": self.mora_M}

    def extra_repr(self) -> str:
        return f"r={self.r}, r_hat={self.r_hat}, mora_type={self.mora_type!r}"
