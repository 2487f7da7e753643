"""GLoRA (Chavan, Liu, Gupta, Xing, Shen 2023, "One-for-All: Generalized LoRA for Parameter-Efficient
Fine-tuning", arXiv 2306.07967), in the form of Hugging Face PEFT's `GloraConfig` (peft_type "GLORA"),
with which files are interchangeable.

Learnable scale and shift of the weight and of the bias (the paper's unified formulation
f(x) = (W + W ⊙ A + B) x + C W + D ⊙ b + E + b, as PEFT implements it):
    W' = W + W ⊙ A + B,
    b' = b + b ⊙ D + E + W C,
    y  = W' x + b'     (b, and so C, D, E, only on layers with a bias).
Each of A, B, C, D, E has a chosen structure (options, PEFT's names and defaults):
    config_A_B  "lora" (X_d X_u, d_out x r and r x d_in) | "vector" (d_out x 1, broadcast over
                columns) | "constant" (one scalar) | "none" (zero, no parameters); default "lora"
    config_C    "lora" (X_d X_u, d_in x r and r x 1) | "vector" (d_in x 1) | "none"; default "lora"
    config_D_E  "vector" (d_out) | "constant" | "none"; default "constant"
Trainable parameters per layer: A and B: 2 r (d_out + d_in) | 2 d_out | 2 | 0; with a bias also
C: r (d_in + 1) | d_in | 0, and D and E: 2 d_out | 2 | 0.
Initialisation as PEFT: X_u kaiming-uniform; X_d, vectors and scalars 0 (the identity adapter).
init="random" is PEFT's init_weights=False: X_d and vectors kaiming-uniform, scalars N(0, 0.02²).
There is no scale: alpha is unused.
Mergeable into the weight and the bias (the update depends on the bare base weight and bias). W ⊙ A
is full rank in general, so there is no plain-LoRA form. The paper's per-layer structure search
(an evolutionary search over these choices) is not part of this module: choose the structure with
the options.
Files: `glora_A.Xd`, `glora_A.Xu`, `glora_A.X`, ... as PEFT writes them; PEFT also writes its zero
buffers (`glora_A.zeros`, ...) for disabled parts, and so do we, so each library reads the other's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.hydra import add_to_bias, bare_bias, remove_from_bias
from loraplex.methods.lora_xs import check_init, check_options
from loraplex.methods.moslora import uniform

CHOICES = {"config_A_B": ("lora", "vector", "constant", "none"),
           "config_C": ("lora", "vector", "none"),
           "config_D_E": ("vector", "constant", "none")}
DEFAULTS = {"config_A_B": "lora", "config_C": "lora", "config_D_E": "constant"}
PARTS = ("A", "B", "C", "D", "E")


def _kaiming(shape: tuple[int, ...]) -> torch.Tensor:
    """kaiming_uniform_(a=sqrt(5)) of a tensor of this shape: bound 1/sqrt(fan_in), fan_in = shape[1]."""
    return uniform(shape, 1 / math.sqrt(shape[1]))


class _Part(nn.Module):
    """One of GLoRA's A..E: low-rank (Xd Xu), a vector (X), a scalar (X[0]) or zero (no parameters)."""

    def __init__(self, kind: str, shape: tuple[int, ...], r: int, random: bool, dtype, device) -> None:
        super().__init__()
        self.kind, self.shape = kind, shape
        if kind == "lora":        # shape (rows, cols): Xd rows x r, Xu r x cols
            xd = _kaiming((shape[0], r)) if random else torch.zeros(shape[0], r)
            self.Xd = nn.Parameter(xd.to(device=device, dtype=dtype))
            self.Xu = nn.Parameter(_kaiming((r, shape[1])).to(device=device, dtype=dtype))
        elif kind == "vector":    # a column (rows, 1) or a plain vector (rows,)
            x = torch.zeros(shape)
            if random:
                x = _kaiming(shape if len(shape) == 2 else (1, shape[0])).reshape(shape)
            self.X = nn.Parameter(x.to(device=device, dtype=dtype))
        elif kind == "constant":
            x = torch.randn(1) * 0.02 if random else torch.zeros(1)
            self.X = nn.Parameter(x.to(device=device, dtype=dtype))

    def value(self) -> torch.Tensor | float:
        """The part as a tensor broadcastable to `shape` (float32), or 0.0 when disabled."""
        if self.kind == "lora":
            return self.Xd.float() @ self.Xu.float()
        if self.kind == "vector":
            return self.X.float()
        if self.kind == "constant":
            return self.X.float()[0]
        return 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        """Saved tensors under PEFT's names (disabled parts: PEFT's zero buffer)."""
        if self.kind == "lora":
            return {"Xd": self.Xd, "Xu": self.Xu}
        if self.kind in ("vector", "constant"):
            return {"X": self.X}
        return {"zeros": torch.zeros(self.shape)}


@register
class GloraAdapter(Adapter):
    """GLoRA: W' = W + W ⊙ A + B and b' = b + b ⊙ D + E + W C, structures chosen per part (as PEFT)."""

    method = "glora"
    paper = ("Chavan, Liu, Gupta, Xing, Shen 2023, One-for-All: Generalized LoRA for Parameter-Efficient "
             "Fine-tuning (arXiv 2306.07967)")
    serving_form = "merged only"
    peft_type = "GLORA"
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        options = check_options(config, DEFAULTS)
        for key, allowed in CHOICES.items():
            if options[key] not in allowed:
                raise ValueError(f"option {key} must be one of {allowed}, got {options[key]!r}")
        init = check_init(config, ("kaiming", "random"))
        random = init == "random"
        self.options = {k: options[k] for k in DEFAULTS}
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        d_in, d_out = spec.in_features, spec.out_features
        has_bias = spec.bias is not None
        ab, c, de = options["config_A_B"], options["config_C"], options["config_D_E"]
        ab_shape = {"lora": (d_out, d_in), "vector": (d_out, 1), "constant": (1,), "none": (d_out, d_in)}[ab]
        c_kind = c if has_bias else "none"
        de_kind = de if has_bias else "none"
        parts = {"A": (ab, ab_shape), "B": (ab, ab_shape), "C": (c_kind, (d_in, 1)),
                 "D": (de_kind, (1,) if de_kind == "constant" else (d_out,)),
                 "E": (de_kind, (1,) if de_kind == "constant" else (d_out,))}
        for name in PARTS:
            kind, shape = parts[name]
            setattr(self, f"glora_{name}", _Part(kind, shape, r, random, dtype, device))

    # --- the math ---
    def _weight_update(self, base: torch.Tensor) -> torch.Tensor:
        """W ⊙ A + B from the bare base weight (float32)."""
        a, b = self.glora_A.value(), self.glora_B.value()
        return base * a + b if isinstance(a, torch.Tensor) else torch.zeros_like(base)

    def _bias_update(self, base: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """b ⊙ D + E + W C from the bare base weight and bias (float32); None without a bias."""
        if bias is None:
            return None
        d, e, c = self.glora_D.value(), self.glora_E.value(), self.glora_C.value()
        update = bias * d + e
        if isinstance(c, torch.Tensor):
            update = update + (base @ c).squeeze(-1)
        return update if isinstance(update, torch.Tensor) else torch.zeros_like(bias)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        base = spec.weight.detach().float()
        bias = None if spec.bias is None else spec.bias.detach().float()
        x = x.float()
        if self.dropout is not None:
            x = self.dropout(x)
        out = F.linear(x, self._weight_update(base), self._bias_update(base, bias))
        return out.to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        return self._weight_update(spec.weight.detach().float())

    def merge(self, spec: LayerSpec, weight: float, base_weight: torch.Tensor | None = None) -> None:
        w = spec.weight
        base = w.detach().float() if base_weight is None else base_weight
        db = self._bias_update(base, bare_bias(spec, self))
        self._merged_update = weight * self._weight_update(base)
        w.data += self._merged_update.to(w.dtype)
        if db is not None:
            add_to_bias(spec, self, weight * db)

    def unmerge(self, spec: LayerSpec, weight: float) -> None:
        w = spec.weight
        w.data -= self._merged_update.to(w.dtype)
        del self._merged_update
        if spec.bias is not None:
            remove_from_bias(spec, self)

    # --- files (PEFT's keys) ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {f"glora_{name}.{key}": t for name in PARTS
                for key, t in getattr(self, f"glora_{name}").tensors().items()}

    def from_peft(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """As the base class, but PEFT's zero buffers of disabled parts may be absent, and must be zero."""
        for key in [k for k in self.to_peft() if k.endswith(".zeros")]:
            zeros = tensors.get(key)
            if zeros is not None:
                if zeros.count_nonzero():
                    raise ValueError(f"{where}.{key}: a disabled GLoRA part must be all zeros")
                tensors = {k: v for k, v in tensors.items() if k != key}
        own = {k: v for k, v in self.to_peft().items() if not k.endswith(".zeros")}
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise KeyError(f"{where}: missing key(s) {', '.join(missing)}")
        unexpected = sorted(set(tensors) - set(own))
        if unexpected:
            raise KeyError(f"{where}: unexpected key(s) {', '.join(unexpected)} (the file's GLoRA structure "
                           f"differs from this config's {self.options})")
        for key, target in own.items():
            if tuple(tensors[key].shape) != tuple(target.shape):
                raise ValueError(f"{where}.{key}: saved shape {tuple(tensors[key].shape)} does not fit the model, "
                                 f"which needs {tuple(target.shape)}")
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(tensors[key])

    # --- PEFT configs ---
    @classmethod
    def peft_config_fields(cls, config) -> dict:
        options = {**DEFAULTS, **(config.options or {})}
        bias = {"lora_only": "glora_only"}.get(config.bias, config.bias)
        return {"r": config.r, "bias": bias, "init_weights": config.init != "random",
                **{k: options[k] for k in DEFAULTS}}

    @classmethod
    def config_from_peft_fields(cls, data: dict) -> dict:
        targets = data.get("target_modules")
        if targets is None:
            raise ValueError("target_modules is missing")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        bias = {"glora_only": "lora_only"}.get(data.get("bias", "none"), data.get("bias", "none"))
        return {"r": int(data.get("r", 8)), "targets": targets, "bias": bias,
                "init": "kaiming" if data.get("init_weights", True) else "random",
                "modules_to_save": data.get("modules_to_save") or [],
                "options": {k: data.get(k, DEFAULTS[k]) for k in DEFAULTS}}

    def extra_repr(self) -> str:
        return f"r={self.r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
