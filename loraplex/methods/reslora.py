"""ResLoRA (Shi, Huang, Song, Li, Zhang, Huang, Wei, Deng, Sun, Zhang 2024, "ResLoRA: Identity
Residual Mapping in Low-Rank Adaption", arXiv 2402.18039).

Plain LoRA blocks (A: r x d_in kaiming-uniform, B: d_out x r zero, s = alpha / r) with residual paths
between the LoRA blocks of consecutive layers during training. Layer n's predecessor is the adapted
layer of the same type (the same module path once the block indices are replaced by '*', e.g.
`model.layers.*.self_attn.q_proj`) and shape just before it in module order, as the reference code
links its blocks. Option `variant`:

"is" (input shortcut, default; the reference code's res_flag 1):
    training:   y_n = W x_n + s B_n A_n (x_n + x_{n-1}),   x_{n-1} the input of the predecessor
                (x_{n-1} = x_n for the first layer of a chain, as the reference code)
    inference:  y_n = W x_n + (1 + α_n) s B_n A_n x_n,     α_n = ‖x_{n-1}‖ / ‖x_n‖ estimated as the
                ratio of the mean Frobenius norms of the two layers' inputs over the last
                `norm_window` (default 100) training forwards (α = 1 without a predecessor or norms):
                the paper's merge of the shortcut into a plain per-layer weight ("merge based on input").
    The shortcut lives in training mode only (the adapted layer's mode: model.train() / model.eval();
    adapters are created in training mode even on an eval model); in eval mode the adapter is the merged
    form, a plain LoRA with scale (1 + α) s, so merging, mixed batches and `as_lora` are exact with
    respect to the eval-mode model (`merge` and `as_lora` always use this inference form).
"bs" (block shortcut, res_flag 2): the LoRA blocks of the `pre_num` (default 1; -1: all) preceding
    layers of the chain also act on x_n, in training and at inference:
        y_n = W x_n + Σ_{k=0..pre_num} s B_{n-k} A_{n-k} x_n
    exactly mergeable (ΔW_n = Σ s B_{n-k} A_{n-k}, rank ≤ (pre_num + 1) r).
The reference code's middle shortcut (res_flag 3, shortcuts between the A outputs) is not implemented.

Trainable parameters per layer: r (d_in + d_out), as LoRA (no extra parameters). The shortcut needs
the predecessor's input of the same forward pass: it is kept on the adapter's shared module (one per
adapter) from the predecessor's forward until the successor takes it, so the same-type layers must
run in module order each pass (activation checkpointing that recomputes single layers is not
supported with "is"; a clear error says so).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options
from loraplex.methods.moslora import uniform

VARIANTS = ("is", "bs")
DEFAULTS = {"variant": "is", "pre_num": 1, "norm_window": 100}


def layer_type(path: str) -> str:
    """The path with its numeric components (block indices) replaced by '*'."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


class ResLoraLinks(nn.Module):
    """The chains of same-type adapted layers of one ResLoRA adapter, and the inputs in flight.

    Holds no tensors to save: its state is the predecessor map (from the layer paths) and, during a
    training forward pass, the inputs that successors have yet to take.
    """

    def __init__(self, specs: dict[str, LayerSpec]) -> None:
        super().__init__()
        last: dict[str, str] = {}
        self.previous: dict[str, str | None] = {}
        for path, spec in specs.items():
            kind = layer_type(path)
            prev = last.get(kind)
            same_shape = prev is not None and (specs[prev].in_features, specs[prev].out_features) == (
                spec.in_features, spec.out_features)
            self.previous[path] = prev if same_shape else None
            last[kind] = path
        self.has_next = {p for p in self.previous.values() if p is not None}
        self.path_of = {id(spec.base): path for path, spec in specs.items()}
        self.members: dict[str, ResLoraAdapter] = {}    # plain dict: adapters are registered on their layers
        self.inputs: dict[str, torch.Tensor] = {}

    def predecessors(self, path: str, count: int) -> list[str]:
        """Up to `count` (-1: all) preceding layers of the chain, nearest first."""
        out, prev = [], self.previous[path]
        while prev is not None and (count < 0 or len(out) < count):
            out.append(prev)
            prev = self.previous[prev]
        return out

    def to_peft(self) -> dict[str, torch.Tensor]:
        return {}

    def from_peft(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        return []

    def extra_repr(self) -> str:
        return f"layers={len(self.previous)}, linked={len(self.has_next)}"


@register
class ResLoraAdapter(Adapter):
    """ResLoRA: LoRA blocks with residual paths to the previous same-type block (input or block shortcut)."""

    method = "reslora"
    paper = ("Shi, Huang, Song, Li, Zhang, Huang, Wei, Deng, Sun, Zhang 2024, ResLoRA: Identity Residual "
             "Mapping in Low-Rank Adaption (arXiv 2402.18039)")
    serving_form = "low-rank after conversion"
    peft_type = "RESLORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    @classmethod
    def build_shared(cls, config, specs: dict[str, LayerSpec]) -> nn.Module:
        return ResLoraLinks(specs)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config, shared: ResLoraLinks) -> None:
        super().__init__(spec, r, alpha, config, shared)
        options = check_options(config, DEFAULTS)
        if options["variant"] not in VARIANTS:
            raise ValueError(f"option variant must be 'is' (input shortcut) or 'bs' (block shortcut), "
                             f"got {options['variant']!r}")
        for key, low in (("pre_num", -1), ("norm_window", 1)):
            value = options[key]
            bad = not isinstance(value, int) or isinstance(value, bool) or value < low
            if bad or (key == "pre_num" and value == 0):
                what = "a positive integer or -1 (all)" if key == "pre_num" else "a positive integer"
                raise ValueError(f"option {key} must be {what}, got {value!r}")
        init = check_init(config, ("kaiming", "gaussian", "random"))
        self.variant, self.pre_num = options["variant"], options["pre_num"]
        self.path = shared.path_of[id(spec.base)]
        shared.members[self.path] = self
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        d_in, d_out = spec.in_features, spec.out_features
        a = torch.randn(r, d_in) / r if init == "gaussian" else uniform((r, d_in), 1 / math.sqrt(d_in))
        b = uniform((d_out, r), 1 / math.sqrt(r)) if init == "random" else torch.zeros(d_out, r)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))
        if self.variant == "is":
            # Frobenius norms of this layer's recent training inputs (a ring buffer) and how many were seen.
            self.register_buffer("reslora_input_norms", torch.zeros(options["norm_window"], device=device))
            self.register_buffer("reslora_input_count", torch.zeros((), dtype=torch.long, device=device))

    # --- the chain ---
    def _previous(self) -> ResLoraAdapter | None:
        prev = self.shared.previous[self.path]
        return None if prev is None else self.shared.members[prev]

    def mean_input_norm(self) -> torch.Tensor:
        """Mean Frobenius norm of the recorded training inputs (0 when none were recorded)."""
        n = int(min(self.reslora_input_count.item(), self.reslora_input_norms.numel()))
        return self.reslora_input_norms[:n].float().mean() if n else torch.zeros((), device=self.lora_A.device)

    def shortcut_ratio(self) -> float:
        """α: ‖x_{n-1}‖ / ‖x_n‖ from the recorded norms; 1 without a predecessor or without norms."""
        prev = self._previous()
        if prev is None:
            return 1.0
        own, before = float(self.mean_input_norm()), float(prev.mean_input_norm())
        return before / own if own > 0 and before > 0 else 1.0

    def _record_norm(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            window = self.reslora_input_norms.numel()
            self.reslora_input_norms[self.reslora_input_count % window] = x.detach().float().norm()
            self.reslora_input_count += 1

    def _low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        return (x @ a.t()) @ b.t() * scale

    # --- the math ---
    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        if self.variant == "bs":
            xd = x if self.dropout is None else self.dropout(x)
            out = self._low_rank(xd, self.lora_A, self.lora_B, self.scale)
            for path in self.shared.predecessors(self.path, self.pre_num):
                other = self.shared.members[path]
                out = out + self._low_rank(xd, other.lora_A.to(x.dtype), other.lora_B.to(x.dtype), other.scale)
            return out.to(base_out.dtype)
        if not spec.base.training:     # the merged inference form (the mode of the layer, i.e. of the model)
            return self._low_rank(x, self.lora_A, self.lora_B, (1 + self.shortcut_ratio()) * self.scale
                                  ).to(base_out.dtype)
        prev = self.shared.previous[self.path]
        if prev is None:
            x_prev = x
        else:
            x_prev = self.shared.inputs.pop(prev, None)
            if x_prev is None or x_prev.shape != x.shape:
                raise RuntimeError(
                    f"ResLoRA (input shortcut): layer {self.path} needs the input of its predecessor {prev} from "
                    "the same forward pass, but it did not run first (same-type layers must run in module order; "
                    "activation checkpointing that recomputes single layers is not supported). Use "
                    "variant='bs', or evaluate in eval mode")
            x_prev = x_prev.to(x.dtype)
        if self.path in self.shared.has_next:
            self.shared.inputs[self.path] = x
        self._record_norm(x)
        shortcut = x + x_prev
        if self.dropout is not None:
            shortcut = self.dropout(shortcut)
        return self._low_rank(shortcut, self.lora_A, self.lora_B, self.scale).to(base_out.dtype)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with B A = this layer's weight change in eval mode (scale folded into B), float32."""
        if self.variant == "is":
            return self.lora_A.float(), self.lora_B.float() * ((1 + self.shortcut_ratio()) * self.scale)
        blocks = [self] + [self.shared.members[p] for p in self.shared.predecessors(self.path, self.pre_num)]
        return (torch.cat([m.lora_A.float() for m in blocks]),
                torch.cat([m.lora_B.float() * m.scale for m in blocks], dim=1))

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        a, b = self.lora_factors()
        return b @ a

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_factors()
        return a.detach(), b.detach()

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        out = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
        if self.variant == "is":
            out |= {"reslora_input_norms": self.reslora_input_norms, "reslora_input_count": self.reslora_input_count}
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, variant={self.variant!r}, previous={self.shared.previous[self.path]!r}"
