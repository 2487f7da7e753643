"""LoRA-SP (Wu et al. 2024): a random half of each factor's entries is frozen; the rest trains."""

from __future__ import annotations

import pytest
import torch
from recipe_opt_util import adapted, batch

from loraplex.training.loop import TrainConfig
from loraplex.training.recipes import make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def train_steps(recipe, model, steps: int, weight_decay: float = 0.1):
    cfg = TrainConfig(lr=1e-2, weight_decay=weight_decay)
    recipe.setup(model, cfg)
    opt = recipe.make_optimizer(model, cfg)
    data = batch()
    snapshots = []
    for step in range(steps):
        loss, _ = recipe.loss(model, data, step)
        loss.backward()
        recipe.after_backward(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recipe.after_step(model, opt, step)
        snapshots.append({k: p.detach().clone() for k, p in recipe.params.items()})
    return snapshots


def test_half_the_entries_frozen_exactly_even_with_weight_decay():
    recipe = make_recipe("lora-sp")
    model = adapted(init="random")
    start = {n: p.detach().clone() for n, p in model.named_trainable_parameters().items()}
    snaps = train_steps(recipe, model, 3)
    assert abs(recipe.trainable_fraction() - 0.5) < 0.05
    for k, p in recipe.params.items():
        mask = recipe.masks[k]
        first = snaps[0][k]
        assert torch.equal(p.detach()[~mask], first[~mask])          # frozen entries never move
        assert bool((p.detach()[mask] != first[mask]).any())          # trained entries do
    # the same entries stay frozen from the very start (not only after the first step)
    for name, p in model.named_trainable_parameters().items():
        key = next(k for k, q in recipe.params.items() if q is p)
        assert torch.equal(p.detach()[~recipe.masks[key]], start[name][~recipe.masks[key]])


def test_masks_are_reproducible_and_resample_per_period():
    a, b = make_recipe("lora-sp", {"seed": 3}), make_recipe("lora-sp", {"seed": 3})
    a.setup(adapted(), TrainConfig())
    b.setup(adapted(), TrainConfig())
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    r = make_recipe("lora-sp", {"resample_every": 2, "frozen_fraction": 0.25})
    model = adapted(init="random")
    train_steps(r, model, 1)
    first = {k: m.clone() for k, m in r.masks.items()}
    r.after_backward(model, 1)
    assert all(torch.equal(first[k], r.masks[k]) for k in first)       # same period
    r.after_backward(model, 2)
    assert any(not torch.equal(first[k], r.masks[k]) for k in first)   # a new period draws a new mask
    assert abs(r.trainable_fraction() - 0.75) < 0.05


def test_bad_fraction():
    with pytest.raises(ValueError, match="frozen_fraction must be a number in"):
        make_recipe("lora-sp", {"frozen_fraction": 1.0})
