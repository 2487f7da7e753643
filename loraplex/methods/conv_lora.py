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
Trainable parameters per layer: r(d_in + d_out) + 2·r·M + M·(9r² + r)  (grid "image" / "sequence").

Token layout (option `grid`): "image" — inputs (batch, H, W, d_in) are used as they are and
(batch, L, d_in) inputs must hold a square grid, L = n_prefix + H·W with H = W, after `skip_tokens`
leading tokens (e.g. a ViT's class token) that only take the plain LoRA path; "sequence" — a
(batch, L, d_in) input is a 1 x L strip (for bidirectional token encoders: the convolution and the
resizing see both neighbours, so it is NOT causal and must not be used in a causal language model);
"causal" — for causal language models, below; "auto" (default) — "causal" when the adapted model is a
causal LM (the core's `LayerSpec.causal_lm`, from `is_causal_lm`: a Hugging Face model that can generate
and has no encoder), "image" otherwise. The saved config keeps "auto", which resolves the same way on
the same model; the experts' saved shapes (Conv1d vs Conv2d) refuse a load onto the other kind.

Grid "causal" is OUR adaptation to causal language models, not in the paper (which is about images).
For h = A x of shape (batch, L, r), with h_s = 0 for s < 0:
    pooled_t = (1 / (t + 1)) · Σ_{s <= t} h_s                  (routing on the cumulative mean),
    e_t = argmax_i (pooled_t · W_gate + noise)_i                (top-1 per token, noise as above),
    u^f_q = h_{floor(q / f)}, u^f_q = 0 for q < 0              (up: nearest neighbour, each token f times),
    c^f_q = b_i + K_i[0] u^f_{q-2} + K_i[1] u^f_{q-1} + K_i[2] u^f_q   (causal Conv1d(r, r, 3), left
                                                                padding only: position q sees q-2..q),
    E_i(h)_t = (1 / f) · Σ_{j < f} GELU(c^f_{t·f + j}),  f = i + 1   (down: mean over the token's block),
    h'_t = h_t + E_{e_t}(h)_t,   y_t = W x_t + s · B h'_t.
Position t depends only on tokens <= t (upsampled positions t·f - 2 .. t·f + f - 1 hold tokens t - 2..t),
so it is computed on that window alone (h_{t-2}, h_{t-1}, h_t upsampled), by its chosen expert only.
Trainable parameters per layer with grid "causal": r(d_in + d_out) + 2·r·M + M·(3r² + r).
The load-balancing loss counts every token of the batch as one routed item.

Padding: `loraplex train`'s batches are RIGHT-padded (`loraplex.data.tokenize.collate`), so padding
comes after every real token and, the layout being causal, never reaches a real token's output (pad
positions do count in the balance loss; their outputs are never supervised). Batched generation
(`loraplex.training.evaluate.generate`, the exact-match evaluation) is LEFT-padded, and no attention mask
reaches an adapted layer: there the pad positions enter the cumulative mean of every token of their row
and the convolution window of its first real token, so a left-padded row's output differs from the
same row run alone. Unpadded rows (batch size 1, or equal-length prompts) are exact. (Handling it needs
the attention mask inside the layers, which the core does not pass; on the standard `dates` run the
held-out exact match was the same, 76.0%, scored in left-padded batches of 50 and one prompt at a time.)

Generation with a KV cache: in eval mode each adapter keeps a small decode state per batch row (the last
two h, the running sum of h and the token count). A call with one token per row and a state of the same
batch size continues the sequence (a KV-cache decode step); any other call (a prompt, a full recompute)
starts a new one and leaves its own state. So a new sequence must not begin with a single-token call
that follows another sequence of the same batch size. Training mode keeps no state.
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

GRIDS = ("auto", "image", "sequence", "causal")


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
    token_wise = False       # the convolutions and the routing see neighbouring tokens
    mergeable = False
    peft_type = "CONV_LORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"experts": 8, "grid": "auto", "skip_tokens": 0, "aux_loss_coef": 0.01,
                                          "noisy_gating": True}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        o = self.options(config)
        init = check_init(config, ("kaiming", "gaussian", "random"))
        self.experts, self.grid, self.skip_tokens = o["experts"], o["grid"], o["skip_tokens"]
        if self.grid == "auto":
            self.grid = "causal" if spec.causal_lm else "image"
        if self.grid == "causal" and self.skip_tokens:
            raise ValueError("Conv-LoRA's causal token layout has no skipped tokens: skip_tokens must be 0 with "
                             "grid='causal' (the default on a causal language model)")
        # eval-mode decode state (see the module docstring): last two h, running sum of h, token count
        self._decode_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
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
            conv = (nn.Conv1d(r, r, kernel_size=3) if self.grid == "causal"      # padded by hand: causal
                    else nn.Conv2d(r, r, kernel_size=3, padding=1)).to(device=device, dtype=dtype)
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
                    "of leading non-patch tokens, or grid='sequence' for a bidirectional 1 x L token strip "
                    "(grid='causal' for a causal language model)")
        return h.transpose(1, 2).reshape(h.shape[0], -1, side_h, side_w), h.shape

    def _route(self, pooled: torch.Tensor) -> torch.Tensor:
        """Top-1 expert per row of `pooled` (one per image, or per token in the causal layout), and the
        load-balancing loss over those rows (kept in `last_aux_loss` while training)."""
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

    # --- the causal token layout ---
    def _causal_mix(self, h: torch.Tensor) -> torch.Tensor:
        """h + E_{e_t}(h)_t for every token t of h (batch, L, r), each token through its routed expert."""
        batch, length, r = h.shape
        state = self._decode_state
        if self.training or length != 1 or state is None or state[0].shape[0] != batch:
            state = (h.new_zeros(batch, 2, r), h.new_zeros(batch, r), h.new_zeros(batch, 1))  # a new sequence
        before, total, count = state
        # routing per token on the mean of the tokens so far
        sums = total[:, None] + h.cumsum(dim=1)
        counts = count[:, None] + torch.arange(1, length + 1, device=h.device, dtype=h.dtype)[None, :, None]
        chosen = self._route((sums / counts).reshape(-1, r))
        # token t's window h_{t-2}, h_{t-1}, h_t: all its upsampled outputs see (zeros before the sequence)
        padded = torch.cat([before.to(h.dtype), h], dim=1)
        windows = padded.unfold(1, 3, 1).reshape(batch * length, r, 3)
        out = h.new_zeros(batch * length, r)
        for i in chosen.unique().tolist():
            rows = (chosen == i).nonzero().flatten()
            factor = i + 1
            # upsample the window by the factor and keep the f + 2 positions that token t's f outputs read
            z = windows.index_select(0, rows).repeat_interleave(factor, dim=-1)[..., -(factor + 2):]
            z = F.gelu(self.convs[i](z))                                    # (tokens, r, f): no padding needed
            out = out.index_copy(0, rows, z.mean(dim=-1).to(out.dtype))     # down: mean over the token's block
        self._decode_state = None if self.training else (padded[:, -2:].detach(), sums[:, -1].detach(),
                                                          counts[:, -1].detach())
        return h + out.view(batch, length, r)

    # --- the math ---
    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = x @ self.lora_A.t()
        if self.grid == "causal":
            if h.dim() != 3:
                raise ValueError(f"Conv-LoRA (grid='causal') expects (batch, tokens, features) inputs, got shape "
                                 f"{tuple(x.shape)}")
            return (self._causal_mix(h) @ self.lora_B.t() * self.scale).to(base_out.dtype)
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
