"""BAdam: one block (transformer layer) trained at a time with Adam, switched every K steps in the
chosen order; optimizer state only for the active block; resume."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import hf_ids
from full_recipe_utils import adamw_state_bytes, assert_resume_matches, recipe_model, train_steps

from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.full import transformer_layers


def blocks_of(model):
    _, layers = transformer_layers(model.model)
    return [list(layer.parameters()) for layer in layers]


@pytest.mark.parametrize("order, expected", [("ascending", [0, 1, 2, 0, 1]), ("descending", [2, 1, 0, 2, 1])])
def test_blocks_switch_every_k_steps_in_order(one_thread, order, expected):
    recipe, model, opt = recipe_model("badam", {"interval": 2, "order": order}, layers=3)
    seen = []
    for _ in range(5):
        seen.append(opt.active[0])
        train_steps(model, opt, 2)
    assert seen == expected


def test_random_order_visits_every_block_once_per_epoch():
    recipe, model, opt = recipe_model("badam", {"order": "random", "seed": 5}, layers=4)
    picks = [opt.choose(k)[0] for k in range(12)]
    for epoch in range(3):
        assert sorted(picks[4 * epoch:4 * epoch + 4]) == [0, 1, 2, 3]


def test_one_period_is_adam_on_the_active_block_alone(one_thread):
    recipe, model, opt = recipe_model("badam", {"interval": 3, "order": "ascending", "start": 1}, layers=3,
                                      weight_decay=0.1)
    blocks = blocks_of(model)
    assert opt.active == [1]
    reference = copy.deepcopy(model.model)
    _, ref_layers = transformer_layers(reference)
    block = list(ref_layers[1].parameters())
    for p in reference.parameters():
        p.requires_grad_(any(p is q for q in block))
    ref_opt = torch.optim.AdamW([{"params": [p for p in block if p.ndim >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in block if p.ndim < 2], "weight_decay": 0.0}], lr=1e-2)
    before = copy.deepcopy(model.model.state_dict())
    fields = train_steps(model, opt, 3, recipe)
    ids = hf_ids(batch=3, seq=8, seed=1)
    for _ in range(3):
        reference(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for (name, a), b in zip(model.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(a.detach(), before[name]) == (not any(a is q for q in blocks[1])), name
    # state: the active block's moments only, against AdamW over every trained weight
    assert fields[-1]["optimizer_state_bytes"] == adamw_state_bytes(blocks[1])
    assert adamw_state_bytes(blocks[1]) * 3 == adamw_state_bytes(model.trainable_parameters())
    # the switch reset the state: the new block starts from fresh moments
    assert opt.active == [2] and all(not any(p is q for q in blocks[2]) for p in opt.state)
    train_steps(model, opt, 1)
    assert {id(p) for p in opt.state} == {id(p) for p in blocks[2]}
    assert all(int(s["step"]) == 1 for s in opt.state.values())


def test_embedding_and_head_blocks_are_optional():
    recipe, model, opt = recipe_model("badam", {"include_embedding": True, "include_head": True}, layers=2)
    assert len(opt.blocks) == 4  # 2 layers, the embeddings, the head and final norm
    names = set(model.trainable_names)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names and "model.norm.weight" in names
    _, plain, _ = recipe_model("badam", {}, layers=2)
    assert all(".layers." in n for n in plain.trainable_names)


def test_resume_equals_uninterrupted_run(tmp_path):
    assert_resume_matches(tmp_path, "badam", {"interval": 2, "order": "random"})


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="order must be one of ascending, descending, random, fixed"):
        make_recipe("badam", {"order": "sideways"})
    with pytest.raises(ValueError, match="start block must be in 0..1"):
        recipe_model("badam", {"start": 5}, layers=2)
