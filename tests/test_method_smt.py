"""SMT (`loraplex/methods/smt.py`) against the paper's selection rule and update.

Reference, recomputed here on an untouched copy of the base model:
    G = mean over the calibration batches of ∂L/∂W  (next-token cross-entropy on supervised labels),
    score(i, j) = |mean of G over block (i, j)|  (or the block's L2 norm with score="l2"),
    the n_blocks best blocks over all adapted layers are selected;
    y = (W + ΔW) x + b,  ΔW zero outside the selected b x b blocks, D_ij inside.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import hf_ids, tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    calibration_batches,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    check_starts_as_base,
    linear_reference,
    mean_weight_gradients,
    perturb,
    perturb_both,
    two_layer_net,
    x_in,
)

import loraplex
from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer

PATHS = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]     # 16 -> 48 and 16 -> 32


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (16 -> 8) and a GPT-2 Conv1D (8 -> 12), adapted, then a plain head."""
    return two_layer_net(16, 8, 12, seed)


def net_with_blocks(name: str = "default", model=None, r: int = 2):
    """Net with blocks chosen by hand (4 x 4): lin (2 x 4 grid) gets 3, gpt2 (3 x 2 grid) gets 2."""
    cfg = LoraConfig(method="smt", r=r, targets=["lin", "gpt2"], options={"block_size": 4})
    model = attach(net(), cfg, name) if model is None else (model.add_adapter(name, cfg) or model)
    layers = model.adapted_layers(name)
    layers["lin"].adapters[name].set_blocks(torch.tensor([[0, 1], [1, 0], [1, 3]]), 4)
    layers["gpt2"].adapters[name].set_blocks(torch.tensor([[2, 1], [0, 0]]), 4)
    return model


def reference_delta(layer: AdaptedLayer, name: str = "default") -> torch.Tensor:
    a = layer.adapters[name]
    b = a.block_size
    delta = torch.zeros(layer.spec.out_features, layer.spec.in_features, dtype=torch.float64)
    for (i, j), block in zip(a.smt_index.tolist(), a.smt_blocks.detach().double()):
        delta[i * b:(i + 1) * b, j * b:(j + 1) * b] = block
    return delta


def reference_selection(grads: dict[str, torch.Tensor], b: int, n: int, score: str) -> set[tuple[str, int, int]]:
    scored = []
    for path, g in grads.items():
        for i in range(g.shape[0] // b):
            for j in range(g.shape[1] // b):
                block = g[i * b:(i + 1) * b, j * b:(j + 1) * b]
                value = block.mean().abs() if score == "mean_abs" else block.norm()
                scored.append((float(value), path, i, j))
    scored.sort(key=lambda t: -t[0])
    return {(p, i, j) for _, p, i, j in scored[:n]}


@pytest.mark.parametrize("score", ["mean_abs", "l2"])
def test_calibration_selects_the_blocks_with_the_largest_gradient_scores(score, caplog):
    batches = calibration_batches()
    cfg = LoraConfig(method="smt", targets=PATHS, options={"block_size": 8, "n_blocks": 5, "score": score})
    with caplog.at_level(logging.INFO, logger="loraplex"):
        model = attach(tiny_gpt2(), cfg, calibration_data=batches)
    assert any("smt: chose 5 blocks of 8x8" in r.message and "calibration batches" in r.message for r in caplog.records)
    chosen = {(p, i, j) for p, layer in model.adapted_layers().items()
              for i, j in layer.adapters["default"].smt_index.tolist()}
    assert chosen == reference_selection(mean_weight_gradients(tiny_gpt2(), batches, PATHS), 8, 5, score)
    assert model.trainable_parameter_count() == 5 * 8 * 8
    # the blocks start at zero: the calibrated adapter is the identity, and the base is untouched
    ids = hf_ids()
    with model.disabled():
        base = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)
    for path in PATHS:
        torch.testing.assert_close(model.adapted_layers()[path].base_layer.weight,
                                   tiny_gpt2().get_submodule(path).weight, rtol=0, atol=0)


def test_default_budget_is_a_rank_r_lora_and_block_size_is_auto():
    cfg = LoraConfig(method="smt", r=4, targets=PATHS)
    model = attach(tiny_gpt2(), cfg, calibration_data=calibration_batches(1))
    b = model.adapted_layers()[PATHS[0]].adapters["default"].block_size
    assert b == 16                                         # largest power of two dividing 16, 48 and 32
    lora_budget = 4 * (16 + 48) + 4 * (16 + 32)
    assert model.trainable_parameter_count() == (lora_budget // (16 * 16)) * 16 * 16


def test_calibration_is_deterministic():
    cfg = LoraConfig(method="smt", targets=PATHS, options={"block_size": 8, "n_blocks": 4})
    one = attach(tiny_gpt2(), cfg, calibration_data=calibration_batches())
    two = attach(tiny_gpt2(), cfg, calibration_data=calibration_batches())
    for (n1, t1), (n2, t2) in zip(one.state_dict().items(), two.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    with pytest.raises(ValueError, match="no batches"):
        attach(tiny_gpt2(), cfg, calibration_data=[])


def test_without_calibration_nothing_trains_and_the_output_is_the_base():
    model = attach(net(), LoraConfig(method="smt", targets=["lin", "gpt2"])).eval()
    assert model.trainable_parameter_count() == 0
    check_starts_as_base(model, x_in(16), rtol=0, atol=0)


def test_output_matches_paper_equation():
    model = net_with_blocks().eval()
    perturb(model, fan_in=True)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        ref = linear_reference(layer, x, base_weight(layer) + reference_delta(layer))
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=path)
    assert model.trainable_parameter_count() == 5 * 4 * 4


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = net_with_blocks().eval()
    perturb(model, fan_in=True)
    check_merge_unmerge(model, x_in(16), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip_needs_no_data(tmp_path):
    cfg = LoraConfig(method="smt", targets=PATHS, options={"block_size": 8, "n_blocks": 5})
    model = attach(tiny_gpt2(), cfg, calibration_data=calibration_batches()).eval()
    perturb(model, fan_in=True)
    loaded, _ = check_save_load(model, tiny_gpt2, hf_ids(), tmp_path, peft_type="SMT", rtol=0, atol=0,
                                eval_loaded=True, logits=True)
    assert loaded.trainable_parameter_count() == model.trainable_parameter_count() == 5 * 64


def test_mixed_batch_equals_each_row_alone():
    model = net_with_blocks("a")
    net_with_blocks("b", model)
    model.eval()
    perturb_both(model, seed_b=5, fan_in=True)
    check_mixed_batch(model, x_in(16, rows=5), rtol=1e-5, atol=1e-6)


def test_gpt2_trains_only_the_selected_blocks():
    cfg = LoraConfig(method="smt", targets=PATHS, options={"block_size": 8, "n_blocks": 3})
    model = attach(tiny_gpt2(), cfg, calibration_data=calibration_batches(2))
    ids = hf_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    params = model.trainable_parameters()
    assert sum(p.numel() for p in params) == 3 * 64
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params if p.numel())   # a layer may get none


def test_bad_settings_say_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match="block_size=5 must divide"):
        attach(net(), LoraConfig(method="smt", targets=["lin"], options={"block_size": 5}))
    with pytest.raises(ValueError, match="score must be one of"):
        attach(net(), LoraConfig(method="smt", targets=["lin"], options={"score": "max"}))
    with pytest.raises(ValueError, match="n_blocks must be a positive integer"):
        attach(net(), LoraConfig(method="smt", targets=["lin"], options={"n_blocks": 0}))
    model = net_with_blocks()
    model.save(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lin.smt_index"] = torch.tensor([[0, 1], [1, 0], [2, 3]])
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(loraplex.AdapterFileError, match="outside the 2 x 4 grid"):
        loraplex.load(net(), tmp_path)
