"""Kronecker-product adapters: LoKr (Yeh et al. 2023, "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", arXiv 2309.14859) and DiffuseKronA (Marjit et al. 2024,
"DiffuseKronA: A Parameter Efficient Fine-tuning Method for Personalized Diffusion Models",
arXiv 2402.17412), in PEFT's LoKr form so files move both ways (peft_type "LOKR").

    ΔW = s · (W₁ ⊗ W₂),     s = alpha / r,
    d_out = a·b and d_in = c·d factored as close to square as possible (or with `decompose_factor`),
    W₁: a x c,  W₂: b x d  (so ΔW[(i·b + k), (j·d + l)] = s · W₁[i, j] · W₂[k, l]).
W₂ is itself low rank, W₂ = W₂ₐ W₂ᵦ (b x r)(r x d), when r < max(b, d)/2; W₁ likewise when
`decompose_both=True` and r < max(a, c)/2 (PEFT's rule, so shapes match its files).
Initialisation (PEFT's `init_weights=True`): W₁ (or W₁ₐ) = 0, the other factors Kaiming-uniform, so
ΔW = 0; init="lycoris" zeroes W₂ (or W₂ᵦ) instead; init="random" leaves none zero (for tests).

The forward never forms ΔW: with X the input reshaped to (c, d), (W₁ ⊗ W₂) x = vec(W₁ X W₂ᵀ).
Training-time regularisers as PEFT: `rank_dropout` drops output rows of ΔW (rescaled by the kept
fraction with `rank_dropout_scale`), `module_dropout` skips the whole adapter. Mergeable.
Trainable parameters: a·c (or r(a + c)) + b·d (or r(b + d)) per layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options, positive_float

INITS = ("kaiming", "lycoris", "zeros", "random")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m · n = dimension, as LyCORIS/PEFT choose them.

    With `factor` > 0 dividing the dimension: (factor, dimension / factor). Otherwise the divisor pair
    (m ≤ n) closest to square whose m does not exceed `factor` (-1: no limit): divisors m = 1, 2, ...
    are tried in turn while the sum m + n does not grow; the result is ordered m ≤ n.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        pair = (candidate, dimension // candidate)
        if sum(pair) > m + n or candidate > limit:
            break
        m, n = pair
    return (n, m) if m > n else (m, n)


def _kaiming(shape: tuple[int, ...]) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=√5): U(-1/√fan_in, 1/√fan_in), fan_in = shape[1]."""
    return torch.empty(shape).uniform_(-1, 1) / math.sqrt(shape[1])


@register
class KronAdapter(Adapter):
    """Kronecker adapter (LoKr): ΔW = s·(W₁ ⊗ W₂), W₂ (and optionally W₁) low-rank."""

    method = "kron"
    paper = ("Yeh, Hsieh, Gao, Yang, Oh, Gong 2023, Navigating Text-To-Image Customization: From LyCORIS "
             "Fine-Tuning to Model Evaluation (arXiv 2309.14859); Marjit, Singh, Mathur, Roy, Mukherjee 2024, "
             "DiffuseKronA (arXiv 2402.17412)")
    serving_form = "merged only"
    peft_type = "LOKR"
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"decompose_both": False, "decompose_factor": -1, "rank_dropout": 0.0,
                                          "module_dropout": 0.0, "rank_dropout_scale": False}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        o = self.options(config)
        init = check_init(config, INITS)
        self.scale = alpha / r
        self.rank_dropout, self.module_dropout = o["rank_dropout"], o["module_dropout"]
        self.rank_dropout_scale = o["rank_dropout_scale"]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        a, b = factorization(spec.out_features, o["decompose_factor"])
        c, d = factorization(spec.in_features, o["decompose_factor"])
        self.out_shape, self.in_shape = (a, b), (c, d)
        dtype, device = config.torch_dtype, spec.base.weight.device
        use_w1 = not (o["decompose_both"] and r < max(a, c) / 2)
        use_w2 = not (r < max(b, d) / 2)
        # W₁ (or W₁ₐ W₁ᵦ) and W₂ (or W₂ₐ W₂ᵦ): PEFT's key names and shapes.
        shapes = ({"lokr_w1": (a, c)} if use_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)})
        shapes |= ({"lokr_w2": (b, d)} if use_w2 else {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)})
        zero = {"kaiming": ("lokr_w1", "lokr_w1_a"), "zeros": ("lokr_w1", "lokr_w1_a"),
                "lycoris": ("lokr_w2", "lokr_w2_b"), "random": ()}[init]
        for key, shape in shapes.items():
            value = torch.zeros(shape) if key in zero else _kaiming(shape)
            setattr(self, key, nn.Parameter(value.to(device=device, dtype=dtype)))
        self.factor_keys = tuple(shapes)

    @classmethod
    def options(cls, config) -> dict:
        o = check_options(config, cls.option_defaults)
        for key in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(o[key], bool):
                raise ValueError(f"option {key} must be true or false, got {o[key]!r}")
        factor = o["decompose_factor"]
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            raise ValueError(f"option decompose_factor must be -1 (closest to square) or a positive integer, "
                             f"got {factor!r}")
        for key in ("rank_dropout", "module_dropout"):
            value = positive_float(o[key], key, allow_zero=True)
            if value >= 1:
                raise ValueError(f"option {key} must satisfy 0 <= {key} < 1, got {value!r}")
            o[key] = value
        return o

    # --- the math ---
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W₁, W₂), each formed from its low-rank pair when it has one."""
        w1 = self.lokr_w1 if "lokr_w1" in self.factor_keys else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if "lokr_w2" in self.factor_keys else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return torch.zeros_like(base_out)
        w1, w2 = self.factors()
        x = x.to(w1.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        blocks = x.reshape(*x.shape[:-1], *self.in_shape)                       # (..., c, d)
        y = (w1 @ blocks @ w2.t()).flatten(-2) * self.scale                     # vec(W₁ X W₂ᵀ)
        if self.training and self.rank_dropout:
            keep = (torch.rand(y.shape[-1], device=y.device) > self.rank_dropout).to(y.dtype)
            if self.rank_dropout_scale:
                keep = keep / keep.mean().clamp_min(1e-12)
            y = y * keep
        return y.to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        w1, w2 = self.factors()
        return torch.kron(w1.float(), w2.float()) * self.scale

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in self.factor_keys}

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        o = cls.options(config)
        init = {"kaiming": True, "zeros": True, "lycoris": "lycoris", "random": False}.get(config.init, True)
        return {"r": config.r, "alpha": config.alpha, "rank_pattern": config.rank_pattern,
                "alpha_pattern": config.alpha_pattern, "rank_dropout": o["rank_dropout"],
                "module_dropout": o["module_dropout"], "rank_dropout_scale": o["rank_dropout_scale"],
                "decompose_both": o["decompose_both"], "decompose_factor": o["decompose_factor"],
                "use_effective_conv2d": False, "init_weights": init, "exclude_modules": None,
                "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def config_from_peft_fields(cls, data: dict) -> dict:
        for key in ("layers_to_transform", "layers_pattern"):
            if data.get(key) not in (None, [], ""):
                raise ValueError(f"PEFT LoKr option {key}={data[key]!r} is not supported by loraplex")
        options = {key: data[key] for key in cls.option_defaults if data.get(key) is not None}
        init = {True: "kaiming", "lycoris": "lycoris", False: "random"}.get(data.get("init_weights", True), "kaiming")
        return {"r": int(data.get("r", 8)), "alpha": float(data.get("alpha", 8)), "targets": data["target_modules"],
                "exclude": data.get("exclude_modules"), "rank_pattern": data.get("rank_pattern") or {},
                "alpha_pattern": data.get("alpha_pattern") or {}, "init": init,
                "modules_to_save": data.get("modules_to_save") or [], "options": options}

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, out={self.out_shape[0]}x{self.out_shape[1]}, "
                f"in={self.in_shape[0]}x{self.in_shape[1]}, factors={list(self.factor_keys)}")
