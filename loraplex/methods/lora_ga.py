"""LoRA-GA (Wang, Yu, Li 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv 2407.05000).

On a few calibration batches, estimate the gradient of the loss with respect to each full weight,

    G = mean over batches of ∂L/∂W                      (out x in),

take its SVD G = U S Vᵀ and initialise the factors from its singular vectors so that the first LoRA
step approximates the first full fine-tuning step (default direction "ArB2r"):

    A₀ = c · V[:, :r]ᵀ,   B₀ = c · U[:, r:2r],   c = d_out^{1/4} / √γ   (scale "stable", γ = 16)
    W_res = W - s B₀ A₀,                                 s = alpha / r (alpha / √r with rslora)
    y = W_res x + b + s B A x,                           A, B trained, starting from A₀, B₀.

This is the paper's and the authors' reference code's variant (A and B both scaled, no singular values
in B); PEFT 0.21's `lora_ga_init` instead multiplies B by diag(S) and scales only B. Other options, as
in the reference code: direction "A2rBr" (A = V[:, r:2r]ᵀ, B = U[:, :r]), "ArBr" (A = odd, B = even
singular vectors), "random"; scale "gd" (A, B divided by s), "unit" (none), "weightS" (both times the
mean of √(S_W[:r] / s) of the base weight's singular values). The SVD is `torch.svd_lowrank(G,
q=min(4r, min(G.shape)), niter=4)` under a fixed seed (svd="exact" uses the full SVD).

A₀ and B₀ depend on data, so they are saved with the adapter (keys "lora_ga_A0" / "lora_ga_B0") and
the residual is rebuilt from them on load. `save(dir, as_lora=True)` writes s (B A - B₀ A₀) as a plain
rank-2r LoRA for the unmodified base, as PEFT's conversion does. Without calibration data the adapter
is a plain LoRA (A kaiming, B = 0, nothing subtracted), like PEFT's fallback.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import torch

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora import LoraAdapter
from loraplex.methods.pissa import ResidualBase, check_option, is_int, read_options, seeded_rng

log = logging.getLogger("loraplex")

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weightS")
DEFAULTS = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16.0, "svd": "lowrank", "seed": 0}


def model_loss(model, batch) -> torch.Tensor:
    """The model's training loss on one calibration batch (a dict with labels, for HF-style models)."""
    if not isinstance(batch, dict) or "labels" not in batch:
        raise ValueError("LoRA-GA calibration batches must be dicts with input_ids, attention_mask and labels")
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(f"{type(model.model).__name__} returned no .loss for a batch with labels; "
                         "LoRA-GA needs a model that computes its training loss")
    return loss


@register
class LoraGaAdapter(ResidualBase, LoraAdapter):
    """LoRA-GA on Linear and GPT-2 Conv1D layers. Options: direction, scale, stable_gamma, svd, seed."""

    method = "lora-ga"
    kinds = (LINEAR, GPT2_CONV1D)
    paper = "Wang, Yu, Li 2024, LoRA-GA: Low-Rank Adaptation with Gradient Approximation (arXiv 2407.05000)"
    serving_form = "low-rank after conversion"

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        opts = self.options(config)
        if config.dora:
            raise ValueError("method 'lora-ga' does not combine with dora=True")
        self.check_free(spec, self.method)
        if 2 * r > min(spec.in_features, spec.out_features):
            raise ValueError(f"LoRA-GA takes 2r singular vectors of the gradient: 2r = {2 * r} exceeds "
                             f"min(in, out) = {min(spec.in_features, spec.out_features)}")
        super().__init__(spec, r, alpha, config)
        self.opts = opts
        self.init_offset(torch.zeros_like(self.lora_A.detach()), torch.zeros_like(self.lora_B.detach()), self.scale)

    @classmethod
    def options(cls, config) -> dict:
        opts = read_options(config, DEFAULTS, cls.method)
        check_option(opts["direction"] in DIRECTIONS, cls.method, "direction", opts["direction"], f"one of {DIRECTIONS}")
        check_option(opts["scale"] in SCALES, cls.method, "scale", opts["scale"], f"one of {SCALES}")
        gamma = opts["stable_gamma"]
        check_option(isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma > 0, cls.method,
                     "stable_gamma", gamma, "a number > 0")
        check_option(opts["svd"] in ("lowrank", "exact"), cls.method, "svd", opts["svd"], "'lowrank' or 'exact'")
        check_option(is_int(opts["seed"]), cls.method, "seed", opts["seed"], "an integer")
        return opts

    # --- files: the initial factors travel with the adapter (they come from data) ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {**super().to_peft(), "lora_ga_A0": self.lora_A0, "lora_ga_B0": self.lora_B0}

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return self.residual_as_lora(self.scale)

    # --- the initialisation ---
    @classmethod
    def calibrate(cls, model, name: str, batches: Iterable) -> None:
        """Estimate every adapted weight's full gradient on `batches`, then set A, B and W_res from it."""
        start = time.perf_counter()
        layers = model.adapted_layers(name)
        opts = cls.options(model.configs[name])
        grads = estimate_gradients(model, layers, batches)
        device = next(iter(layers.values())).spec.weight.device
        with seeded_rng(opts["seed"], device), torch.no_grad():
            for path, layer in layers.items():
                adapter = layer.adapters[name]
                adapter.shift_base(layer.spec, +1.0)          # back to W (a no-op unless calibrated before)
                adapter.init_from_gradient(layer.spec, grads.pop(path))
                adapter.shift_base(layer.spec, -1.0)          # W_res = W - s B₀ A₀
        log.info("lora-ga: initialised %d layers from the gradients of %s in %.2f s", len(layers), name,
                 time.perf_counter() - start)

    def init_from_gradient(self, spec: LayerSpec, grad: torch.Tensor) -> None:
        r, opts = self.r, self.opts
        g = grad.float()
        if opts["svd"] == "exact":
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
        else:
            u, _, v = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
            vh = v.t()
        direction = opts["direction"]
        if direction == "ArB2r":
            a, b = vh[:r], u[:, r:2 * r]
        elif direction == "A2rBr":
            a, b = vh[r:2 * r], u[:, :r]
        elif direction == "ArBr":
            a, b = vh[1:2 * r:2], u[:, 0:2 * r:2]
        else:  # random: r of the first 2r singular vectors for A, the other r for B
            perm = torch.randperm(2 * r).tolist()
            a, b = vh[perm[:r]], u[:, perm[r:]]
        scale = opts["scale"]
        if scale == "gd":
            a, b = a / self.scale, b / self.scale
        elif scale == "stable":
            c = spec.out_features ** 0.25 / math.sqrt(opts["stable_gamma"])
            a, b = a * c, b * c
        elif scale == "weightS":
            s_w = torch.linalg.svdvals(spec.weight.detach().float())[:r] / self.scale
            c = torch.sqrt(s_w).mean()
            a, b = a * c, b * c
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.init_offset(self.lora_A.detach().clone(), self.lora_B.detach().clone(), self.scale)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, {self.opts}"


def estimate_gradients(model, layers: dict, batches: Iterable) -> dict[str, torch.Tensor]:
    """Mean over `batches` of ∂loss/∂W for each adapted layer's base weight, in (out, in) layout.

    Only those weights require grad meanwhile; the adapters are switched off (`disabled()`) and the model
    is in eval mode (no dropout), so the estimate is deterministic. Everything is restored afterwards.
    """
    weights = {path: layer.base_layer.weight for path, layer in layers.items()}
    flags = {path: w.requires_grad for path, w in weights.items()}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        with model.disabled(), torch.enable_grad():
            for batch in batches:
                model_loss(model, batch).backward()
                count += 1
        if count == 0:
            raise ValueError("LoRA-GA calibration got no batches")
        grads = {}
        for path, w in weights.items():
            if w.grad is None:
                raise ValueError(f"{path}: the loss does not depend on this layer; LoRA-GA has no gradient for it")
            g = w.grad.detach() / count
            grads[path] = g.t() if layers[path].spec.kind == GPT2_CONV1D else g
        return grads
    finally:
        for path, w in weights.items():
            w.grad = None
            w.requires_grad_(flags[path])
        model.train(was_training)
