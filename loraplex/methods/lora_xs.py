"""LoRA-XS and LoRA-SB: a trainable r x r matrix between two frozen factors.

LoRA-XS (Bałazy et al. 2024, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of
Parameters", arXiv 2405.17604):
    y = W x + s · B R A x,    s = alpha / r (alpha / sqrt(r) with rslora),
    B = U_r (d_out x r) and A = Σ_r V_rᵀ (r x d_in) frozen, from the truncated SVD W ≈ U_r Σ_r V_rᵀ
    (the reference code's split of Σ), R (r x r) trainable, R ~ N(0, σ²) with σ = 1e-5.

LoRA-SB (Ponkshe et al. 2024, "Initialization Using Update Approximation is a Silver Bullet for
Extremely Efficient Low-Rank Fine-Tuning", arXiv 2411.19557): the same architecture, initialised
from an approximation of the first full fine-tuning update on a few calibration batches:
    G = mean over batches of ∂L/∂W,    ΔW₁ = -η · sign(G)  (Adam's first step; "gradient": -η G),
    ΔW₁ = U S Vᵀ (SVD),   B = U_r,  A = V_rᵀ,  R = S_r / s,
so s · B R A is the best rank-r approximation of ΔW₁ and the adapter starts there (the reference
code adds it to the model, as the first update; it does not subtract it from W).

Both are additive, low-rank (rank ≤ r) and mergeable; `as_lora` gives A' = R A, B' = s B.
A and B are buffers and are saved with R: recomputing an SVD on load is not reproducible
(singular vectors are defined up to sign) and LoRA-SB's factors come from data. The SVD runs in
`on_install`, and not at all when the tensors come from a file (`from_peft`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register

log = logging.getLogger("loraplex")

INITS = ("kaiming", "gaussian", "zeros", "random")


# --------------------------------------------------------------------------- helpers shared by the
# SVD-initialised methods of this family (EDoRA and NoRA import them)
def check_options(config, allowed: dict[str, object]) -> dict[str, object]:
    """`config.options` with defaults filled in; unknown keys raise a ValueError naming the allowed ones."""
    options = dict(config.options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        names = ", ".join(sorted(allowed)) or "(none)"
        raise ValueError(f"method {config.method!r} does not take option(s) {', '.join(unknown)}; "
                         f"it takes: {names}")
    return {**allowed, **options}


def check_init(config, allowed: tuple[str, ...] = INITS) -> str:
    if config.init not in allowed:
        raise ValueError(f"init must be one of {allowed} for method {config.method!r}, got {config.init!r}")
    return config.init


def check_rank(spec: LayerSpec, r: int, what: str = "r") -> None:
    limit = min(spec.in_features, spec.out_features)
    if r > limit:
        raise ValueError(f"{what}={r} exceeds min(d_out, d_in)={limit} of this layer")


def positive_float(value, name: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"option {name} must be a {'non-negative' if allow_zero else 'positive'} number, "
                         f"got {value!r}")
    return float(value)


def truncated_svd(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, Σ_r, V_rᵀ) of a (d_out x d_in) matrix, computed in float32."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def xs_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-XS's frozen pair from W (d_out x d_in): B = U_r (d_out x r), A = Σ_r V_rᵀ (r x d_in)."""
    u, s, vh = truncated_svd(weight, r)
    return u, s[:, None] * vh


def lm_loss(hf_model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy on the supervised positions (labels -100 elsewhere, not shifted).

    Like the training loop's loss, the output head runs only where a label is supervised when the
    model exposes its body (`base_model_prefix`) and head; otherwise full logits are used.
    """
    device = next(hf_model.parameters()).device
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.to(device)
    targets = batch["labels"].to(device)[:, 1:]
    keep = targets != -100
    if not keep.any():
        raise ValueError("a calibration batch has no supervised tokens (every label is -100)")
    prefix = getattr(hf_model, "base_model_prefix", None)
    body = getattr(hf_model, prefix, None) if prefix else None
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if isinstance(body, nn.Module) and head is not None:
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:
        out = hf_model(input_ids=ids, attention_mask=mask)
        logits = (out.logits if hasattr(out, "logits") else out[0])[:, :-1][keep]
    return F.cross_entropy(logits.float(), targets[keep])


def base_weight_gradients(model, name: str, batches: Iterable) -> tuple[dict[str, torch.Tensor], int]:
    """Mean gradient of the bare base model's loss w.r.t. the base weight of every layer adapter
    `name` adapts, in (d_out, d_in) layout, float32; and the number of batches.

    All adapters are switched off meanwhile (`model.disabled()`), the model is put in eval mode (no
    dropout: the result is deterministic) and every flag, mode and `.grad` is left as it was.
    """
    layers = model.adapted_layers(name)
    weights = {path: layer.base_layer.weight for path, layer in layers.items()}
    flags = {path: w.requires_grad for path, w in weights.items()}
    sums = {path: torch.zeros(layer.spec.out_features, layer.spec.in_features, device=weights[path].device)
            for path, layer in layers.items()}
    was_training = model.training
    count = 0
    try:
        model.eval()
        for w in weights.values():
            w.requires_grad_(True)
        with model.disabled(), torch.enable_grad():
            for batch in batches:
                loss = lm_loss(model.model, batch)
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                for (path, layer), g in zip(layers.items(), grads):
                    if g is not None:  # None: the layer is not on the loss's path (gradient zero)
                        sums[path] += (g.t() if layer.spec.kind == GPT2_CONV1D else g).float()
                count += 1
    finally:
        for path, w in weights.items():
            w.requires_grad_(flags[path])
        model.train(was_training)
    if count == 0:
        raise ValueError(f"calibration of adapter {name!r} got no batches")
    return {path: s / count for path, s in sums.items()}, count


class DecompositionInit:
    """Mixin: the data-free initialisation (an SVD, LU or skeleton of W) runs in `on_install`, and is
    skipped when `from_peft` has filled the tensors already (loading a file recomputes nothing)."""

    _loaded = False

    def from_peft(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        super().from_peft(tensors, where)
        self._loaded = True

    def on_install(self, spec: LayerSpec) -> None:
        if not self._loaded:
            with torch.no_grad():
                self.initialise(spec)

    def initialise(self, spec: LayerSpec) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- LoRA-XS
@register
class LoraXSAdapter(DecompositionInit, Adapter):
    """LoRA-XS: y = W x + s·B R A x, B, A frozen from the SVD of W, only R (r x r) trains."""

    method = "lora-xs"
    paper = ("Bałazy, Banaei, Aberer, Tabor 2024, LoRA-XS: Low-Rank Adaptation with Extremely Small Number "
             "of Parameters (arXiv 2405.17604)")
    serving_form = "low-rank"
    peft_type = "LORA_XS"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"init_sigma": 1e-5}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        self.options = check_options(config, self.option_defaults)
        self.init = check_init(config)
        if "init_sigma" in self.options:
            positive_float(self.options["init_sigma"], "init_sigma", allow_zero=True)
        check_rank(spec, r)
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        new = {"dtype": config.torch_dtype, "device": spec.base.weight.device}
        self.register_buffer("lora_A", torch.zeros(r, spec.in_features, **new))
        self.register_buffer("lora_B", torch.zeros(spec.out_features, r, **new))
        self.lora_R = nn.Parameter(torch.zeros(r, r, **new))

    def initialise(self, spec: LayerSpec) -> None:
        """B = U_r, A = Σ_r V_rᵀ from the SVD of W; R ~ N(0, σ²)."""
        b, a = xs_factors(spec.weight, self.r)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.lora_R.copy_(self._initial_r(self.r))

    def _initial_r(self, r: int) -> torch.Tensor:
        if self.init == "zeros":
            return torch.zeros(r, r)
        if self.init == "random":  # a non-trivial adapter, for tests
            return torch.randn(r, r) / math.sqrt(r)
        return torch.randn(r, r) * float(self.options["init_sigma"])

    # --- the math ---
    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.lora_R.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return (((x @ self.lora_A.t()) @ self.lora_R.t()) @ self.lora_B.t() * self.scale).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        return self.lora_B.float() @ self.lora_R.float() @ self.lora_A.float() * self.scale

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.lora_R.detach().float() @ self.lora_A.float(), self.lora_B.float() * self.scale)

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B, "lora_R.weight": self.lora_R}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"


# --------------------------------------------------------------------------- LoRA-SB
@register
class LoraSBAdapter(LoraXSAdapter):
    """LoRA-SB: LoRA-XS's B R A initialised from the SVD of the approximate first update (calibration)."""

    method = "lora-sb"
    paper = ("Ponkshe, Singhal, Gorbunov, Tumanov, Horvath, Vepakomma 2024, Initialization Using Update "
             "Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning (arXiv 2411.19557)")
    serving_form = "low-rank"
    peft_type = "LORA_SB"
    # init_lr: η of the approximated first update; init_update: "sign" (Adam's first step, -η·sign(G),
    # as the reference code) or "gradient" (SGD's, -η·G).
    option_defaults: dict[str, object] = {"init_lr": 1e-4, "init_update": "sign"}
    UPDATES = ("sign", "gradient")

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        self.init_lr, self.init_update = self.check_sb_options(config)

    @classmethod
    def check_sb_options(cls, config) -> tuple[float, str]:
        options = check_options(config, cls.option_defaults)
        if options["init_update"] not in cls.UPDATES:
            raise ValueError(f"option init_update must be one of {cls.UPDATES}, got {options['init_update']!r}")
        return positive_float(options["init_lr"], "init_lr"), options["init_update"]

    def _initial_r(self, r: int) -> torch.Tensor:
        # Without calibration data the adapter is LoRA-XS's frozen SVD pair with R = 0 (the identity);
        # `calibrate` replaces A, B and R.
        return torch.randn(r, r) / math.sqrt(r) if self.init == "random" else torch.zeros(r, r)

    @torch.no_grad()
    def init_from_update(self, update: torch.Tensor) -> None:
        """B = U_r, A = V_rᵀ, R = S_r / s from the SVD of the approximate first update ΔW₁ = U S Vᵀ."""
        u, s, vh = truncated_svd(update, self.r)
        self.lora_B.copy_(u)
        self.lora_A.copy_(vh)
        self.lora_R.copy_(torch.diag(s) / self.scale)

    @classmethod
    def calibrate(cls, model, name: str, batches: Iterable) -> None:
        """LoRA-SB's initialisation: G from the calibration batches, ΔW₁ = -η·sign(G) (or -η·G), SVD."""
        start = time.perf_counter()
        lr, update = cls.check_sb_options(model.configs[name])
        grads, count = base_weight_gradients(model, name, batches)
        for path, layer in model.adapted_layers(name).items():
            g = grads[path]
            layer.adapters[name].init_from_update(-lr * (torch.sign(g) if update == "sign" else g))
        log.info("lora-sb: initialised %d layers of adapter %r from %d calibration batches in %.2f s",
                 len(grads), name, count, time.perf_counter() - start)
