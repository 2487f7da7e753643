"""SoRA (`loraplex/training/recipes/sora.py`): after each optimizer step the gates take the proximal
L1 step g ← sign(g)·max(|g| − η ξ, 0) (reference written here), which sets gates EXACTLY to zero;
on save the zeroed ranks are removed (per-layer ranks in PEFT's rank_pattern, loaded by PEFT).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_llama
from recipe_rank_util import hook_cfg, saved_tensors, small_config
from tiny import tiny_loaded

from loraplex import LoraConfig, attach
from loraplex.training.loop import train
from loraplex.training.recipes import make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def sora_model(recipe, lr: float = 0.05):
    model = attach(tiny_llama(), recipe.adapter_config(LoraConfig(r=4, alpha=8.0, targets=["q_proj", "v_proj"])))
    recipe.setup(model, hook_cfg(lr))
    return model, recipe.make_optimizer(model, hook_cfg(lr))


def lm_loss(model, ids):
    return model(input_ids=ids).logits.pow(2).mean()


def test_proximal_step_soft_thresholds_the_gates_to_exact_zeros():
    torch.manual_seed(0)
    recipe = make_recipe("sora", {"xi": 2.0})
    model, optimizer = sora_model(recipe, lr=0.1)
    gates = recipe.gates
    assert {id(g) for g in gates} == {id(p) for p in optimizer.param_groups[1]["params"]}
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    lm_loss(model, ids).backward()
    recipe.after_backward(model, 0)
    optimizer.step()
    after_adam = [g.detach().clone() for g in gates]
    fields = recipe.after_step(model, optimizer, 0)
    tau = 2.0 * 0.1
    for g, before in zip(gates, after_adam):
        expected = torch.where(before.abs() <= tau, torch.zeros_like(before), before - tau * torch.sign(before))
        torch.testing.assert_close(g.detach(), expected, rtol=0, atol=1e-7)
        assert torch.all(g[before.abs() <= tau] == 0.0)          # exactly zero, not merely small
    assert fields == {"sora_ranks": sum(int((g != 0).sum()) for g in gates)}
    assert fields["sora_ranks"] < 4 * len(gates)


def test_zeroed_ranks_are_removed_on_save_and_peft_loads_the_result(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    recipe = make_recipe("sora", {"xi": 1.0})
    model, optimizer = sora_model(recipe, lr=0.1)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    for step in range(3):
        lm_loss(model, ids).backward()
        recipe.after_backward(model, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recipe.after_step(model, optimizer, step)
    kept = {p: int((layer.adapters["default"].lora_gate != 0).sum()) for p, layer in model.adapted_layers().items()}
    assert 0 < sum(kept.values()) < 4 * len(kept) and len(set(kept.values())) > 1
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    recipe.finalize(model)
    layers = model.adapted_layers()
    assert {p: layers[p].adapters["default"].r for p in layers} == {p: k for p, k in kept.items() if k}
    model.save(tmp_path / "sora")
    config = json.loads((tmp_path / "sora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "sora")
    for name, module in theirs.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            assert module.lora_A["default"].weight.shape[0] == kept[path]
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-5)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="xi"):
        make_recipe("sora", {"xi": -1})
    with pytest.raises(ValueError, match="gate_lr"):
        make_recipe("sora", {"gate_lr": 0})


def test_loop_prunes_gates_and_saves_the_pruned_adapter(tmp_path):
    cfg = small_config(tmp_path, recipe="sora", recipe_options={"xi": 20.0}, steps=4)
    train(cfg, loaded=copy.deepcopy(tiny_loaded()))
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert rows[-1]["sora_ranks"] < rows[0]["sora_ranks"] <= 4 * 3 * 2
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["loraplex"]["config"]["method"] == "lora"
    tensors = saved_tensors(tmp_path / "run" / "adapter")
    # exactly the ranks whose gates survived the last proximal step are saved
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")) == rows[-1]["sora_ranks"]


def test_peft_files_with_rank_pattern_load_in_loraplex(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             rank_pattern={"model.layers.0.self_attn.q_proj": 1, "v_proj": 3},
                             alpha_pattern={"v_proj": 5.0})
    theirs = peft.get_peft_model(tiny_llama(), config)
    theirs.save_pretrained(tmp_path / "peft")
    from loraplex import load

    ours = load(tiny_llama(), tmp_path / "peft")
    ranks = {p: layer.adapters["default"].r for p, layer in ours.adapted_layers().items()}
    assert ranks == {"model.layers.0.self_attn.q_proj": 1, "model.layers.1.self_attn.q_proj": 4,
                     "model.layers.0.self_attn.v_proj": 3, "model.layers.1.self_attn.v_proj": 3}
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
