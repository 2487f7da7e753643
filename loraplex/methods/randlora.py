"""RandLoRA (Albert et al. 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
arXiv 2502.00987), in PEFT's form so files move both ways (peft_type "RANDLORA").

A full-rank ΔW as a sum of n = ceil(min(d_in, d_out) / r) fixed random rank-r products, each scaled
by trainable diagonals:
    ΔW = s · Σ_{k=1..n} B_k Λ_k A Γ_k          (written for d_out ≥ d_in; transposed otherwise)
with frozen random B_k (max(d_in, d_out) x r) and A (r x min(d_in, d_out)), trainable diagonal
Λ_k (r x r, the vector λ_k, zero at the start) and Γ_k (min x min, the vector γ_k, 1/min at the
start), s = alpha / r. Trainable parameters per layer: n·r + n·min(d_in, d_out).

The random bases are shared by every layer of the adapter (built once in `build_shared`, sized for
the largest adapted layer, each layer using the leading slice), and are drawn as PEFT draws them
from `projection_prng_key`: Kaiming-uniform(a=√5) in bfloat16, A first, then the n blocks of B,
each divided by its standard deviation (`sparse` / `very_sparse`: ternary {-1, 0, 1} entries,
PEFT's sparse projections). They are saved once, under PEFT's keys `base_model.randlora_A` /
`base_model.randlora_B`. PEFT pairs the factors in its own flattening order, reproduced here:
rows of [λ ⊙ A ⊙ γ] are ordered (rank, basis), columns of B are ordered (basis, rank).
Mergeable.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options

SHARED_A, SHARED_B = "base_model.randlora_A", "base_model.randlora_B"


def n_bases(min_dim: int, r: int) -> int:
    """ceil(min_dim / r): enough rank-r terms for a full-rank update."""
    return -(-min_dim // r)


def random_bases(r: int, max_dim: int, min_dim: int, seed: int, sparsity: float | None = None):
    """(A, B) of shapes (r, 1, min_dim) and (max_dim, n, r), as PEFT's RandLoRA draws them."""
    g = torch.Generator().manual_seed(seed)
    n = n_bases(min_dim, r)
    if sparsity is None:
        a = nn.init.kaiming_uniform_(torch.empty(r, 1, min_dim, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)
        b = torch.cat([nn.init.kaiming_uniform_(torch.empty(max_dim, 1, r, dtype=torch.bfloat16), a=math.sqrt(5),
                                                generator=g) for _ in range(n)], dim=1)
    else:
        a, b = torch.rand(r, 1, min_dim, generator=g), torch.rand(max_dim, n, r, generator=g)
        cut = 1 / (2 * sparsity)
        a = torch.where(a < cut, -1.0, torch.where(a > 1 - cut, 1.0, 0.0))
        b = torch.where(b < cut, -1.0, torch.where(b > 1 - cut, 1.0, 0.0))
    return (a / a.std()).float(), (b / b.std()).float()


class RandLoraBases(nn.Module):
    """The frozen random bases shared by all layers of one RandLoRA adapter (buffers: never trained)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("randlora_A", a)
        self.register_buffer("randlora_B", b)

    def to_peft(self) -> dict[str, torch.Tensor]:
        return {SHARED_A: self.randlora_A, SHARED_B: self.randlora_B}

    def from_peft(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        """Take the bases from a file: PEFT writes them once at `base_model.randlora_*` and again under
        every layer (the same tensors); all copies must agree. Absent (PEFT's `save_projection=False`):
        the bases drawn from `projection_prng_key` are kept."""
        taken: set[str] = set()
        for name, own in (("randlora_A", self.randlora_A), ("randlora_B", self.randlora_B)):
            keys = sorted(k for k in tensors if k == f"base_model.{name}" or k.endswith(f".{name}"))
            if not keys:
                continue
            first = tensors[keys[0]]
            for key in keys:
                if tuple(tensors[key].shape) != tuple(own.shape):
                    raise ValueError(f"{key}: saved shape {tuple(tensors[key].shape)} does not fit the model, "
                                     f"which needs {tuple(own.shape)}")
                if not torch.equal(tensors[key], first):
                    raise ValueError(f"{key} differs from {keys[0]}: RandLoRA's random bases are shared by all layers")
            with torch.no_grad():
                own.copy_(first)
            taken |= set(keys)
        return taken


@register
class RandLoraAdapter(Adapter):
    """RandLoRA: ΔW = s·Σ_k B_k Λ_k A Γ_k, fixed shared random bases, trainable diagonals λ_k, γ_k."""

    method = "randlora"
    paper = ("Albert, Zhang, Saratchandran, Rodriguez-Opazo, van den Hengel, Abbasnejad 2025, RandLoRA: "
             "Full-rank parameter-efficient fine-tuning of large models (arXiv 2502.00987)")
    serving_form = "merged only"
    peft_type = "RANDLORA"
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"projection_prng_key": 0, "sparse": False, "very_sparse": False}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config, shared: RandLoraBases | None = None) -> None:
        super().__init__(spec, r, alpha, config, shared)
        self.options(config)
        init = check_init(config, ("kaiming", "zeros", "random"))
        if r != config.r:
            raise ValueError(f"RandLoRA's random bases are shared by all layers, so every layer needs r={config.r}; "
                             f"drop this layer's rank_pattern entry (r={r})")
        if shared is None:
            raise ValueError("RandLoRA needs the shared random bases (build_shared)")
        self.d_in, self.d_out = spec.in_features, spec.out_features
        self.min_dim, self.max_dim = min(self.d_in, self.d_out), max(self.d_in, self.d_out)
        self.n = n_bases(self.min_dim, r)
        self.scale = alpha / r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if init == "random":   # PEFT's init_weights=False: λ ~ N(0, 1), γ = 1 / max(d_in, d_out)
            lam, gamma = torch.randn(r, self.n), torch.full((self.n, self.min_dim), 1 / self.max_dim)
        else:                  # PEFT's default: λ = 0, γ = 1 / max(n, min_dim)
            lam, gamma = torch.zeros(r, self.n), torch.full((self.n, self.min_dim), 1 / max(self.n, self.min_dim))
        dtype, device = config.torch_dtype, spec.base.weight.device
        self.randlora_lambda = nn.Parameter(lam.to(device=device, dtype=dtype))
        self.randlora_gamma = nn.Parameter(gamma.to(device=device, dtype=dtype))

    @classmethod
    def options(cls, config) -> dict:
        o = check_options(config, cls.option_defaults)
        key = o["projection_prng_key"]
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ValueError(f"option projection_prng_key must be a non-negative integer, got {key!r}")
        for name in ("sparse", "very_sparse"):
            if not isinstance(o[name], bool):
                raise ValueError(f"option {name} must be true or false, got {o[name]!r}")
        return o

    @classmethod
    def build_shared(cls, config, specs: dict[str, LayerSpec]) -> RandLoraBases:
        """Bases for the largest adapted layer: (d_out, d_in) maximised entrywise over the layers, as PEFT."""
        o = cls.options(config)
        d_out = max((s.out_features for s in specs.values()), default=1)
        d_in = max((s.in_features for s in specs.values()), default=1)
        max_dim, min_dim = max(d_out, d_in), min(d_out, d_in)
        sparsity = math.sqrt(min_dim) if o["very_sparse"] else 3 if o["sparse"] else None
        a, b = random_bases(config.r, max_dim, min_dim, o["projection_prng_key"], sparsity)
        device = next((s.base.weight.device for s in specs.values()), torch.device("cpu"))
        return RandLoraBases(a.to(device), b.to(device))

    # --- the math ---
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B̃, Ã): B̃ = [B_1 .. B_n] (max_dim x n·r), Ã = the stacked Λ_k A Γ_k (r·n x min_dim); ΔW ∝ B̃ Ã."""
        dtype = self.randlora_lambda.dtype
        a = self.shared.randlora_A[:, :, : self.min_dim].to(dtype)                         # (r, 1, min)
        b = self.shared.randlora_B[: self.max_dim, : self.n, :].to(dtype)                  # (max, n, r)
        scaled_a = self.randlora_lambda[:, :, None] * a * self.randlora_gamma[None]         # (r, n, min)
        return b.flatten(1), scaled_a.flatten(0, 1)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        b, a = self.factors()
        x = x.to(a.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        # ΔW = s B̃ Ã when d_in is the smaller side, s (B̃ Ã)ᵀ otherwise
        y = (x @ a.t()) @ b.t() if self.d_in == self.min_dim else (x @ b) @ a
        return (y * self.scale).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        b, a = self.factors()
        update = b.float() @ a.float() * self.scale
        return update if self.d_in == self.min_dim else update.t()

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"randlora_lambda": self.randlora_lambda, "randlora_gamma": self.randlora_gamma}

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        o = cls.options(config)
        return {"r": config.r, "randlora_alpha": config.alpha, "randlora_dropout": config.dropout,
                "projection_prng_key": o["projection_prng_key"], "save_projection": True, "sparse": o["sparse"],
                "very_sparse": o["very_sparse"], "init_weights": config.init != "random", "fan_in_fan_out": False,
                "bias": "randlora_only" if config.bias == "lora_only" else config.bias,
                "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def config_from_peft_fields(cls, data: dict) -> dict:
        for key in ("layers_to_transform", "layers_pattern"):
            if data.get(key) not in (None, [], ""):
                raise ValueError(f"PEFT RandLoRA option {key}={data[key]!r} is not supported by loraplex")
        bias = str(data.get("bias", "none"))
        options = {"projection_prng_key": int(data.get("projection_prng_key", 0)),
                   "sparse": bool(data.get("sparse", False)), "very_sparse": bool(data.get("very_sparse", False))}
        return {"r": int(data.get("r", 32)), "alpha": float(data.get("randlora_alpha", 640)),
                "dropout": float(data.get("randlora_dropout") or 0.0), "targets": data["target_modules"],
                "modules_to_save": data.get("modules_to_save") or [],
                "bias": "lora_only" if bias.endswith("_only") else bias,
                "init": "kaiming" if data.get("init_weights", True) else "random", "options": options}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, bases={self.n}, scale={self.scale:.4g}"
