"""LoRA+ (Hayou et al. 2024): B's learning rate is lr_ratio (default 16) times A's."""

from __future__ import annotations

import pytest
import torch
from recipe_opt_util import adapted, batch, run

from loraplex.training.loop import TrainConfig, lr_lambda
from loraplex.training.recipes import make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_param_groups_give_b_the_stated_ratio():
    recipe = make_recipe("lora-plus")
    assert recipe.ratio == 16.0  # the paper's recommended ratio is the default
    model = adapted(dora=True)
    groups = {g["name"]: g for g in recipe.param_groups(model, TrainConfig(lr=1e-3))}
    names = {id(p): n for n, p in model.named_trainable_parameters().items()}
    assert groups["A"]["lr"] == 1e-3 and groups["B"]["lr"] == pytest.approx(16e-3)
    a_names = {names[id(p)] for p in groups["A"]["params"]}
    b_names = {names[id(p)] for p in groups["B"]["params"]}
    assert a_names and all("lora_A" in n for n in a_names)
    assert any("lora_B" in n for n in b_names) and any("magnitude" in n for n in b_names)  # 1-D -> B's rate
    assert a_names | b_names == set(model.named_trainable_parameters())


def test_first_adam_step_moves_b_ratio_times_as_far_as_a():
    """Adam's first step is lr * g / (|g| + eps) per entry: B's entries move ratio x lr, A's lr."""
    lr, ratio = 1e-3, 4.0
    recipe = make_recipe("lora-plus", {"lr_ratio": ratio})
    model = adapted(init="random")
    cfg = TrainConfig(lr=lr, weight_decay=0.0)
    opt = recipe.make_optimizer(model, cfg)
    params = model.named_trainable_parameters()
    before = {n: p.detach().clone() for n, p in params.items()}
    loss, _ = recipe.loss(model, batch(), 0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    opt.step()
    for n, p in params.items():
        rate = lr * ratio if "lora_B" in n else lr
        expected = before[n] - rate * grads[n] / (grads[n].abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=n)


def test_schedule_keeps_the_ratio_at_every_step():
    recipe = make_recipe("lora-plus")
    model = adapted()
    cfg = TrainConfig(lr=2e-3)
    opt = recipe.make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, 10))
    for _ in range(6):
        opt.step()
        sched.step()
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["B"] == pytest.approx(16 * lrs["A"])


def test_training_through_the_loop_and_bad_options(tmp_path):
    report = run(tmp_path, recipe="lora-plus", recipe_options={"lr_ratio": 8})
    assert report["recipe"] == "lora-plus" and report["final_loss"] is not None
    with pytest.raises(ValueError, match="lr_ratio must be a number in"):
        make_recipe("lora-plus", {"lr_ratio": -1})
