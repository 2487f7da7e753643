"""DyLoRA (`loraplex/training/recipes/dylora.py`): the adapter evaluated at rank k equals its truncation
to k, i.e. a rank-k LoRA (A[:k], B[:, :k], scale alpha / k) computed here in float64; it saves at any k
as a plain LoRA that loraplex and PEFT load; training draws b uniformly and updates rank b only.
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from conftest import tiny_llama
from recipe_rank_util import base_weight, hook_cfg, net, saved_tensors, small_config
from tiny import tiny_loaded

import loraplex
from loraplex import LoraConfig, attach
from loraplex.training.loop import train
from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.dylora import save_at_rank, set_rank

pytestmark = pytest.mark.usefixtures("one_thread")


def dylora_model(model, recipe, **kw):
    config = recipe.adapter_config(LoraConfig(r=4, alpha=6.0, **kw))
    model = attach(model, config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.adapted_layers().values():
            b = layer.adapters["default"].lora_B
            b.copy_(torch.randn(b.shape, generator=g))
    recipe.setup(model, hook_cfg())
    return model


def truncated_reference(layer, x: torch.Tensor, k: int) -> torch.Tensor:
    a = layer.adapters["default"]
    delta = (a.alpha / k) * a.lora_B.detach().double()[:, :k] @ a.lora_A.detach().double()[:k]
    return x @ (base_weight(layer) + delta).t() + layer.base_layer.bias.detach().double()


def test_rank_k_equals_the_truncation_to_k_and_saves_at_any_k(tmp_path):
    recipe = make_recipe("dylora")
    model = dylora_model(net(), recipe, targets=["lin", "gpt2"])
    layer = model.adapted_layers()["lin"]
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    for k in (1, 2, 3, 4):
        set_rank(model, k)
        torch.testing.assert_close(layer(x).double(), truncated_reference(layer, x.double(), k), rtol=1e-5, atol=1e-5)
        out = model(x).detach()
        save_at_rank(model, tmp_path / f"r{k}", k)
        config = json.loads((tmp_path / f"r{k}" / "adapter_config.json").read_text())
        assert config["r"] == k and config["rank_pattern"] == {}
        assert model.adapted_layers()["lin"].adapters["default"].active_rank == k   # left as it was
        loaded = loraplex.load(net(), tmp_path / f"r{k}")
        torch.testing.assert_close(loaded(x), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside 1..4"):
        set_rank(model, 5)


def test_saved_rank_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    recipe = make_recipe("dylora")
    model = dylora_model(tiny_llama(), recipe, targets=["q_proj", "v_proj"])
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1))
    set_rank(model, 3)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    save_at_rank(model, tmp_path / "r3", 3)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "r3")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-5)


def test_each_step_trains_one_uniformly_drawn_rank():
    recipe = make_recipe("dylora", {"r_min": 2})
    model = dylora_model(tiny_llama(), recipe, targets=["q_proj"])
    draws = [recipe.draw(step) for step in range(400)]
    assert draws == [recipe.draw(step) for step in range(400)]   # reproducible from (seed, step): resumable
    counts = Counter(draws)
    assert set(counts) == {2, 3, 4} and min(counts.values()) > 100
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, _ = recipe.loss(model, batch, 7)
    loss.backward()
    b = recipe.draw(7)
    adapter = next(iter(model.adapted_layers().values())).adapters["default"]
    assert adapter.active_rank == b and adapter.train_last_only
    rows = adapter.lora_A.grad.abs().sum(1)
    assert rows[b - 1] > 0 and int((rows > 0).sum()) == 1     # only rank b learns ("frozen" mode)
    assert recipe.after_step(model, None, 7) == {"dylora_rank": b}
    assert adapter.active_rank is None                        # evaluation sees the whole adapter


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="r_min must be a positive integer"):
        make_recipe("dylora", {"r_min": 0})
    with pytest.raises(ValueError, match="r_min=9 exceeds r=4"):
        make_recipe("dylora", {"r_min": 9}).adapter_config(LoraConfig(r=4))
    with pytest.raises(ValueError, match="method must be 'lora'"):
        make_recipe("dylora").adapter_config(LoraConfig(r=4, method="vera"))


def test_loop_trains_and_saves_at_the_requested_rank(tmp_path):
    cfg = small_config(tmp_path, recipe="dylora", recipe_options={"save_rank": 2}, steps=4)
    report = train(cfg, loaded=copy.deepcopy(tiny_loaded()))
    tensors = saved_tensors(tmp_path / "run" / "adapter")
    assert all(t.shape[0 if k.endswith("lora_A.weight") else 1] == 2 for k, t in tensors.items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(1 <= r["dylora_rank"] <= 4 for r in rows)
    assert report["adapter_score"] is not None
