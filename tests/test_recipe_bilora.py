"""BiLoRA (Qiang et al. 2024): ΔW = P Λ Q; P, Q learn from one part of the data (plus the
orthogonality regulariser), Λ from the other part."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from recipe_opt_util import adapted, batch, run

from loraplex.training.loop import TrainConfig
from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.bilora import row_in_upper_split

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(**options):
    recipe = make_recipe("bilora", options)
    model = adapted(recipe)
    recipe.setup(model, TrainConfig())
    return recipe, model


def test_adapter_is_a_pseudo_svd_starting_at_zero():
    recipe, model = setup()
    for pair in recipe.pairs:
        a = pair.adapter
        assert a.method == "gated-lora" and a.gate_mode == "linear"
        assert torch.equal(a.lora_gate, torch.zeros_like(a.lora_gate))    # Λ = 0: ΔW = 0
        assert bool(a.lora_A.any()) and bool(a.lora_B.any())               # P, Q drawn non-zero


def test_split_is_a_fixed_partition_of_examples():
    data = batch(8)
    recipe, _ = setup(upper_fraction=0.5)
    lower, upper = recipe.split(data)
    assert lower.numel() and upper.numel() and lower.numel() + upper.numel() == 8
    # the side of an example does not depend on its batch (padding, neighbours, order)
    for i in range(8):
        one = batch(8)
        ids, mask = one["input_ids"][i], one["attention_mask"][i]
        assert row_in_upper_split(ids, mask, 0.5) == (i in upper.tolist())
        padded = torch.cat([ids, torch.zeros(3, dtype=ids.dtype)])
        assert row_in_upper_split(padded, torch.cat([mask, torch.zeros(3, dtype=mask.dtype)]), 0.5) == (i in upper.tolist())


def reference_loss(model, data, rows):
    logits = model(input_ids=data["input_ids"][rows], attention_mask=data["attention_mask"][rows]).logits
    labels = data["labels"][rows][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)


def test_gradients_come_from_the_right_split():
    recipe, model = setup(upper_fraction=0.5, orth_weight=0.3)
    for pair in recipe.pairs:  # Λ ≠ 0 so P and Q get a task gradient
        pair.adapter.lora_gate.data.uniform_(0.5, 1.5)
    data = batch(8)
    lower, upper = recipe.split(data)
    loss, _ = recipe.loss(model, data, 0)
    loss.backward()
    recipe.after_backward(model, 0)
    got = {id(p): p.grad.clone() for p in recipe.lower + recipe.upper}
    # reference: lower objective on D1 rows (+ γ R1) for P, Q; plain loss on D2 rows for Λ
    model.zero_grad(set_to_none=True)
    r1 = sum((pr.B.t() @ pr.B - torch.eye(4)).pow(2).sum() + (pr.A @ pr.A.t() - torch.eye(4)).pow(2).sum()
             for pr in recipe.pairs)
    (reference_loss(model, data, lower) + 0.3 * r1).backward()
    for p in recipe.lower:
        torch.testing.assert_close(got[id(p)], p.grad, rtol=1e-4, atol=1e-7)
    model.zero_grad(set_to_none=True)
    reference_loss(model, data, upper).backward()
    for p in recipe.upper:
        torch.testing.assert_close(got[id(p)], p.grad, rtol=1e-4, atol=1e-7)


def test_trains_through_the_loop(tmp_path):
    report = run(tmp_path, recipe="bilora", steps=4)
    assert report["final_loss"] is not None
    with pytest.raises(ValueError, match="upper_fraction must be a number in"):
        make_recipe("bilora", {"upper_fraction": 1.0})
