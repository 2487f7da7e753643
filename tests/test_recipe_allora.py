"""ALLoRA (Huang & Balestriero 2024): no dropout, no scale (s = 1), per-row gradient scaled by
1 / sqrt(‖θ_i‖² + 1/η²)."""

from __future__ import annotations

import math

import pytest
import torch
from recipe_opt_util import adapted, batch, run

from loraplex.training.loop import TrainConfig
from loraplex.training.recipes import make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_adapter_is_dropout_free_and_scaling_free():
    recipe = make_recipe("allora")
    model = adapted(recipe, dropout=0.2, alpha=64.0, rank_pattern={"q_proj": 8})
    for layer in model.adapted_layers().values():
        adapter = layer.adapters["default"]
        assert adapter.scale == 1.0 and adapter.dropout is None


def test_gradient_rows_scaled_as_the_paper_says():
    eta = 0.5
    recipe = make_recipe("allora", {"eta": eta})
    model = adapted(recipe, init="random")
    recipe.setup(model, TrainConfig())
    loss, _ = recipe.loss(model, batch(), 0)
    loss.backward()
    params = [p for pair in recipe.pairs for p in (pair.A, pair.B)]
    raw = [p.grad.clone() for p in params]
    recipe.after_backward(model, 0)
    for p, g in zip(params, raw):
        for i in range(p.shape[0]):  # row by row, in float64
            row = p.detach()[i].double()
            coef = 1.0 / math.sqrt(float(row @ row) + 1.0 / eta**2)
            torch.testing.assert_close(p.grad[i].double(), g[i].double() * coef, rtol=1e-6, atol=1e-12)


def test_zero_rows_move_at_rate_eta():
    recipe = make_recipe("allora", {"eta": 3.0})
    model = adapted(recipe, init="kaiming")  # B = 0
    recipe.setup(model, TrainConfig())
    pair = recipe.pairs[0]
    pair.B.grad = torch.ones_like(pair.B)
    recipe.after_backward(model, 0)
    torch.testing.assert_close(pair.B.grad, torch.full_like(pair.B, 3.0))


def test_trains_through_the_loop(tmp_path):
    report = run(tmp_path, recipe="allora", dropout=0.1)
    assert report["config"]["recipe"] == "allora" and report["final_loss"] is not None
    with pytest.raises(ValueError, match="eta must be a number"):
        make_recipe("allora", {"eta": 0})
