"""AutoLoRA (`loraplex/training/recipes/autolora.py`): selection variables α = softmax(g) learned on a
held-out split of the training data by alternating with the weights (bi-level, first order). The test
re-runs one alternation by hand from the definition: AdamW on A, B with the training rows' loss, then
AdamW on g with the held-out rows' loss at the updated weights; then the thresholding.
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
from loraplex.training.loop import completion_loss, train
from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.autolora import held_out_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(steps: int = 4):
    return types.SimpleNamespace(lr=0.05, weight_decay=0.0, steps=steps, epochs=None)


def batch(rows: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 40, (rows, 7), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def autolora_model(recipe):
    torch.manual_seed(0)
    model = attach(tiny_llama(), recipe.adapter_config(LoraConfig(r=4, alpha=8.0, targets=["q_proj", "v_proj"])))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.adapted_layers().values():
            b = layer.adapters["default"].lora_B
            b.copy_(0.3 * torch.randn(b.shape, generator=g))
    recipe.setup(model, cfg())
    return model, recipe.make_optimizer(model, cfg())


def test_held_out_split_is_fixed_by_content():
    b = batch(rows=400)
    held = held_out_rows(b, 0.25)
    assert 60 < int(held.sum()) < 140                                       # about a quarter
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    shuffled = {k: v[perm] for k, v in b.items()}
    assert torch.equal(held_out_rows(shuffled, 0.25), held[perm])         # the same rows in any batch order
    padded = {"input_ids": torch.cat([b["input_ids"], torch.zeros(400, 3, dtype=torch.long)], 1),
              "attention_mask": torch.cat([b["attention_mask"], torch.zeros(400, 3, dtype=torch.long)], 1)}
    assert torch.equal(held_out_rows(padded, 0.25), held)                # padding does not move a row


def test_one_alternation_matches_the_bilevel_definition():
    recipe = make_recipe("autolora", {"val_fraction": 0.5, "alpha_lr": 0.1})
    model, optimizer = autolora_model(recipe)
    reference = copy.deepcopy(model)
    data = batch()
    held = held_out_rows(data, 0.5)
    assert 0 < int(held.sum()) < 8
    # ours, as the loop drives it
    loss, n = recipe.loss(model, data, 0)
    loss.backward()
    recipe.after_backward(model, 0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    fields = recipe.after_step(model, optimizer, 0)
    # reference: the weights step on the training rows, then g steps on the held-out rows
    gates = [layer.adapters["default"].lora_gate for layer in reference.adapted_layers().values()]
    weights = [p for p in reference.trainable_parameters() if all(p is not g for g in gates)]
    w_opt = torch.optim.AdamW(weights, lr=0.05, weight_decay=0.0)
    g_opt = torch.optim.AdamW(gates, lr=0.1, weight_decay=0.0)
    train_rows = {k: v[~held] for k, v in data.items()}
    val_rows = {k: v[held] for k, v in data.items()}
    completion_loss(reference.model, train_rows)[0].backward()
    w_opt.step()
    for p in reference.parameters():
        p.grad = None
    val = completion_loss(reference.model, val_rows)[0]
    val.backward()
    g_opt.step()
    assert n == int((train_rows["labels"][:, 1:] != -100).sum())
    assert fields == {"val_loss": round(float(val), 5)}
    ours = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(ours[name], p, rtol=1e-5, atol=1e-7, msg=name)
    moved = [g for g in recipe.gates if not torch.allclose(g, torch.zeros_like(g))]
    assert moved   # the selection variables did learn from the held-out rows


def test_search_end_keeps_ranks_above_the_threshold_and_saves_them(tmp_path):
    recipe = make_recipe("autolora", {"search_fraction": 0.25})   # search ends after step 1 of 4
    model, optimizer = autolora_model(recipe)
    with torch.no_grad():
        for i, g in enumerate(recipe.gates):
            g.copy_(torch.tensor([2.0, 0.0, -1.0, 0.1 * i]))
    alphas = [torch.softmax(g.detach(), 0) for g in recipe.gates]
    a_obj = recipe.layers["model.layers.0.self_attn.q_proj"].lora_A
    fields = recipe.after_step(model, optimizer, 0)
    expected = [int((a >= 0.25).sum()) for a in alphas]
    assert fields == {"autolora_ranks": sum(expected)} and not recipe.searching
    for adapter, alpha in zip(recipe.layers.values(), alphas):
        assert torch.equal(adapter.rank_mask, (alpha >= 0.25).float())
        assert torch.equal(adapter.rank_weights(), adapter.rank_mask)     # selection switched off
        assert torch.all(adapter.lora_B == 0)                             # retraining from a fresh start
    assert recipe.layers["model.layers.0.self_attn.q_proj"].lora_A is a_obj
    recipe.finalize(model)
    model.save(tmp_path / "auto")
    ranks = [t.shape[0] for k, t in saved_tensors(tmp_path / "auto").items() if k.endswith("lora_A.weight")]
    assert sorted(ranks) == sorted(expected)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="val_fraction=1 leaves no training split"):
        make_recipe("autolora", {"val_fraction": 1})
    with pytest.raises(ValueError, match="threshold must be in"):
        make_recipe("autolora", {"threshold": 2})


def test_loop_searches_then_retrains_with_the_selected_ranks(tmp_path):
    opts = {"search_fraction": 0.5, "val_fraction": 0.3}
    report = train(small_config(tmp_path, recipe="autolora", recipe_options=opts, steps=4),
                   loaded=copy.deepcopy(tiny_loaded()))
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows[:2]) and not any("val_loss" in r for r in rows[2:])
    kept = rows[1]["autolora_ranks"]
    tensors = saved_tensors(tmp_path / "run" / "adapter")
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")) == kept
    assert kept < 4 * 6 and report["adapter_score"] is not None
