"""AFLoRA (Liu et al. 2024): projection matrices frozen progressively by the freezing score
mean(Ī ⊙ Ū) under a cubic schedule; all frozen after T - t_f."""

from __future__ import annotations

import pytest
import torch
from recipe_opt_util import adapted, log_rows, run

from loraplex.training.loop import TrainConfig
from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.aflora import trainable_fraction

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cubic_schedule():
    T, ti, tf = 100, 10, 30
    assert [trainable_fraction(t, T, ti, tf) for t in (0, 10)] == [1.0, 1.0]
    for t in (11, 35, 70):
        assert trainable_fraction(t, T, ti, tf) == pytest.approx((1 - (t - ti) / (T - ti - tf)) ** 3)
    assert trainable_fraction(71, T, ti, tf) == 0.0


def feed(recipe, model, grads_by_step):
    """Run after_backward / after_step with given gradients (no optimizer: values do not matter)."""
    out = []
    for step, grads in enumerate(grads_by_step):
        for k, p in recipe.params.items():
            p.grad = grads[k].clone() if p.requires_grad else None
        recipe.after_backward(model, step)
        out.append(recipe.after_step(model, None, step))
    return out


def reference_scores(grads_by_step, keys, b1, b2, dt):
    """Ī, Ū by the paper's recursion from the window-averaged |∇| (written out independently)."""
    ipt = {k: torch.zeros_like(grads_by_step[0][k]) for k in keys}
    ei = {k: torch.zeros_like(v) for k, v in ipt.items()}
    eu = {k: torch.zeros_like(v) for k, v in ipt.items()}
    window: dict = {k: [] for k in keys}
    for step, grads in enumerate(grads_by_step):
        if step % dt == 0:
            for k in keys:
                ei[k] = b1 * ei[k] + (1 - b1) * ipt[k]
                eu[k] = b2 * eu[k] + (1 - b2) * (ipt[k] - ei[k]).abs()
                window[k] = []
        for k in keys:
            window[k].append(grads[k].abs())
            ipt[k] = torch.stack(window[k]).mean(0)
    return {k: ei[k] * eu[k] for k in keys}


def test_scores_and_freezing_follow_the_schedule():
    recipe = make_recipe("aflora", {"delta_t": 2, "warmup_fraction": 0.2, "final_fraction": 0.2})
    model = adapted(recipe)
    recipe.total_steps = 20
    recipe.setup(model, TrainConfig(steps=20))
    g = torch.Generator().manual_seed(0)
    keys = sorted(recipe.params)
    # matrices get gradients of very different, fluctuating sizes: scale_k · |noise|
    scale = {k: 10.0 ** (i % 5) for i, k in enumerate(keys)}
    grads = [{k: scale[k] * torch.randn(recipe.params[k].shape, generator=g) for k in keys} for _ in range(20)]
    logs = feed(recipe, model, grads[:6])
    ref = reference_scores(grads[:6], keys, 0.85, 0.95, 2)
    for k in keys:
        if k not in recipe.frozen:
            torch.testing.assert_close(recipe.scores()[k], ref[k], rtol=1e-5, atol=0)
    assert all(entry is None for entry in logs[:4])  # warm-up: t <= t_i = 4
    assert 0 < logs[5]["frozen_matrices"] < len(keys)
    frozen = set(recipe.frozen)
    means = {k: ref[k].mean().item() for k in keys}
    # the frozen ones are those with the smallest scores
    assert max(means[k] for k in frozen) < min(means[k] for k in set(keys) - frozen)
    assert all(not recipe.params[k].requires_grad for k in frozen)
    feed(recipe, model, grads[6:])
    assert set(recipe.frozen) == set(keys) and not any(p.requires_grad for p in recipe.params.values())


def test_frozen_set_is_logged_in_training(tmp_path):
    run(tmp_path, recipe="aflora", steps=8, recipe_options={"delta_t": 1, "warmup_fraction": 0.25,
                                                              "final_fraction": 0.25})
    rows = log_rows(tmp_path)
    frozen = [r.get("frozen_matrices") for r in rows]
    assert frozen[:2] == [None, None] and frozen[-1] == 28  # 2 blocks x 7 layers x (A, B)
    assert frozen[2:] == sorted(frozen[2:])
    assert rows[-1]["loss"] < rows[0]["loss"]  # the feature vector (Λ_d, the gate) trains on
    with pytest.raises(ValueError, match="warmup_fraction \\+ final_fraction"):
        make_recipe("aflora", {"warmup_fraction": 0.6, "final_fraction": 0.6})
