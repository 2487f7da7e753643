"""PiSSA, and the residual-base machinery it shares with LoRA-GA and GOAT.

PiSSA (Meng, Wang, Zhang 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
Large Language Models", arXiv 2404.02948):

    W = U S Vᵀ                                   (SVD of the base weight, out x in)
    A₀ = diag(√(S_r / s)) V_rᵀ,   B₀ = U_r diag(√(S_r / s)),   s = alpha / r  (alpha / √r with rslora)
    W_res = W - s B₀ A₀                          (= W - U_r S_r V_rᵀ, the principal part moves out of W)
    y = W_res x + b + s B A x,                   A, B trained, starting from A₀, B₀.

The base weight becomes W_res when the adapter is installed and is given W back when it is deleted.
`save(dir, as_lora=True)` writes the trained change of the ORIGINAL weight, s (B A - B₀ A₀), as a
plain rank-2r LoRA: A' = [A; A₀], B' = s [B, -B₀] (PEFT's PiSSA-to-LoRA conversion), so it loads on
the unmodified base anywhere. The native file holds A and B only, like PEFT's: loading re-runs the
(deterministic) SVD of the base weight to rebuild A₀, B₀ and W_res.

Caveat shared by every residual method: while the adapter is installed, the layer's "bare base"
(`disabled()`, rows with adapter id None, other adapters on the same layer) is W_res, not W.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora import LoraAdapter

log = logging.getLogger("loraplex")

_RESIDUAL_MARK = "_loraplex_residual_adapter"


# --- helpers shared by the methods of this family (LoRA-GA, EVA and GOAT import them) ---
def read_options(config, defaults: dict[str, Any], method: str) -> dict[str, Any]:
    """`config.options` over `defaults`; unknown keys raise a ValueError listing the allowed ones."""
    unknown = sorted(set(config.options) - set(defaults))
    if unknown:
        allowed = ", ".join(f"{k} (default {v!r})" for k, v in defaults.items()) or "none"
        raise ValueError(f"method {method!r} has no option(s) {', '.join(map(repr, unknown))}; "
                         f"its options are: {allowed}")
    return {**defaults, **config.options}


def check_option(ok: bool, method: str, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"method {method!r}: option {name}={value!r} is not allowed; {name} must be {allowed}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """A block whose global RNG draws (e.g. `torch.svd_lowrank`) are seeded and leave no trace outside."""
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class ResidualBase:
    """Mixin for methods that move part of W into the adapter at init: W_res = W - c · B₀ A₀.

    The class keeps the initial factors as buffers `lora_A0` (k x d_in), `lora_B0` (d_out x k) and the
    number `offset_scale` (c). `on_install` writes W_res into the base layer, `on_delete` adds c B₀ A₀
    back (exact up to one rounding of the base dtype). One residual adapter per layer: a second one
    would factor an already rewritten weight, so it is refused.
    """

    offset_scale: float

    @staticmethod
    def check_free(spec: LayerSpec, method: str) -> None:
        if not spec.base.weight.dtype.is_floating_point:
            raise ValueError(f"method {method!r} rewrites the base weight and needs a float one, "
                             f"not {spec.base.weight.dtype}")
        mark = getattr(spec.base, _RESIDUAL_MARK, None)
        owner = mark() if mark is not None else None    # gone once its AdaptedLayer is (merge_and_unload)
        if owner is not None:
            raise ValueError(f"this layer's base weight is already replaced by the residual of a {owner.method!r} "
                             f"adapter; delete that adapter first (one residual adapter per layer)")

    def init_offset(self, a0: torch.Tensor, b0: torch.Tensor, scale: float) -> None:
        if "lora_A0" in self._buffers:
            self.lora_A0, self.lora_B0 = a0, b0
        else:
            self.register_buffer("lora_A0", a0, persistent=False)
            self.register_buffer("lora_B0", b0, persistent=False)
        self.offset_scale = scale

    def base_offset(self) -> torch.Tensor:
        """c · B₀ A₀, float32, in the base weight's (out, in) layout."""
        return self.offset_scale * (self.lora_B0.float() @ self.lora_A0.float())

    def shift_base(self, spec: LayerSpec, sign: float) -> None:
        w = spec.weight
        with torch.no_grad():
            w.data.copy_((w.float() + sign * self.base_offset().to(w.device)).to(w.dtype))

    def on_install(self, spec: LayerSpec) -> None:
        self.shift_base(spec, -1.0)
        setattr(spec.base, _RESIDUAL_MARK, weakref.ref(self))

    def on_delete(self, spec: LayerSpec) -> None:
        self.shift_base(spec, +1.0)
        if hasattr(spec.base, _RESIDUAL_MARK):
            delattr(spec.base, _RESIDUAL_MARK)

    def serving_factors(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Relative to the installed base W_res the update is s·B A: the factors as they are."""
        if getattr(self, "serving_form", "") not in ("low-rank", "low-rank after conversion"):
            return None
        return self.lora_A.detach(), self.lora_B.detach() * self.scale

    def residual_as_lora(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') with B' A' = s B A - c B₀ A₀: the change of the ORIGINAL weight, rank 2r."""
        a = torch.cat([self.lora_A.detach().float(), self.lora_A0.float()], dim=0)
        b = torch.cat([self.lora_B.detach().float() * scale, -self.lora_B0.float() * self.offset_scale], dim=1)
        return a, b


def top_svd(w: torch.Tensor, r: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_rᵀ) of w: exact (`torch.linalg.svd`) or randomized with `niter` subspace iterations."""
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    with seeded_rng(0, w.device):
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
    return u, s, v.t()


@register
class PissaAdapter(ResidualBase, LoraAdapter):
    """PiSSA on Linear and GPT-2 Conv1D layers (options: niter = None for the exact SVD, or k for
    `torch.svd_lowrank` with k subspace iterations, PEFT's "pissa_niter_k")."""

    method = "pissa"
    kinds = (LINEAR, GPT2_CONV1D)
    paper = ("Meng, Wang, Zhang 2024, PiSSA: Principal Singular Values and Singular Vectors Adaptation "
             "of Large Language Models (arXiv 2404.02948)")
    serving_form = "low-rank after conversion"

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        opts = read_options(config, {"niter": None}, self.method)
        niter = opts["niter"]
        check_option(niter is None or (is_int(niter) and niter >= 0), self.method, "niter", niter,
                     "null (exact SVD) or an integer >= 0")
        if config.dora:
            raise ValueError("method 'pissa' does not combine with dora=True")
        self.check_free(spec, self.method)
        if r > min(spec.in_features, spec.out_features):
            raise ValueError(f"PiSSA rank r={r} exceeds min(in, out) = {min(spec.in_features, spec.out_features)}")
        super().__init__(spec, r, alpha, config)
        self.niter = niter
        u, s, vh = top_svd(spec.weight.detach().float(), r, niter)
        root = torch.sqrt(s / self.scale)
        with torch.no_grad():
            self.lora_A.copy_(root[:, None] * vh)
            self.lora_B.copy_(u * root[None, :])
        # The offset uses the factors as stored (rounded to the adapter dtype), so W_res + s B₀ A₀ = W.
        self.init_offset(self.lora_A.detach().clone(), self.lora_B.detach().clone(), self.scale)

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        niter = config.options.get("niter")
        return {"init_lora_weights": "pissa" if niter is None else f"pissa_niter_{niter}"}

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return self.residual_as_lora(self.scale)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, niter={self.niter}"
