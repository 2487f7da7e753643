"""LoRA Dropout: dropout on the adapter's parameters, and a test-time ensemble.

Lin, Ma, Chu, Jin, Yang, Wang, Mei 2024, "LoRA Dropout as a Sparsity Regularizer for Overfitting
Control" (arXiv 2404.09610): the factors are dropped out, not the activations. Columns of A (input
features) and rows of B (output features) are dropped with probability p:
    ΔW̃ = (diag(m_B) B) (A diag(m_A)) / (1-p)²,     m_A ∈ {0,1}^d_in, m_B ∈ {0,1}^d_out ~ Bernoulli(1-p)
so each entry of ΔW is dropped with probability 1 - (1-p)² = 2p - p² (the paper's sparsity). One mask
pair per layer per forward pass (the parameters are dropped, so every token of the batch sees the same
ΔW̃); the 1/(1-p)² keeps E[ΔW̃] = ΔW, so the plain adapter is the mean model. Since
ΔW̃ x = m_B ⊙ (B A (m_A ⊙ x)) / (1-p)², the masks are applied to the layer's input and output
features of the low-rank path.

Test-time ensemble (the paper's §4): the prediction is the average over N sampled masks,
    p(y | x) = (1/N) Σ_i softmax(f(x; ΔW̃_i)),
available as `ensemble_probs(model, input_ids, attention_mask, n, seed)`.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch

from loraplex.core.adapter import GPT2_CONV1D, LINEAR
from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._factors import factor_pairs, generator, integer, number


class _Masks:
    """Per-adapter state: whether masks apply, and the generator they are drawn from."""

    def __init__(self, p: float, gen: torch.Generator) -> None:
        self.p, self.gen, self.active = p, gen, False


def _masked_delta(self, x: torch.Tensor, base_out: torch.Tensor, spec) -> torch.Tensor:
    state: _Masks = self._lora_dropout
    if not state.active:
        return type(self).delta(self, x, base_out, spec)
    keep = 1.0 - state.p
    m_a = (torch.rand(spec.in_features, generator=state.gen) < keep).to(x.dtype).to(x.device)
    m_b = (torch.rand(spec.out_features, generator=state.gen) < keep).to(x.dtype).to(x.device)
    low = ((x * m_a).to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
    return (low * (self.scale / keep**2) * m_b.to(low.dtype)).to(base_out.dtype)


def _fused_unless_masked(self, x: torch.Tensor, spec, weight: float) -> torch.Tensor | None:
    if self._lora_dropout.active:
        return None  # the masked delta runs instead
    return type(self).fused_forward(self, x, spec, weight)


def install(model, p: float, seed: int, recipe: str = "lora-dropout") -> list:
    """Route every plain-LoRA linear adapter of the active adapters through the masked delta."""
    pairs = [pair for pair in factor_pairs(model, recipe)
             if getattr(pair.adapter, "method", "") == "lora" and not pair.adapter.use_dora
             and model.adapted_layers()[pair.path].spec.kind in (LINEAR, GPT2_CONV1D)]
    if not pairs:
        raise ValueError(f"recipe {recipe!r} needs plain LoRA adapters (method 'lora', no DoRA) on linear layers")
    for pair in pairs:
        adapter = pair.adapter
        adapter._lora_dropout = _Masks(p, generator(seed, pair.key))
        adapter.delta = types.MethodType(_masked_delta, adapter)
        adapter.fused_forward = types.MethodType(_fused_unless_masked, adapter)
    return pairs


@contextlib.contextmanager
def masks_on(pairs: list, on: bool = True) -> Iterator[None]:
    previous = [pair.adapter._lora_dropout.active for pair in pairs]
    for pair in pairs:
        pair.adapter._lora_dropout.active = on
    try:
        yield
    finally:
        for pair, was in zip(pairs, previous):
            pair.adapter._lora_dropout.active = was


@torch.no_grad()
def ensemble_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, n: int = 8,
                   seed: int = 0, p: float | None = None) -> torch.Tensor:
    """The test-time ensemble: next-token probabilities averaged over `n` sampled LoRA-dropout masks
    (batch x seq x vocab). Uses the masks `install` set up, or installs them with probability `p`."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"ensemble size n must be a positive integer, got {n!r}")
    pairs = [pr for pr in factor_pairs(model, "lora-dropout") if hasattr(pr.adapter, "_lora_dropout")]
    if not pairs:
        if p is None:
            raise ValueError("the model has no LoRA-dropout masks installed; pass p (the drop probability)")
        pairs = install(model, p, seed)
    for pair in pairs:
        pair.adapter._lora_dropout.gen = generator(seed, pair.key)
        if p is not None:
            pair.adapter._lora_dropout.p = p
    was_training = model.training
    model.eval()
    total = None
    try:
        with masks_on(pairs):
            for _ in range(n):
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
                probs = torch.softmax(logits, dim=-1)
                total = probs if total is None else total + probs
    finally:
        model.train(was_training)
    return total / n


@register
class LoraDropout(Recipe):
    """LoRA Dropout (Lin et al. 2024): columns of A / rows of B dropped; test-time ensemble available."""

    name = "lora-dropout"
    options = {"p": 0.1, "seed": 0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.p = number(self.name, self.opts, "p", low=0, high=1, high_open=True)
        self.seed = integer(self.name, self.opts, "seed")

    def setup(self, model, cfg) -> None:
        self.pairs = install(model, self.p, self.seed)

    def loss(self, model, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, int]:
        # masks for this step's forward pass only (drawn from a per-step generator: resumable)
        for pair in self.pairs:
            pair.adapter._lora_dropout.gen = generator(self.seed, f"{pair.key}#{step}")
        with masks_on(self.pairs):
            return super().loss(model, batch, step)
