"""Bone / MiSS (`loraplex/methods/bone.py`) against the paper's equations and PEFT 0.21's MiSS.

Reference, in float64 with explicit loops over blocks, from the adapter's raw tensor:
    "bat"     ΔW_ij = W_ij B_i + B_i     (W_ij the r x r block of row block i, column block j)
    "balance" ΔW[o, j] = D[j mod r, o]
    "mini"    ΔW[o, j] = D_mini[j mod r, o mod mini_r]
    y = W x + b + ΔW x.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import hf_ids, tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_merge_unmerge,
    check_mixed_batch,
    check_peft_round_trip,
    check_save_load,
    check_starts_as_base,
    linear_reference,
    perturb,
    perturb_both,
    two_layer_linear_net,
    two_layer_net,
    x_in,
)

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer

VARIANTS = {"bat": {"r": 4}, "balance": {"r": 3}, "mini": {"r": 3, "mini_r": 4}}


def net(seed: int = 0, linear: bool = False) -> TwoLayerNet:
    """Linear 12 -> 8 and GPT-2 Conv1D 8 -> 16 (both cut into 4 x 4 blocks), then a plain head.
    linear=True: an nn.Linear in place of the Conv1D (PEFT's MiSS adapts Linear layers only)."""
    return (two_layer_linear_net if linear else two_layer_net)(12, 8, 16, seed)


def config(variant: str = "bat", **kw) -> LoraConfig:
    v = dict(VARIANTS[variant])
    options = {"variant": variant} | ({"mini_r": v["mini_r"]} if "mini_r" in v else {})
    return LoraConfig(**{"method": "bone", "r": v["r"], "targets": ["lin", "gpt2"], "options": options, **kw})


def reference_delta(layer: AdaptedLayer, name: str = "default") -> torch.Tensor:
    a = layer.adapters[name]
    w, t, r = base_weight(layer), a.miss_block.detach().double(), a.r
    delta = torch.zeros_like(w)
    d_out, d_in = w.shape
    if a.variant == "bat":
        for i in range(d_out // r):
            for j in range(d_in // r):
                block = w[i * r:(i + 1) * r, j * r:(j + 1) * r]
                delta[i * r:(i + 1) * r, j * r:(j + 1) * r] = block @ t[i] + t[i]
        return delta
    for o in range(d_out):
        for j in range(d_in):
            delta[o, j] = t[j % r, o] if a.variant == "balance" else t[j % r, o % a.mini_r]
    return delta


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_matches_paper_equation(variant):
    model = attach(net(), config(variant)).eval()
    perturb(model, fan_in=True)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        ref = linear_reference(layer, x, base_weight(layer) + reference_delta(layer))
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=f"{variant} {path}")


@pytest.mark.parametrize(("variant", "expected"), [("bat", 8 * 4 + 16 * 4), ("balance", 3 * 8 + 3 * 16),
                                                    ("mini", 2 * 3 * 4)])
def test_trainable_parameters(variant, expected):
    model = attach(net(), config(variant))
    assert model.trainable_parameter_count() == expected
    assert set(model.named_trainable_parameters()) == {"lin.adapters.default.miss_block",
                                                       "gpt2.adapters.default.miss_block"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_starts_as_the_identity(variant):
    model = attach(net(), config(variant)).eval()
    check_starts_as_base(model, x_in(12), rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged(variant):
    model = attach(net(), config(variant)).eval()
    perturb(model, fan_in=True)
    check_merge_unmerge(model, x_in(12), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_two_block_affine_adapters_merge_from_the_bare_base():
    model = attach(net(), config("bat"), "a")
    model.add_adapter("b", config("bat"))
    model.eval()
    perturb_both(model, seed_b=3, fan_in=True)
    model.set_active(["a", "b"])
    check_merge_unmerge(model, x_in(12), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_and_load_round_trip(variant, tmp_path):
    model = attach(net(), config(variant)).eval()
    perturb(model, fan_in=True)
    _, data = check_save_load(model, net, x_in(12), tmp_path, peft_type="MISS", rtol=0, atol=0, eval_loaded=True)
    assert data["init_weights"] == {"bat": "bat", "balance": True, "mini": "mini"}[variant]


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config("bat"), "a")
    model.add_adapter("b", config("balance"))
    model.eval()
    perturb_both(model, seed_b=5, fan_in=True)
    check_mixed_batch(model, x_in(12, rows=5), rtol=1e-5, atol=1e-6)


def test_gpt2_trains_the_blocks_and_leaves_the_base():
    model = attach(tiny_gpt2(), LoraConfig(method="bone", r=4, targets=["c_attn", "c_fc"]))
    weights = {n: p.clone() for n, p in model.model.named_parameters()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    ids = hf_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    opt.step()
    for n, p in model.model.named_parameters():
        if "adapters" not in n:
            assert torch.equal(p, weights[n]), n


# --------------------------------------------------------------------------- PEFT parity
PEFT_CASES = {"bat": {"r": 4, "init_weights": "bat"}, "balance": {"r": 3, "init_weights": False},
              "mini": {"r": 3, "init_weights": "mini", "mini_r": 4}}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_file_loads_in_loraplex_and_back(case, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(net(linear=True), peft.MissConfig(target_modules=["lin", "gpt2"],
                                                                        **PEFT_CASES[case])).eval()
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "miss_block" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        x = x_in(12)
        ours = check_peft_round_trip(theirs, lambda: net(linear=True), lambda model: model(x), tmp_path,
                                     rtol=1e-5, atol=1e-5, changed=1e-2)
    assert ours.configs["default"].options["variant"] == case


@pytest.mark.parametrize(("kw", "message"), [
    ({"r": 5}, "must divide d_in"),
    ({"options": {"variant": "block"}}, "variant must be one of"),
    ({"options": {"variant": "mini", "mini_r": 3}}, "mini_r=3 to divide d_out"),
    ({"r": 13, "options": {"variant": "balance"}}, "must not exceed in_features"),
])
def test_bad_settings_say_what_is_allowed(kw, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(**kw))
