"""Chain of LoRA and PeriodicLoRA (`loraplex/training/recipes/chain_of_lora.py`, `periodic_lora.py`).

Checked against a reference kept in the test, in float64: every K steps W ← W + μ s B A (the base
holds W0 + Σ_k μ s B_k A_k), the adapter restarts (A redrawn, B = 0, optimizer state gone, same
parameter objects) or keeps (1 - μ) B; the saved result is one LoRA whose B A equals the whole chain
on the ORIGINAL base (loaded by loraplex and by PEFT); resume across restarts matches an
uninterrupted run.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from recipe_rank_util import base_weight, data, hook_cfg, hook_step, net, saved_tensors, small_config
from tiny import tiny_loaded

import loraplex
from loraplex import LoraConfig, attach
from loraplex.training.loop import TrainingInterrupted, train
from loraplex.training.recipes import make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model(seed: int = 0):
    return attach(net(seed), LoraConfig(r=2, alpha=4.0, targets=["lin", "gpt2"]))


def low_rank(layer) -> torch.Tensor:
    a = layer.adapters["default"]
    return a.scale * a.lora_B.detach().double() @ a.lora_A.detach().double()


@pytest.mark.parametrize("recipe_name,opts", [("chain-of-lora", {"every": 3}),
                                              ("periodic-lora", {"every": 3, "momentum": 0.25})])
def test_restarts_merge_the_chain_into_the_base_and_save_it_as_one_adapter(tmp_path, recipe_name, opts):
    torch.manual_seed(0)
    model = lora_model()
    w0 = {p: base_weight(layer).clone() for p, layer in model.adapted_layers().items()}
    recipe = make_recipe(recipe_name, opts)
    recipe.setup(model, hook_cfg())
    optimizer = recipe.make_optimizer(model, hook_cfg())
    params = [id(p) for p in model.trainable_parameters()]
    mu = opts.get("momentum", 1.0)
    x, y = data()
    merged = {p: torch.zeros_like(w) for p, w in w0.items()}   # the reference Σ μ s B_k A_k
    for step in range(8):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out_before = model(x).detach()
        unloaded = {p: mu * low_rank(layer) for p, layer in model.adapted_layers().items()}
        fields = recipe.after_step(model, optimizer, step) or {}
        layers = model.adapted_layers()
        if (step + 1) % 3 == 0:
            assert fields == {"restarts": (step + 1) // 3}
            for p, layer in layers.items():
                merged[p] += unloaded[p]
                adapter = layer.adapters["default"]
                if mu == 1.0:   # a fresh adapter: B = 0, A a kaiming draw, no optimizer state
                    assert torch.all(adapter.lora_B == 0)
                    assert adapter.lora_A not in optimizer.state and adapter.lora_B not in optimizer.state
                    assert adapter.lora_A.abs().max() <= 1 / adapter.lora_A.shape[1] ** 0.5
            torch.testing.assert_close(model(x), out_before, rtol=1e-5, atol=1e-6)  # restarting keeps the function
        else:
            assert fields == {}
        for p, layer in layers.items():
            torch.testing.assert_close(base_weight(layer), w0[p] + merged[p], rtol=0, atol=1e-6)
    assert [id(p) for p in model.trainable_parameters()] == params   # the optimizer's tensors throughout
    assert len(recipe.chain) == 2
    x_test = torch.randn(5, 10, generator=torch.Generator().manual_seed(9))
    trained_out = model(x_test).detach()
    current = {p: low_rank(layer) for p, layer in model.adapted_layers().items()}
    recipe.finalize(model)
    layers = model.adapted_layers()
    for p, layer in layers.items():
        assert torch.equal(base_weight(layer), w0[p])   # the original base again, bit for bit
        adapter = layer.adapters["default"]
        assert adapter.method == "lora" and adapter.r == 3 * 2        # two merged links + the current one
        torch.testing.assert_close(low_rank(layer), merged[p] + current[p], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model(x_test), trained_out, rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "out")
    loaded = loraplex.load(net(0), tmp_path / "out")
    torch.testing.assert_close(loaded(x_test), trained_out, rtol=1e-5, atol=1e-6)


def test_momentum_unloading_keeps_the_function_and_the_rest_of_the_update():
    torch.manual_seed(0)
    model = lora_model()
    x, y = data()
    recipe = make_recipe("periodic-lora", {"every": 2, "momentum": 0.4})
    recipe.setup(model, hook_cfg())
    optimizer = recipe.make_optimizer(model, hook_cfg())
    hook_step(model, recipe, optimizer, 0, x, y)
    layer = model.adapted_layers()["lin"]
    w_before, delta_before = base_weight(layer).clone(), low_rank(layer)
    state_before = {k: v.clone() for k, v in optimizer.state[layer.adapters["default"].lora_A].items()}
    out_before = model(x).detach()
    recipe.restart(model, optimizer)
    torch.testing.assert_close(base_weight(layer), w_before + 0.4 * delta_before, rtol=0, atol=1e-6)
    torch.testing.assert_close(low_rank(layer), 0.6 * delta_before, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model(x), out_before, rtol=1e-5, atol=1e-6)
    kept = optimizer.state[layer.adapters["default"].lora_A]
    assert torch.equal(kept["exp_avg"], state_before["exp_avg"])  # momentum unloading keeps the optimizer


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="every must be a positive integer"):
        make_recipe("chain-of-lora", {"every": 0})
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\]"):
        make_recipe("periodic-lora", {"momentum": 1.5})
    with pytest.raises(ValueError, match="unknown option"):
        make_recipe("chain-of-lora", {"momentum": 0.5})
    model = attach(net(), LoraConfig(r=2, targets=["lin"], dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        make_recipe("chain-of-lora").setup(model, hook_cfg())


def test_saved_chain_loads_in_peft_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama

    torch.manual_seed(0)
    model = attach(tiny_llama(), LoraConfig(r=2, alpha=4.0, targets=["q_proj", "v_proj"]))
    recipe = make_recipe("chain-of-lora", {"every": 2})
    recipe.setup(model, hook_cfg())
    optimizer = recipe.make_optimizer(model, hook_cfg(lr=0.02))
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    for step in range(5):
        hook_step(model, recipe, optimizer, step, ids, None, loss_fn=lambda m, x, _: m(input_ids=x).logits.pow(2).mean())
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    recipe.finalize(model)
    model.save(tmp_path / "chain")
    config = json.loads((tmp_path / "chain" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6.0   # two merged links + the current adapter
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "chain")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-5)


def test_loop_resume_across_restarts_matches_an_uninterrupted_run(tmp_path):
    base = tiny_loaded()
    opts = dict(recipe="periodic-lora", recipe_options={"every": 2, "momentum": 0.5}, checkpoint_every=3)
    full = train(small_config(tmp_path, "full", **opts), loaded=copy.deepcopy(base))
    with pytest.raises(TrainingInterrupted):
        train(small_config(tmp_path, "cut", **opts), loaded=copy.deepcopy(base), stop_after=3)  # mid-chain
    resumed = train(small_config(tmp_path, "cut", resume=True, **opts), loaded=copy.deepcopy(base))
    a, b = saved_tensors(tmp_path / "full" / "adapter"), saved_tensors(tmp_path / "cut" / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape[0 if key.endswith("lora_A.weight") else 1] == 4 * 4   # 3 unloads + current, r=4
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert full["adapter_score"] == resumed["adapter_score"]
    rows = [json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("restarts") for r in rows] == [None, 1, None, 2, None, 3]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_loop_chain_of_lora_end_to_end(tmp_path):
    report = train(small_config(tmp_path, recipe="chain-of-lora", recipe_options={"every": 3}, steps=5),
                   loaded=copy.deepcopy(tiny_loaded()))
    tensors = saved_tensors(tmp_path / "run" / "adapter")
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {2 * 4}  # 1 merge + current
    assert report["adapter_score"] is not None
