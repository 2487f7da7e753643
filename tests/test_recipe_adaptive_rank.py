"""The budgeted rank allocator (`loraplex/training/recipes/adaptive_rank.py`) behind ALoRA, IncreLoRA,
PRILoRA and dynamic-rank DoRA. Importance scores and schedules against references written here from
their equations; allocation keeps the budget, prunes the least and grows the most important, resets
grown slots in place (same parameter objects, zeroed moments); PRILoRA's ranks rise with depth and its
pruning zeroes the lowest |A_ij|·‖X_j‖ of each row; every policy runs in the training loop.
"""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from conftest import tiny_llama
from recipe_rank_util import saved_tensors, small_config
from tiny import tiny_loaded

from loraplex import LoraConfig, attach
from loraplex.training.loop import train
from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.adaptive_rank import (
    Sensitivity,
    ablation_score,
    budget,
    linear_depth_ranks,
    magnitude_score,
    wanda_prune,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(r: int = 2, steps: int = 20):
    return types.SimpleNamespace(lr=0.05, weight_decay=0.0, steps=steps, epochs=None, r=r, seed=0)


def allocator(policy: str, r: int = 2, targets=("q_proj", "v_proj", "up_proj"), **opts):
    recipe = make_recipe("adaptive-rank", {"policy": policy, **opts})
    torch.manual_seed(0)
    model = attach(tiny_llama(), recipe.adapter_config(LoraConfig(r=r, alpha=4.0, targets=list(targets))))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.adapted_layers().values():
            b = layer.adapters["default"].lora_B
            b.copy_(0.3 * torch.randn(b.shape, generator=g))
    recipe.setup(model, cfg(r))
    optimizer = recipe.make_optimizer(model, cfg(r))
    return model, recipe, optimizer


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(seed))


def loss_of(model) -> torch.Tensor:
    return model(input_ids=ids()).logits.pow(2).mean()


def test_ablation_score_is_the_first_order_loss_change_of_switching_a_rank_off():
    model, _, _ = allocator("alora")
    layer = model.adapted_layers()["model.layers.0.self_attn.q_proj"]
    adapter = layer.adapters["default"]
    loss_of(model).backward()
    ours = ablation_score(adapter)
    # reference: y = x Wᵀ + s ((x Aᵀ) ⊙ m) Bᵀ with m a float64 leaf; score = −m ∂L/∂m
    m = adapter.rank_mask.double().clone().requires_grad_(True)
    a, b, s = adapter.lora_A.detach().double(), adapter.lora_B.detach().double(), adapter.scale

    def hook(module, args, out):
        x = args[0].double()
        return (x @ module.base_layer.weight.double().t() + s * ((x @ a.t()) * m) @ b.t()).float()

    model.zero_grad()
    handle = layer.register_forward_hook(hook)
    try:
        loss_of(model).backward()
    finally:
        handle.remove()
    torch.testing.assert_close(ours.double(), -(m * m.grad).detach(), rtol=1e-4, atol=1e-7)
    assert torch.all(ours[adapter.rank_mask == 0] == 0)


def test_magnitude_and_sensitivity_scores_match_their_equations():
    model, _, _ = allocator("dynamic-rank-dora")
    adapter = model.adapted_layers()["model.layers.1.mlp.up_proj"].adapters["default"]
    a, b, s = adapter.lora_A.detach().double(), adapter.lora_B.detach().double(), adapter.scale
    full = s * b @ a
    expected = torch.stack([(s * torch.outer(b[:, i], a[i])).norm() for i in range(adapter.r)]) / full.norm()
    torch.testing.assert_close(magnitude_score(adapter).double(), expected, rtol=1e-5, atol=1e-7)
    sens = Sensitivity(0.8, 0.7)
    bar = {"A": 0, "B": 0}
    unc = {"A": 0, "B": 0}
    for seed in (1, 2):
        model.zero_grad()
        model(input_ids=ids(seed)).logits.pow(2).mean().backward()
        got = sens.update("x", adapter)
        want = 0
        for key, p, dim in (("A", adapter.lora_A, 1), ("B", adapter.lora_B, 0)):
            i = (p.detach().double() * p.grad.double()).abs()
            bar[key] = 0.8 * bar[key] + 0.2 * i
            unc[key] = 0.7 * unc[key] + 0.3 * (i - bar[key]).abs()
            want = want + (bar[key] * unc[key]).mean(dim)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-12)


def test_budget_schedules():
    assert [budget("constant", t, 2, 8, 10, 4) for t in (0, 5, 9)] == [10, 10, 10]
    cubic = [budget("cubic", t, 2, 8, 20, 8) for t in range(10)]
    assert cubic == [20, 20] + [round(8 + 12 * (1 - (t - 2) / 6) ** 3) for t in range(2, 8)] + [8, 8]
    assert [budget("linear", t, 0, 10, 4, 14) for t in (0, 5, 10)] == [4, 9, 14]


def test_pruning_switches_off_the_globally_least_important_ranks():
    model, recipe, optimizer = allocator("dynamic-rank-dora")
    assert recipe.alive() == 6 * 4 and recipe.b_target == 6 * 2   # 6 adapted layers, r_max = 2r
    g = torch.Generator().manual_seed(5)
    recipe.scores = {p: torch.rand(4, generator=g) for p in recipe.layers}
    flat = sorted((float(v), p, i) for p, s in recipe.scores.items() for i, v in enumerate(s))
    params = [id(p) for p in model.trainable_parameters()]
    recipe.allocate(optimizer, 19)
    off = {(p, i) for p, a in recipe.layers.items() for i in range(4) if a.rank_mask[i] == 0}
    assert off == {(p, i) for _, p, i in flat[:5]} and recipe.alive() == 19
    assert [id(p) for p in model.trainable_parameters()] == params


def test_growing_revives_slots_in_the_most_important_layers_in_place():
    model, recipe, optimizer = allocator("increlora", r=4)   # starts at r/2 = 2 of 8 slots per layer
    assert recipe.alive() == 6 * 2 and recipe.b_target == 6 * 4
    loss_of(model).backward()
    optimizer.step()
    recipe.scores = {p: torch.zeros(8) for p in recipe.layers}
    top = "model.layers.1.mlp.up_proj"
    recipe.scores[top][:2] = 5.0
    recipe.scores["model.layers.0.self_attn.v_proj"][:2] = 1.0
    adapter = recipe.layers[top]
    a_obj, b_obj = adapter.lora_A, adapter.lora_B
    recipe.allocate(optimizer, 6 * 2 + 1)
    assert int(adapter.rank_mask.sum()) == 3 and recipe.alive() == 13     # the one new rank went to `top`
    assert adapter.lora_A is a_obj and adapter.lora_B is b_obj
    assert torch.all(adapter.lora_B[:, 2] == 0) and adapter.lora_A[2].abs().max() <= adapter.lora_A.shape[1] ** -0.5
    state = optimizer.state[adapter.lora_A]
    assert torch.all(state["exp_avg"][2] == 0) and torch.all(state["exp_avg_sq"][2] == 0)
    assert torch.any(state["exp_avg"][0] != 0)                           # other ranks keep their moments
    recipe.allocate(optimizer, 13 + 7)   # a round gives each of the 6 layers one rank, then `top` the last
    assert recipe.alive() == 20 and int(adapter.rank_mask.sum()) == 5


def test_alora_moves_ranks_from_the_least_to_the_most_important_layers():
    model, recipe, optimizer = allocator("alora", realloc=2)
    recipe.scores = {p: torch.tensor([0.5, 0.6, 0.0, 0.0]) for p in recipe.layers}
    weak = "model.layers.0.self_attn.q_proj"
    recipe.scores[weak] = torch.tensor([-1.0, -0.5, 0.0, 0.0])   # negatively impacting ranks go first
    recipe.scores["model.layers.1.mlp.up_proj"] = torch.tensor([3.0, 2.0, 0.0, 0.0])
    before = recipe.alive()
    moved = recipe.reallocate(optimizer)
    assert moved == 2 and recipe.alive() == before
    assert int(recipe.layers[weak].rank_mask.sum()) == 0
    assert int(recipe.layers["model.layers.1.mlp.up_proj"].rank_mask.sum()) == 3


def test_prilora_ranks_increase_with_depth_and_pruning_zeroes_the_lowest_wanda_scores():
    assert linear_depth_ranks(["m.layers.0.q", "m.layers.1.q", "m.layers.2.q"], 2, 6) == {
        "m.layers.0.q": 2, "m.layers.1.q": 4, "m.layers.2.q": 6}
    model, recipe, optimizer = allocator("prilora", r=4, prune_ratio=0.25)
    ranks = {p: int(a.rank_mask.sum()) for p, a in recipe.layers.items()}
    assert ranks == {p: 2 if ".0." in p else 6 for p in recipe.layers} and len(ranks) == 6
    model.train()
    loss_of(model).backward()
    adapter = recipe.layers["model.layers.0.self_attn.q_proj"]
    a_before = adapter.lora_A.detach().clone()
    score = a_before.abs() * adapter.input_sq.sqrt()
    pruned = wanda_prune(adapter, 0.25)
    k = int(0.25 * a_before.shape[1])
    for row in range(a_before.shape[0]):
        lowest = set(torch.argsort(score[row])[:k].tolist())
        assert set(torch.nonzero(pruned[row]).flatten().tolist()) == lowest
        assert torch.all(adapter.lora_A[row, list(lowest)] == 0)
    assert torch.equal(adapter.lora_A[~pruned], a_before[~pruned])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="policy must be one of"):
        make_recipe("adaptive-rank", {"policy": "adalora"})
    with pytest.raises(ValueError, match="importance must be one of"):
        make_recipe("adaptive-rank", {"importance": "random"})
    with pytest.raises(ValueError, match="interval must be a positive integer"):
        make_recipe("adaptive-rank", {"interval": 0})
    with pytest.raises(ValueError, match="init_r=9 exceeds r_max=4"):
        make_recipe("adaptive-rank", {"init_r": 9}).adapter_config(LoraConfig(r=2))


@pytest.mark.parametrize("policy", ["alora", "increlora", "prilora", "dynamic-rank-dora"])
def test_every_policy_trains_in_the_loop_and_saves_its_ranks(tmp_path, policy):
    opts = {"policy": policy, "interval": 1, "t_init": 0.0, "t_final": 0.25, "realloc": 2}
    report = train(small_config(tmp_path, recipe="adaptive-rank", recipe_options=opts, steps=4),
                   loaded=copy.deepcopy(tiny_loaded()))
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    tensors = saved_tensors(tmp_path / "run" / "adapter")
    saved_rank = sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))
    layers = 3 * 2
    if policy == "prilora":
        assert saved_rank == layers // 2 * 2 + layers // 2 * 6 and rows[0]["pruned_entries"] > 0
    else:
        assert saved_rank == [r["ranks"] for r in rows if "ranks" in r][-1]
        expected = {"alora": 4 * layers, "increlora": 4 * layers, "dynamic-rank-dora": 4 * layers}[policy]
        assert saved_rank == expected   # the budget at t1: constant, grown to r, or pruned to r
    assert report["adapter_score"] is not None


def test_loop_resume_keeps_masks_scores_and_budget(tmp_path):
    from loraplex.training.loop import TrainingInterrupted

    base = tiny_loaded()
    opts = dict(recipe="adaptive-rank", steps=4, checkpoint_every=2,
                recipe_options={"policy": "increlora", "interval": 1, "t_init": 0.0, "t_final": 0.0})
    train(small_config(tmp_path, "full", **opts), loaded=copy.deepcopy(base))
    with pytest.raises(TrainingInterrupted):
        train(small_config(tmp_path, "cut", **opts), loaded=copy.deepcopy(base), stop_after=2)
    train(small_config(tmp_path, "cut", resume=True, **opts), loaded=copy.deepcopy(base))
    a, b = saved_tensors(tmp_path / "full" / "adapter"), saved_tensors(tmp_path / "cut" / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # the importance EMAs went through the checkpoint: the final recipe states agree
    from safetensors.torch import load_file

    full_state = load_file(tmp_path / "full" / "checkpoint" / "state.safetensors")
    cut_state = load_file(tmp_path / "cut" / "checkpoint" / "state.safetensors")
    recipe_keys = [k for k in full_state if k.startswith("recipe.")]
    assert recipe_keys and recipe_keys == [k for k in cut_state if k.startswith("recipe.")]
    for key in recipe_keys:
        torch.testing.assert_close(full_state[key], cut_state[key], rtol=1e-5, atol=1e-9, msg=key)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["ranks"] for r in rows] == [15, 18, 21, 24]   # linear growth from 2 to 4 per layer, 6 layers
