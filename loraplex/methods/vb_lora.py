"""VB-LoRA: every sub-vector of every A and B is a top-k admixture of one shared vector bank.

Li, Han, Ji 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks"
(arXiv 2405.15179):
    y = W x + b + B A x,
    bank V: h x b (h = num_vectors vectors of length b = vector_length), shared by all layers;
    A (r x d_in) is cut into r · d_in/b sub-vectors and B (d_out x r) into r · d_out/b, each
        a_ij = Σ_{k ∈ topk(l_ij)} softmax(l_ij restricted to its top k)_k · V_k,
    with trainable logits l_ij ∈ R^h per sub-vector. A's row i is the concatenation of its d_in/b
    sub-vectors; B's column i is the concatenation of its d_out/b sub-vectors.
No alpha / r scale (as the paper and PEFT; `alpha` is ignored). Init as PEFT: V ~ U(-0.02, 0.02)
(`init_vector_bank_bound`), logits ~ N(0, 0.1²) (`init_logits_std`), so the adapter does not start
exactly at the identity (it starts small). Every layer dimension must be a multiple of b.

Files are PEFT's: per layer `vblora_logits_A` (r, d_in/b, h) and `vblora_logits_B` (d_out/b, r, h),
or with `save_only_topk_weights` their top-k indices and first k-1 softmax weights
(`vblora_logits_A_topk_indices` / `_topk_weights`); the bank once at `base_model.vblora_vector_bank`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.vera import (
    bias_from_peft,
    bool_option,
    check_init,
    check_options,
    check_uniform_rank,
    float_option,
    int_option,
    peft_bias,
    refuse_peft_options,
    take_shared,
)

BANK = "base_model.vblora_vector_bank"


def index_dtype(num_vectors: int) -> torch.dtype:
    """PEFT's dtype for saved top-k indices: the smallest that holds them."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    return torch.int32 if num_vectors < 2**31 else torch.int64


class VectorBank(nn.Module):
    """The trainable vector bank shared by all layers of one VB-LoRA adapter."""

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        self.vblora_vector_bank = nn.Parameter(bank)

    def to_peft(self) -> dict[str, torch.Tensor]:
        return {BANK: self.vblora_vector_bank}

    def from_peft(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        return take_shared(tensors, self.to_peft(), " (VB-LoRA's vector bank)")


@register
class VBLoraAdapter(Adapter):
    """VB-LoRA: y = W x + b + B A x, A and B composed of top-k admixtures of a shared vector bank."""

    method = "vb-lora"
    paper = ("Li, Han, Ji 2024, VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks "
             "(arXiv 2405.15179)")
    serving_form = "low-rank"
    peft_type = "VBLORA"
    kinds = (LINEAR, GPT2_CONV1D)
    # vector_length must divide every adapted dimension: 64 divides those of SmolLM2 (576, 192, 1536) and
    # of most transformers (multiples of the 64-wide head); PEFT's default is 256.
    option_defaults: dict[str, object] = {"num_vectors": 256, "vector_length": 64, "topk": 2,
                                          "init_vector_bank_bound": 0.02, "init_logits_std": 0.1,
                                          "save_only_topk_weights": False}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config, shared: VectorBank | None = None) -> None:
        super().__init__(spec, r, alpha, config, shared)
        o = self.options(config)
        init = check_init(config, ("kaiming", "random"))
        check_uniform_rank(config, r)
        if shared is None:
            raise ValueError("VB-LoRA needs the shared vector bank (build_shared)")
        length, h = o["vector_length"], o["num_vectors"]
        _check_divisible(spec, length)
        self.topk, self.num_vectors, self.save_only_topk = o["topk"], h, o["save_only_topk_weights"]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        std = 1.0 if init == "random" else o["init_logits_std"]
        self.vblora_logits_A = nn.Parameter(
            torch.randn(r, spec.in_features // length, h).mul_(std).to(device=device, dtype=dtype))
        self.vblora_logits_B = nn.Parameter(
            torch.randn(spec.out_features // length, r, h).mul_(std).to(device=device, dtype=dtype))

    @classmethod
    def options(cls, config) -> dict:
        o = check_options(config, cls.option_defaults)
        for key in ("num_vectors", "vector_length", "topk"):
            int_option(o, key)
        if o["topk"] > o["num_vectors"]:
            raise ValueError(f"option topk ({o['topk']}) cannot exceed num_vectors ({o['num_vectors']})")
        float_option(o, "init_vector_bank_bound")
        float_option(o, "init_logits_std")
        bool_option(o, "save_only_topk_weights")
        return o

    @classmethod
    def build_shared(cls, config, specs: dict[str, LayerSpec]) -> VectorBank:
        o = cls.options(config)
        check_init(config, ("kaiming", "random"))
        if not specs:
            raise ValueError("VB-LoRA found no layer to adapt")
        dims = {d for s in specs.values() for d in (s.in_features, s.out_features)}
        if any(d % o["vector_length"] for d in dims):
            raise ValueError(f"VB-LoRA cuts every A and B into sub-vectors of vector_length={o['vector_length']}, "
                             f"which must divide every adapted layer's dimensions {sorted(dims)}; "
                             f"the largest that does is {math.gcd(*dims)}")
        bound = o["init_vector_bank_bound"]
        bank = torch.empty(o["num_vectors"], o["vector_length"]).uniform_(-bound, bound)
        device = next(iter(specs.values())).base.weight.device
        return VectorBank(bank.to(device=device, dtype=config.torch_dtype))

    # --- the math ---
    def _admix(self, logits: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Σ over the top-k logits of softmax(top-k) · bank vector, for every sub-vector: (..., b)."""
        top, idx = logits.topk(self.topk, dim=-1)
        return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r x d_in) and B (d_out x r) composed from the bank."""
        logits_a, logits_b, bank = self.vblora_logits_A, self.vblora_logits_B, self.shared.vblora_vector_bank
        if dtype is not None:
            logits_a, logits_b, bank = logits_a.to(dtype), logits_b.to(dtype), bank.to(dtype)
        a = self._admix(logits_a, bank).reshape(logits_a.shape[0], -1)                  # (r, d_in/b, b) -> (r, d_in)
        b = self._admix(logits_b, bank).transpose(1, 2).reshape(-1, logits_b.shape[1])  # (d_out/b, b, r) -> (d_out, r)
        return a, b

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        a, b = self.factors()
        x = x.to(a.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return ((x @ a.t()) @ b.t()).to(base_out.dtype)

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.factors(torch.float32)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        a, b = self.factors(torch.float32)
        return b @ a

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        if not self.save_only_topk:
            return {"vblora_logits_A": self.vblora_logits_A, "vblora_logits_B": self.vblora_logits_B}
        out = {}
        for name in ("vblora_logits_A", "vblora_logits_B"):
            logits = getattr(self, name).detach()
            top, idx = logits.topk(self.topk, dim=-1)
            out[f"{name}_topk_indices"] = idx.to(index_dtype(self.num_vectors))
            out[f"{name}_topk_weights"] = torch.softmax(top, dim=-1)[..., :-1].contiguous()
        return out

    def from_peft(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if not self.save_only_topk:
            return super().from_peft(tensors, where)
        # Only the top-k survive: logits = log(weights) at the saved indices, -inf elsewhere (as PEFT).
        own = self.to_peft()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise KeyError(f"{where}: missing key(s) {', '.join(missing)}")
        logits = {}
        for name in ("vblora_logits_A", "vblora_logits_B"):
            idx, w = tensors[f"{name}_topk_indices"], tensors[f"{name}_topk_weights"]
            target = getattr(self, name)
            if tuple(idx.shape) != (*target.shape[:-1], self.topk) or tuple(w.shape) != (*target.shape[:-1], self.topk - 1):
                raise ValueError(f"{where}.{name}_topk_*: saved shapes {tuple(idx.shape)}, {tuple(w.shape)} do not "
                                 f"fit the model, which needs {(*target.shape[:-1], self.topk)} indices")
            idx = idx.long()
            if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_vectors):
                raise ValueError(f"{where}.{name}_topk_indices: indices outside the bank of {self.num_vectors} vectors")
            w = w.float()
            w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
            full = torch.full(target.shape, float("-inf")).scatter(-1, idx.cpu(), torch.log(w).cpu())
            logits[name] = full
        with torch.no_grad():
            for name, value in logits.items():
                getattr(self, name).copy_(value)

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        o = cls.options(config)
        return {"r": config.r, "num_vectors": o["num_vectors"], "vector_length": o["vector_length"],
                "topk": o["topk"], "vblora_dropout": config.dropout,
                "init_vector_bank_bound": o["init_vector_bank_bound"], "init_logits_std": o["init_logits_std"],
                "save_only_topk_weights": o["save_only_topk_weights"], "fan_in_fan_out": False,
                "bias": peft_bias(config, "vblora"), "exclude_modules": None,
                "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def config_from_peft_fields(cls, data: dict) -> dict:
        refuse_peft_options(data, "VB-LoRA", ("layers_to_transform", "layers_pattern", "exclude_modules"))
        if data.get("target_modules") is None:
            raise ValueError("target_modules is missing")
        peft_defaults = {**cls.option_defaults, "vector_length": 256}   # what PEFT assumes when a key is absent
        options = {key: data.get(key, default) for key, default in peft_defaults.items()}
        return {"r": int(data.get("r", 4)), "dropout": float(data.get("vblora_dropout") or 0.0),
                "targets": data["target_modules"], "modules_to_save": data.get("modules_to_save") or [],
                "bias": bias_from_peft(data), "options": options}

    def extra_repr(self) -> str:
        return f"r={self.r}, topk={self.topk}, logits_A={tuple(self.vblora_logits_A.shape)}"


def _check_divisible(spec: LayerSpec, length: int) -> None:
    for what, d in (("in_features", spec.in_features), ("out_features", spec.out_features)):
        if d % length:
            raise ValueError(f"{what}={d} is not a multiple of vector_length={length}")
