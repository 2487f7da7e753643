"""Bone (Kang 2024, "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for
Large Language Models", arXiv 2409.15371; renamed MiSS, "Matrix Shard Sharing", in later versions
and in PEFT 0.21, whose files it reads and writes: peft_type "MISS", key `miss_block`).

The weight is cut into r x r blocks W_ij (i over d_out / r row blocks, j over d_in / r column blocks).
Option `variant`:
  "bat" (Bone, block affine, the default): one trainable r x r matrix B_i per row block, guided by
      the weight it updates ("weight guide"):
          ΔW_ij = W_ij B_i + B_i,        y = W x + ΔW x.
      Needs r | d_in and r | d_out. Parameters: (d_out / r) · r² = d_out · r.
  "balance" (MiSS's default): one trainable D (r x d_out) shared by every column block:
          ΔW[o, j] = D[j mod r, o],      i.e. ΔW x = Dᵀ Σ_j x_j (the input cut into r-blocks, the last
      one zero-padded). Parameters: r · d_out.
  "mini": as "balance" with D's columns repeated from a smaller D_mini (r x mini_r):
          D[k, o] = D_mini[k, o mod mini_r].  Needs mini_r | d_out. Parameters: r · mini_r.
All start at zero (the identity adapter) and are mergeable; "bat"'s update depends on the base
weight, so it is merged from the bare base weight and the exact update is kept for `unmerge`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options

VARIANTS = ("bat", "balance", "mini")


def block_affine_update(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Bone's ΔW: ΔW_ij = W_ij B_i + B_i for W (d_out x d_in) and B (d_out/r x r x r)."""
    n_out, r, _ = blocks.shape
    w = weight.reshape(n_out, r, -1, r)                                   # [i, a, j, b] = W[i r + a, j r + b]
    update = torch.einsum("iajb,ibc->iajc", w, blocks) + blocks[:, :, None, :]
    return update.reshape(weight.shape)


@register
class BoneAdapter(Adapter):
    """Bone / MiSS: block-affine (ΔW_ij = W_ij B_i + B_i) or shard-shared (ΔW[:, j] = D[j mod r]ᵀ) updates."""

    method = "bone"
    paper = ("Kang 2024, Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large "
             "Language Models (arXiv 2409.15371)")
    serving_form = "merged only"
    peft_type = "MISS"
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"variant": "bat", "mini_r": 1}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        o = self.options(config)
        init = check_init(config, ("kaiming", "zeros", "random"))
        self.variant, self.mini_r = o["variant"], o["mini_r"]
        d_in, d_out = spec.in_features, spec.out_features
        if r > d_in:
            raise ValueError(f"r={r} must not exceed in_features={d_in}")
        if self.variant == "bat" and (d_in % r or d_out % r):
            raise ValueError(f"variant 'bat' cuts the weight into r x r blocks: r={r} must divide d_in={d_in} "
                             f"and d_out={d_out}; pick another r or variant 'balance'")
        if self.variant == "mini" and d_out % self.mini_r:
            raise ValueError(f"variant 'mini' needs mini_r={self.mini_r} to divide d_out={d_out}")
        shape = {"bat": (d_out // r, r, r), "balance": (r, d_out), "mini": (r, self.mini_r)}[self.variant]
        value = torch.zeros(shape)
        if init == "random":  # a non-trivial adapter, for tests
            value = torch.empty(shape).uniform_(-1, 1) / math.sqrt(shape[-2])
        self.d_out = d_out
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.miss_block = nn.Parameter(value.to(device=spec.base.weight.device, dtype=config.torch_dtype))

    @classmethod
    def options(cls, config) -> dict:
        o = check_options(config, cls.option_defaults)
        if o["variant"] not in VARIANTS:
            raise ValueError(f"option variant must be one of {VARIANTS}, got {o['variant']!r}")
        if isinstance(o["mini_r"], bool) or not isinstance(o["mini_r"], int) or o["mini_r"] < 1:
            raise ValueError(f"option mini_r must be a positive integer, got {o['mini_r']!r}")
        return o

    # --- the math ---
    def shared_shard(self) -> torch.Tensor:
        """D (r x d_out) of the "balance" / "mini" variants."""
        if self.variant == "mini":
            return self.miss_block.repeat(1, self.d_out // self.mini_r)
        return self.miss_block

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.miss_block.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        if self.variant == "bat":
            update = block_affine_update(spec.weight.detach().to(x.dtype), self.miss_block)
            return (x @ update.t()).to(base_out.dtype)
        r = self.r
        pad = -x.shape[-1] % r
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], dim=-1)
        summed = x.reshape(*x.shape[:-1], -1, r).sum(dim=-2)                   # Σ_j x_j, (..., r)
        return (summed @ self.shared_shard()).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        return self._delta_weight(spec.weight.float())

    def _delta_weight(self, base: torch.Tensor) -> torch.Tensor:
        if self.variant == "bat":
            return block_affine_update(base, self.miss_block.float())
        d_in = base.shape[1]
        columns = torch.arange(d_in, device=base.device) % self.r
        return self.shared_shard().float()[columns].t()                        # ΔW[o, j] = D[j mod r, o]

    def merge(self, spec: LayerSpec, weight: float, base_weight: torch.Tensor | None = None) -> None:
        w = spec.weight
        update = weight * self._delta_weight(w.float() if base_weight is None else base_weight)
        self._merged_update = update       # "bat" depends on W: unmerge must subtract exactly this
        w.data += update.to(w.dtype)

    def unmerge(self, spec: LayerSpec, weight: float) -> None:
        w = spec.weight
        w.data -= self._merged_update.to(w.dtype)
        del self._merged_update

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"miss_block": self.miss_block}

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        o = cls.options(config)
        init = {"bat": "bat", "mini": "mini", "balance": config.init != "random"}[o["variant"]]
        return {"r": config.r, "mini_r": o["mini_r"], "miss_dropout": config.dropout, "init_weights": init,
                "bias": "miss_only" if config.bias == "lora_only" else config.bias, "exclude_modules": None,
                "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def config_from_peft_fields(cls, data: dict) -> dict:
        for key in ("layers_to_transform", "layers_pattern"):
            if data.get(key) not in (None, [], ""):
                raise ValueError(f"PEFT MiSS option {key}={data[key]!r} is not supported by loraplex")
        init_weights = data.get("init_weights", True)
        variant = init_weights if init_weights in ("bat", "mini") else "balance"
        bias = data.get("bias", "none")
        return {"r": int(data.get("r", 64)), "alpha": float(data.get("r", 64)),
                "dropout": float(data.get("miss_dropout") or 0.0), "targets": data["target_modules"],
                "exclude": data.get("exclude_modules"), "modules_to_save": data.get("modules_to_save") or [],
                "bias": "lora_only" if bias.endswith("_only") else bias,
                "init": "random" if init_weights is False else "kaiming",
                "options": {"variant": variant, "mini_r": int(data.get("mini_r", 1))}}

    def extra_repr(self) -> str:
        return f"r={self.r}, variant={self.variant!r}" + (f", mini_r={self.mini_r}" if self.variant == "mini" else "")
