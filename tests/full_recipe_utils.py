"""Helpers shared by the full-parameter recipe tests (GaLore, Flora, COAP, LISA, BAdam)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import hf_ids, tiny_llama
from safetensors.torch import load_file
from tiny import tiny_loaded

from loraplex.training.loop import TrainConfig, TrainingInterrupted, train
from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.full import FullParameterModel


def recipe_model(name: str, options: dict, layers: int = 2, hidden: int = 16, lr: float = 1e-2,
                 weight_decay: float = 0.0, grad_accum: int = 1, seed: int = 0):
    """(recipe, FullParameterModel of a tiny Llama, optimizer) as the training loop builds them."""
    recipe = make_recipe(name, options)
    hf = tiny_llama(seed=seed, layers=layers, hidden=hidden)
    model = FullParameterModel(hf, recipe.full_parameters(hf))
    cfg = SimpleNamespace(lr=lr, weight_decay=weight_decay, grad_accum=grad_accum)
    recipe.setup(model, cfg)
    return recipe, model, recipe.make_optimizer(model, cfg)


def train_steps(model, optimizer, steps: int, recipe=None, seed: int = 1) -> list[dict]:
    """Plain steps on fixed random tokens; returns the recipe's log fields of each step."""
    ids = hf_ids(batch=3, seq=8, seed=seed)
    fields = []
    for step in range(steps):
        model.model(input_ids=ids, labels=ids).loss.backward()
        if recipe is not None:
            recipe.after_backward(model, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if recipe is not None:
            fields.append(recipe.after_step(model, optimizer, step) or {})
    return fields


def adamw_state_bytes(params) -> int:
    """The full AdamW baseline: two fp32 moments per weight and a 4-byte step per tensor."""
    return sum(2 * p.numel() * 4 + 4 for p in params)


def assert_resume_matches(tmp_path, recipe: str, options: dict, atol: float = 1e-6, **overrides) -> None:
    """Train 6 steps straight, and 3 + (stop, checkpoint, resume) 3: the saved weights agree."""
    def config(name, **kw):
        values = dict(data="dates", steps=6, batch_size=4, train_samples=24, eval_samples=4, max_length=512,
                      lr=1e-2, warmup_steps=1, checkpoint_every=2, output=str(tmp_path / name), base_eval=False,
                      eval_batch_size=4, recipe=recipe, recipe_options=options)
        values.update(overrides, **kw)
        return TrainConfig(**values)

    base = tiny_loaded()
    report = train(config("full"), loaded=copy.deepcopy(base))
    with pytest.raises(TrainingInterrupted):
        train(config("cut"), loaded=copy.deepcopy(base), stop_after=3)
    train(config("cut", resume=True), loaded=copy.deepcopy(base))
    a = load_file(tmp_path / "full" / "weights" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "weights" / "model.safetensors")
    assert a.keys() == b.keys() and report["recipe"] == recipe
    initial = dict(base.model.named_parameters())
    assert any(not torch.equal(a[k], initial[k]) for k in a), "training changed nothing"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)
