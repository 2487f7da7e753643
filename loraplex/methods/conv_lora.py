"""Conv-LoRA (Zhong et al. 2024, "Convolution Meets LoRA: Parameter Efficient Finetuning for Segment
Anything Model", arXiv 2401.17868; reference code in AutoGluon's `ConvLoRALinear`).

LoRA whose r-dimensional bottleneck, laid out as the image's token grid, passes through a small
mixture of convolution experts, injecting a local (image) prior into a plain ViT:
    h = A x  (r channels on the H x W token grid),
    h' = h + E_e(h),      E_i(h) = down_i(GELU(Conv3x3_i(up_i(h)))),  up_i / down_i: bicubic resizing
                          by the factor i (expert i = 1..M works at scale i; E_1 has no resizing),
    y = W x + s · B h',   s = alpha / r.
One expert per image (top-1 routing): e = argmax_i (mean_{grid}(h) · W_gate + noise)_i, the noise
N(0, 1) · (softplus(mean_{grid}(h) · W_noise) + 0.01) only while training; the chosen expert's output
is used as is (the reference code does not multiply it by the gate value), so the gate learns only
through the load-balancing loss  l_aux = CV²(importance) + CV²(load)  (Shazeer et al. 2017), kept in
`last_aux_loss` and summed over layers by `ConvLoraAdapter.aux_loss(model, name)` (times
`aux_loss_coef`, default 0.01) for a training loop to add.
Initialisation as the reference code: A Kaiming-uniform, B = 0 (the identity adapter), W_gate =
W_noise = 0, the convolutions PyTorch's default with zero bias.
Trainable parameters per layer: r(d_in + d_out) + 2·r·M + M·(9r² + r).

Token layout (option `grid`): "image" (default) — inputs (batch, H, W, d_in) are used as they are and
(batch, L, d_in) inputs must hold a square grid, L = n_prefix + H·W with H = W, after `skip_tokens`
leading tokens (e.g. a ViT's class token) that only take the plain LoRA path; "sequence" — a
(batch, L, d_in) input is a 1 x L strip (for bidirectional token encoders: the convolution and the
resizing see both neighbours, so it is NOT causal and must not be used in a causal language model).
Not mergeable: the experts are non-linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options, positive_float

GRIDS = ("image", "sequence")


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var(x) / mean(x)² (0 for a single value)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


@register
class ConvLoraAdapter(Adapter):
    """Conv-LoRA: y = W x + s·B (h + E_e(h)), h = A x on the token grid, E_e a routed conv expert."""

    method = "conv-lora"
    paper = ("Zhong, Tang, He, Fang, Yuan 2024, Convolution Meets LoRA: Parameter Efficient Finetuning for "
             "Segment Anything Model (arXiv 2401.17868)")
    serving_form = "unmergeable"
    mergeable = False
    peft_type = "CONV_LORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"experts": 8, "grid": "image", "skip_tokens": 0, "aux_loss_coef": 0.01,
                                          "noisy_gating": True}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        o = self.options(config)
        init = check_init(config, ("kaiming", "gaussian", "random"))
        self.experts, self.grid, self.skip_tokens = o["experts"], o["grid"], o["skip_tokens"]
        self.noisy_gating = o["noisy_gating"]
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.last_aux_loss: torch.Tensor | None = None
        dtype, device = config.torch_dtype, spec.base.weight.device
        d_in, d_out = spec.in_features, spec.out_features
        a = (torch.randn(r, d_in) / r if init == "gaussian"
             else torch.empty(r, d_in).uniform_(-1, 1) / math.sqrt(d_in))
        b = torch.empty(d_out, r).uniform_(-1, 1) / math.sqrt(r) if init == "random" else torch.zeros(d_out, r)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))
        gate_init = torch.randn if init == "random" else torch.zeros
        self.w_gate = nn.Parameter(gate_init(r, self.experts).to(device=device, dtype=dtype))
        self.w_noise = nn.Parameter(gate_init(r, self.experts).to(device=device, dtype=dtype))
        convs = []
        for _ in range(self.experts):
            conv = nn.Conv2d(r, r, kernel_size=3, padding=1).to(device=device, dtype=dtype)
            if init != "random":
                nn.init.zeros_(conv.bias)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)

    @classmethod
    def options(cls, config) -> dict:
        o = check_options(config, cls.option_defaults)
        for key, low in (("experts", 1), ("skip_tokens", 0)):
            if isinstance(o[key], bool) or not isinstance(o[key], int) or o[key] < low:
                raise ValueError(f"option {key} must be an integer >= {low}, got {o[key]!r}")
        if o["grid"] not in GRIDS:
            raise ValueError(f"option grid must be one of {GRIDS}, got {o['grid']!r}")
        if not isinstance(o["noisy_gating"], bool):
            raise ValueError(f"option noisy_gating must be true or false, got {o['noisy_gating']!r}")
        o["aux_loss_coef"] = positive_float(o["aux_loss_coef"], "aux_loss_coef", allow_zero=True)
        return o

    # --- the mixture of convolution experts ---
    def _to_grid(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(batch, ..., r) -> (batch, r, H, W), and the shape to go back to."""
        if h.dim() == 4:                          # (batch, H, W, r): already a grid
            return h.permute(0, 3, 1, 2), h.shape
        if h.dim() != 3:
            raise ValueError(f"Conv-LoRA expects (batch, tokens, features) or (batch, H, W, features) inputs, "
                             f"got shape {tuple(h.shape)}")
        length = h.shape[1]
        if self.grid == "sequence":
            side_h, side_w = 1, length
        else:
            side_h = side_w = math.isqrt(length)
            if side_h * side_w != length:
                raise ValueError(
                    f"Conv-LoRA (grid='image') lays the {length} tokens out as a square image grid, but {length} is "
                    f"not a square{' after skip_tokens' if self.skip_tokens else ''}; set skip_tokens to the number "
                    "of leading non-patch tokens, or grid='sequence' for a bidirectional 1 x L token strip")
        return h.transpose(1, 2).reshape(h.shape[0], -1, side_h, side_w), h.shape

    def _route(self, pooled: torch.Tensor) -> torch.Tensor:
        """Top-1 expert per image, and the load-balancing loss (kept in `last_aux_loss` while training)."""
        clean = pooled @ self.w_gate.to(pooled.dtype)
        noisy = self.noisy_gating and self.training and self.experts > 1
        if noisy:
            noise_std = F.softplus(pooled @ self.w_noise.to(pooled.dtype)) + 0.01
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        chosen = logits.argmax(dim=-1)
        if self.training:
            gates = F.one_hot(chosen, self.experts).to(logits.dtype)   # softmax over the top-1 logit is 1
            if noisy:   # P(expert i stays in the top 1 under new noise): differentiable load estimate
                top2 = logits.topk(2, dim=-1).values
                is_in = logits > top2[:, 1:2]
                normal = torch.distributions.Normal(0.0, 1.0)
                prob = torch.where(is_in, normal.cdf((clean - top2[:, 1:2]) / noise_std),
                                   normal.cdf((clean - top2[:, 0:1]) / noise_std))
                load = prob.sum(0)
            else:
                load = gates.sum(0)
            self.last_aux_loss = cv_squared(gates.sum(0)) + cv_squared(load)
        return chosen

    def _experts(self, h: torch.Tensor) -> torch.Tensor:
        """E_e(h) for h (batch, r, H, W), each image through its routed expert."""
        height, width = h.shape[-2:]
        chosen = self._route(h.mean(dim=(-2, -1)))
        out = torch.zeros_like(h)
        for i in chosen.unique().tolist():
            rows = (chosen == i).nonzero().flatten()
            z, factor = h.index_select(0, rows), i + 1
            if factor != 1:
                z = F.interpolate(z, scale_factor=factor, mode="bicubic")
            z = F.gelu(self.convs[i](z))
            if factor != 1:
                z = F.interpolate(z, size=(height, width), mode="bicubic")
            out = out.index_copy(0, rows, z)
        return out

    # --- the math ---
    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = x @ self.lora_A.t()
        skip = self.skip_tokens if h.dim() == 3 else 0
        grid, shape = self._to_grid(h[:, skip:] if skip else h)
        mixed = grid + self._experts(grid)
        if h.dim() == 4:
            mixed = mixed.permute(0, 2, 3, 1)
        else:
            mixed = mixed.reshape(shape[0], shape[2], -1).transpose(1, 2)
            if skip:
                mixed = torch.cat([h[:, :skip], mixed], dim=1)
        return (mixed @ self.lora_B.t() * self.scale).to(base_out.dtype)

    @classmethod
    def aux_loss(cls, model, name: str) -> torch.Tensor | float:
        """aux_loss_coef x Σ over layers of the load-balancing loss of the last training forward."""
        losses = [layer.adapters[name].last_aux_loss for layer in model.adapted_layers(name).values()
                  if layer.adapters[name].last_aux_loss is not None]
        coef = cls.options(model.configs[name])["aux_loss_coef"]
        return coef * torch.stack(losses).sum() if losses else 0.0

    def merge(self, spec: LayerSpec, weight: float, base_weight: torch.Tensor | None = None) -> None:
        raise TypeError("Conv-LoRA is not mergeable: its convolution experts are non-linear and mix "
                        "neighbouring tokens, so its update is not a weight delta; serve it unmerged")

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        out = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B,
               "lora_moe_gating.w_gate": self.w_gate, "lora_moe_gating.w_noise": self.w_noise}
        for i, conv in enumerate(self.convs):
            out[f"lora_moe_experts.{i}.weight"] = conv.weight
            out[f"lora_moe_experts.{i}.bias"] = conv.bias
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, experts={self.experts}, grid={self.grid!r}, skip_tokens={self.skip_tokens}"
