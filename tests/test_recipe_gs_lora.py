"""GS-LoRA (Zhao et al. 2024): group lasso over groups of LoRA modules; the proximal step
(block soft-thresholding) zeroes whole groups exactly."""

from __future__ import annotations

import math

import pytest
import torch
from recipe_opt_util import adapted, batch, log_rows, run, saved_adapter

from loraplex.training.loop import TrainConfig
from loraplex.training.recipes import Recipe, make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_groups_are_transformer_blocks_or_layers():
    recipe = make_recipe("gs-lora")
    recipe.setup(adapted(), TrainConfig())
    assert sorted(recipe.groups) == ["0", "1"] and all(len(ps) == 14 for ps in recipe.groups.values())
    per_layer = make_recipe("gs-lora", {"groups": "layer"})
    per_layer.setup(adapted(), TrainConfig())
    assert len(per_layer.groups) == 14


def test_proximal_step_is_block_soft_thresholding():
    recipe = make_recipe("gs-lora", {"weight": 1.0, "groups": "layer"})
    model = adapted(init="random")
    recipe.setup(model, TrainConfig())
    before = {k: [p.detach().double().clone() for p in ps] for k, ps in recipe.groups.items()}
    norms = {k: math.sqrt(sum(float(t.pow(2).sum()) for t in ts)) for k, ts in before.items()}
    lr = sorted(norms.values())[len(norms) // 2]  # threshold lr·λ = the median group norm
    recipe.prox(lr)
    zeroed = 0
    for k, ps in recipe.groups.items():
        factor = max(0.0, 1 - lr / norms[k])
        for p, b in zip(ps, before[k]):
            torch.testing.assert_close(p.detach().double(), b * factor, rtol=1e-6, atol=0)
        if factor == 0:
            zeroed += 1
            assert all(not bool(p.any()) for p in ps)  # the whole group, exactly
    assert 0 < zeroed < len(norms)


def test_penalty_mode_adds_the_group_lasso_to_the_loss():
    recipe = make_recipe("gs-lora", {"weight": 0.5, "proximal": False})
    model = adapted(init="random")
    recipe.setup(model, TrainConfig())
    data = batch()
    loss, _ = recipe.loss(model, data, 0)
    plain, _ = Recipe().loss(model, data, 0)
    ref = 0.5 * sum(math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in ps))
                    for ps in recipe.groups.values())
    assert loss.item() - plain.item() == pytest.approx(ref, rel=1e-5)


def test_training_zeroes_whole_groups(tmp_path):
    run(tmp_path, recipe="gs-lora", recipe_options={"weight": 1000.0}, steps=4, init="random")
    rows = log_rows(tmp_path)
    assert rows[-1]["zero_groups"] == rows[-1]["groups"] == 2
    tensors = saved_adapter(tmp_path)
    assert all(not bool(t.any()) for t in tensors.values())
    run(tmp_path, "small", recipe="gs-lora", recipe_options={"weight": 1e-6}, steps=2)
    assert log_rows(tmp_path, "small")[-1]["zero_groups"] == 0
    with pytest.raises(ValueError, match="groups must be one of block, layer"):
        make_recipe("gs-lora", {"groups": "head"})
