"""VeRA: one frozen random pair shared by every layer, trainable scaling vectors per layer.

Kopiczko, Blankevoort, Asano 2023, "VeRA: Vector-based Random Matrix Adaptation" (arXiv 2310.11454):
    y = W x + b + Λ_b B Λ_d A x,
    A: r x d_in and B: d_out x r frozen, random, drawn once and shared by all adapted layers;
    d ∈ R^r and b ∈ R^d_out trainable per layer (Λ = diag), d = d_initial (0.1), b = 0 at init.

No alpha / r scale: the vectors carry the scale (as in the paper and PEFT; `alpha` is ignored).
Layers of different shapes share one pair sized for the largest layer, A: r x max d_in and
B: max d_out x r, each layer using the top-left slice A[:, :d_in], B[:d_out, :] (PEFT's rule).
A and B are drawn as PEFT draws them (Kaiming-uniform, bound sqrt(6 / fan_in), from a generator
seeded with `projection_prng_key`, A first), so an adapter saved without its projection
(`save_projection=False`) loads on either side. Files are PEFT's: per layer `vera_lambda_b`,
`vera_lambda_d`; the pair once at `base_model.vera_A` / `base_model.vera_B`.

This module also holds the small helpers shared by the other cross-layer sharing methods
(`tied_lora`, `vb_lora`, `mos`): option checking and grouping of layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register

SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"


# --------------------------------------------------------------------------- helpers (shared family)
def check_options(config, defaults: dict[str, object]) -> dict[str, object]:
    """`config.options` over `defaults`; an unknown key raises a ValueError naming the allowed ones."""
    options = dict(config.options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"method {config.method!r} does not take option(s) {', '.join(unknown)}; "
                         f"it takes: {', '.join(sorted(defaults)) or '(none)'}")
    return {**defaults, **options}


def int_option(options: dict, key: str, minimum: int = 1) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"option {key} must be an integer >= {minimum}, got {value!r}")
    return value


def float_option(options: dict, key: str, positive: bool = True) -> float:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise ValueError(f"option {key} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return float(value)


def bool_option(options: dict, key: str) -> bool:
    value = options[key]
    if not isinstance(value, bool):
        raise ValueError(f"option {key} must be true or false, got {value!r}")
    return value


def check_init(config, allowed: tuple[str, ...]) -> str:
    if config.init not in allowed:
        raise ValueError(f"init must be one of {allowed} for method {config.method!r}, got {config.init!r}")
    return config.init


def check_uniform_rank(config, r: int) -> None:
    """Shared tensors have one rank: per-layer ranks (`rank_pattern`) cannot apply."""
    if r != config.r:
        raise ValueError(f"method {config.method!r} shares its factors across layers, so every layer has rank "
                         f"r={config.r}; rank_pattern (here r={r}) is not supported")


def layer_group(path: str, spec: LayerSpec, tie: str) -> str:
    """The name of the group of layers that share tensors: by module name and shape, or by shape only."""
    shape = f"{spec.out_features}x{spec.in_features}"
    return shape if tie == "shape" else f"{path.rsplit('.', 1)[-1]}_{shape}"


def group_layers(specs: dict[str, LayerSpec], tie: str) -> dict[str, list[LayerSpec]]:
    """Layers grouped by `layer_group`, in model order (the order fixes each layer's index in its group)."""
    groups: dict[str, list[LayerSpec]] = {}
    for path, spec in specs.items():
        groups.setdefault(layer_group(path, spec, tie), []).append(spec)
    return groups


def peft_bias(config, suffix: str) -> str:
    return f"{suffix}_only" if config.bias == "lora_only" else config.bias


def bias_from_peft(data: dict) -> str:
    bias = str(data.get("bias", "none"))
    return "lora_only" if bias.endswith("_only") else bias


def refuse_peft_options(data: dict, what: str, keys=("layers_to_transform", "layers_pattern")) -> None:
    for key in keys:
        if data.get(key) not in (None, [], "", {}):
            raise ValueError(f"PEFT {what} option {key}={data[key]!r} is not supported by loraplex")


def take_shared(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor], where: str = "") -> set[str]:
    """Copy the shared tensors `own` (keyed by their exact on-disk keys) from `tensors`; shapes must fit."""
    missing = sorted(k for k in own if k not in tensors)
    if missing:
        raise KeyError(f"missing key(s) {', '.join(missing)}{where}")
    for key, target in own.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise ValueError(f"{key}: saved shape {tuple(tensors[key].shape)} does not fit the model, "
                             f"which needs {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(tensors[key])
    return set(own)


# --------------------------------------------------------------------------- VeRA
def peft_kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's draw of VeRA's projections: U(-bound, bound), bound = sqrt(3) · sqrt(2) / sqrt(fan_in)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """The frozen random pair shared by all layers of one VeRA adapter (buffers: never trained)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, save_projection: bool) -> None:
        super().__init__()
        self.register_buffer("vera_A", a)
        self.register_buffer("vera_B", b)
        self.save_projection = save_projection

    def to_peft(self) -> dict[str, torch.Tensor]:
        return {SHARED_A: self.vera_A, SHARED_B: self.vera_B} if self.save_projection else {}

    def from_peft(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        """Take the pair from a file; without it (`save_projection=False`) the pair drawn from
        `projection_prng_key` is kept, as PEFT does."""
        present = [k for k in (SHARED_A, SHARED_B) if k in tensors]
        if not present and not self.save_projection:
            return set()
        return take_shared(tensors, {SHARED_A: self.vera_A, SHARED_B: self.vera_B},
                           " (the shared VeRA projection; files saved with save_projection=False lack it)")

    def extra_repr(self) -> str:
        return f"A={tuple(self.vera_A.shape)}, B={tuple(self.vera_B.shape)}"


@register
class VeraAdapter(Adapter):
    """VeRA: y = W x + b + Λ_b B Λ_d A x, A and B frozen random and shared, b and d trainable."""

    method = "vera"
    paper = ("Kopiczko, Blankevoort, Asano 2023, VeRA: Vector-based Random Matrix Adaptation "
             "(arXiv 2310.11454)")
    serving_form = "low-rank"
    peft_type = "VERA"
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"projection_prng_key": 0, "save_projection": True, "d_initial": 0.1}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config, shared: VeraProjection | None = None) -> None:
        super().__init__(spec, r, alpha, config, shared)
        options = self.options(config)
        init = check_init(config, ("kaiming", "random"))
        check_uniform_rank(config, r)
        if shared is None:
            raise ValueError("VeRA needs the shared projection (build_shared)")
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        if init == "random":  # a non-trivial adapter (tests); PEFT's init_weights=False draws d ~ N(0, 1)
            b, d = torch.randn(spec.out_features), torch.randn(r)
        else:
            b, d = torch.zeros(spec.out_features), torch.full((r,), options["d_initial"])
        self.vera_lambda_b = nn.Parameter(b.to(device=device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(d.to(device=device, dtype=dtype))

    @classmethod
    def options(cls, config) -> dict:
        options = check_options(config, cls.option_defaults)
        int_option(options, "projection_prng_key", minimum=0)
        bool_option(options, "save_projection")
        float_option(options, "d_initial", positive=False)
        return options

    @classmethod
    def build_shared(cls, config, specs: dict[str, LayerSpec]) -> VeraProjection:
        options = cls.options(config)
        if not specs:
            raise ValueError("VeRA found no layer to adapt")
        d_in = max(s.in_features for s in specs.values())
        d_out = max(s.out_features for s in specs.values())
        generator = torch.Generator(device="cpu").manual_seed(options["projection_prng_key"])
        a = peft_kaiming_uniform((config.r, d_in), generator)
        b = peft_kaiming_uniform((d_out, config.r), generator)
        device = next(iter(specs.values())).base.weight.device
        return VeraProjection(a.to(device=device, dtype=config.torch_dtype),
                              b.to(device=device, dtype=config.torch_dtype), options["save_projection"])

    # --- the math ---
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared pair: A[:, :d_in] (r x d_in) and B[:d_out, :] (d_out x r)."""
        return self.shared.vera_A[:, : self.in_features], self.shared.vera_B[: self.out_features, :]

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        a, b = self.factors()
        x = x.to(self.vera_lambda_d.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = (x @ a.t()) * self.vera_lambda_d          # Λ_d A x
        return ((h @ b.t()) * self.vera_lambda_b).to(base_out.dtype)   # Λ_b B (Λ_d A x)

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors()
        return (self.vera_lambda_d.detach().float()[:, None] * a.float(),
                self.vera_lambda_b.detach().float()[:, None] * b.float())

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        a, b = self.factors()
        return (self.vera_lambda_b.float()[:, None] * b.float()) @ (self.vera_lambda_d.float()[:, None] * a.float())

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        o = cls.options(config)
        return {"r": config.r, "projection_prng_key": o["projection_prng_key"],
                "save_projection": o["save_projection"], "vera_dropout": config.dropout,
                "d_initial": o["d_initial"], "fan_in_fan_out": False, "bias": peft_bias(config, "vera"),
                "init_weights": config.init != "random", "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def config_from_peft_fields(cls, data: dict) -> dict:
        refuse_peft_options(data, "VeRA")
        if data.get("target_modules") is None:
            raise ValueError("target_modules is missing")
        options = {"projection_prng_key": int(data.get("projection_prng_key", 0)),
                   "save_projection": bool(data.get("save_projection", True)),
                   "d_initial": float(data.get("d_initial", 0.1))}
        return {"r": int(data.get("r", 256)), "dropout": float(data.get("vera_dropout") or 0.0),
                "targets": data["target_modules"], "modules_to_save": data.get("modules_to_save") or [],
                "bias": bias_from_peft(data), "init": "kaiming" if data.get("init_weights", True) else "random",
                "options": options}

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}"
