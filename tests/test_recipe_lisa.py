"""LISA: embeddings + head always trained, γ sampled layers per period, the rest frozen with no
optimizer state; the schedule, the update, the state memory and resume."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import hf_ids
from full_recipe_utils import adamw_state_bytes, assert_resume_matches, recipe_model, train_steps

from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.full import transformer_layers


def layer_params(model):
    _, layers = transformer_layers(model.model)
    return [list(layer.parameters()) for layer in layers]


def test_only_the_sampled_layers_and_the_always_set_train(one_thread):
    recipe, model, opt = recipe_model("lisa", {"layers": 2, "interval": 3}, layers=4)
    layers = layer_params(model)
    in_layers = {id(p) for ps in layers for p in ps}
    always = [p for p in model.trainable_parameters() if id(p) not in in_layers]
    assert {id(p) for p in model.model.get_input_embeddings().parameters()} <= {id(p) for p in always}
    assert {id(p) for p in model.model.get_output_embeddings().parameters()} <= {id(p) for p in always}
    active = list(opt.active)
    assert len(active) == 2
    for i, ps in enumerate(layers):
        assert all(p.requires_grad == (i in active) for p in ps)
    before = copy.deepcopy(model.model.state_dict())
    fields = train_steps(model, opt, 3, recipe)  # one full period
    named = dict(model.model.named_parameters())
    for name, p in named.items():
        layer = next((i for i, ps in enumerate(layers) if any(p is q for q in ps)), None)
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (layer is None or layer in active), name
    # state during the period: AdamW's two moments + a step counter for the always set and γ layers only
    trained = always + [p for i in active for p in layers[i]]
    assert fields[-1]["optimizer_state_bytes"] == adamw_state_bytes(trained)
    assert adamw_state_bytes(trained) < adamw_state_bytes(model.trainable_parameters())
    # after the period the layers were resampled and the frozen layers' moments dropped
    assert opt.period == 1
    assert {id(p) for p in opt.state} <= {id(p) for p in always + [p for i in opt.active for p in layers[i]]}


def test_the_update_is_adamw_on_the_active_set(one_thread):
    recipe, model, opt = recipe_model("lisa", {"layers": 1, "interval": 4}, layers=3, lr=1e-2, weight_decay=0.1)
    layers = layer_params(model)
    active_ids = {id(p) for p in layers[opt.active[0]]} | {
        id(p) for p in model.trainable_parameters() if all(p is not q for ps in layers for q in ps)}
    reference = copy.deepcopy(model.model)
    ref_params = dict(reference.named_parameters())
    trained = [(n, ref_params[n]) for n, p in model.named_trainable() if id(p) in active_ids]
    for n, p in ref_params.items():
        p.requires_grad_(any(n == m for m, _ in trained))
    mats = [p for _, p in trained if p.ndim >= 2]
    vecs = [p for _, p in trained if p.ndim < 2]
    ref_opt = torch.optim.AdamW([{"params": mats, "weight_decay": 0.1}, {"params": vecs, "weight_decay": 0.0}],
                                lr=1e-2)
    train_steps(model, opt, 3)
    ids = hf_ids(batch=3, seq=8, seed=1)
    for _ in range(3):
        reference(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for (name, a), b in zip(model.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_layers_are_sampled_uniformly_per_period():
    recipe, model, opt = recipe_model("lisa", {"layers": 2, "interval": 1, "seed": 3}, layers=4)
    picks = [tuple(opt.choose(k)) for k in range(400)]
    assert all(len(set(p)) == 2 for p in picks)  # without replacement
    counts = Counter(i for p in picks for i in p)
    assert set(counts) == {0, 1, 2, 3}
    assert all(abs(c / 400 - 0.5) < 0.1 for c in counts.values())  # p_ℓ = γ / N_L = 1/2
    assert picks == [tuple(opt.choose(k)) for k in range(400)]  # a function of (seed, period) only


def test_resume_equals_uninterrupted_run(tmp_path):
    assert_resume_matches(tmp_path, "lisa", {"layers": 1, "interval": 2})


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="between 1 and the model's 2 layers"):
        recipe_model("lisa", {"layers": 3}, layers=2)
    with pytest.raises(ValueError, match="interval must be a positive integer"):
        make_recipe("lisa", {"interval": 0})
