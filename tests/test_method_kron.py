"""Kronecker adapter (`loraplex/methods/kron.py`, PEFT's LoKr) against the paper's equation and PEFT.

Reference, in float64 from the adapter's raw factors:
    ΔW[(i·b + k), (j·d + l)] = s · W₁[i, j] · W₂[k, l],  s = alpha / r,
    W₁ = W₁ₐ W₁ᵦ and W₂ = W₂ₐ W₂ᵦ where they are stored as low-rank pairs,
    y = W x + b + ΔW x.
Parity both ways with PEFT 0.21's LoKr (files saved by one load in the other with identical outputs).
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
from loraplex.methods.kron import factorization


def net(seed: int = 0, linear: bool = False) -> TwoLayerNet:
    """Linear 12 -> 32 and GPT-2 Conv1D 32 -> 8 (W₂ low-rank at r = 2 in both), then a plain head.
    linear=True: an nn.Linear in place of the Conv1D (PEFT's LoKr adapts Linear layers only)."""
    return (two_layer_linear_net if linear else two_layer_net)(12, 32, 8, seed)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "kron", "r": 2, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def reference_delta(adapter) -> torch.Tensor:
    t = {k: getattr(adapter, k).detach().double() for k in adapter.factor_keys}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    (a, c), (b, d) = w1.shape, w2.shape
    delta = torch.einsum("ij,kl->ikjl", w1, w2).reshape(a * b, c * d)     # [(i b + k), (j d + l)]
    return adapter.alpha / adapter.r * delta


def test_factorization_is_closest_to_square():
    assert factorization(8) == (2, 4) and factorization(12) == (3, 4) and factorization(16) == (4, 4)
    assert factorization(127) == (1, 127) and factorization(256) == (16, 16) and factorization(576) == (24, 24)
    assert factorization(128, 4) == (4, 32) and factorization(12, 5) == (3, 4)


@pytest.mark.parametrize("options", [{}, {"decompose_both": True}, {"decompose_factor": 4}])
def test_output_matches_paper_equation(options):
    model = attach(net(), config(r=1 if options.get("decompose_both") else 2, options=options)).eval()
    perturb(model, fan_in=True)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        delta = reference_delta(layer.adapters["default"])
        ref = linear_reference(layer, x, base_weight(layer) + delta)
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=f"{options} {path}")


def test_factor_shapes_and_trainable_parameters():
    model = attach(net(), config())
    lin, gpt2 = (model.adapted_layers()[p].adapters["default"] for p in ("lin", "gpt2"))
    # lin: 32 = 4·8, 12 = 3·4; r = 2 < max(8, 4)/2 -> W₂ = W₂ₐ (8x2) W₂ᵦ (2x4); W₁ full 4x3
    assert {k: tuple(getattr(lin, k).shape) for k in lin.factor_keys} == {
        "lokr_w1": (4, 3), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 4)}
    # gpt2: 8 = 2·4, 32 = 4·8; r = 2 < max(4, 8)/2 -> low-rank W₂
    assert {k: tuple(getattr(gpt2, k).shape) for k in gpt2.factor_keys} == {
        "lokr_w1": (2, 4), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 8)}
    assert model.trainable_parameter_count() == (12 + 16 + 8) + (8 + 8 + 16)
    both = attach(net(), config(r=1, options={"decompose_both": True}))
    lin = both.adapted_layers()["lin"].adapters["default"]
    assert set(lin.factor_keys) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}


@pytest.mark.parametrize("init", ["kaiming", "lycoris"])
def test_initial_adapter_is_the_identity(init):
    model = attach(net(), config(init=init)).eval()
    check_starts_as_base(model, x_in(12), rtol=0, atol=0)


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config()).eval()
    perturb(model, fan_in=True)
    check_merge_unmerge(model, x_in(12), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config(options={"decompose_factor": 4})).eval()
    perturb(model, fan_in=True)
    _, data = check_save_load(model, net, x_in(12), tmp_path, peft_type="LOKR", rtol=0, atol=0, eval_loaded=True)
    assert data["r"] == 2 and data["decompose_factor"] == 4


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=3, options={"decompose_both": True}))
    model.eval()
    perturb_both(model, seed_b=5, fan_in=True)
    check_mixed_batch(model, x_in(12, rows=5), rtol=1e-5, atol=1e-6)


def test_rank_and_module_dropout_only_act_while_training():
    model = attach(net(), config(options={"rank_dropout": 0.5, "module_dropout": 0.5})).eval()
    perturb(model, fan_in=True)
    x = x_in(12)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    outs = {tuple(model(x).flatten().tolist()) for _ in range(6)}
    assert len(outs) > 1


def test_gpt2_trains_the_factors():
    model = attach(tiny_gpt2(), LoraConfig(method="kron", r=2, targets=["c_attn", "c_fc"]))
    ids = hf_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_trainable_parameters().items()}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lokr_w1" in n)   # W₁ = 0 gets the gradient


# --------------------------------------------------------------------------- PEFT parity
PEFT_CASES = {"full": ({"r": 2, "alpha": 4}, {}), "decompose_both": ({"r": 1, "alpha": 3, "decompose_both": True},
                                                                     {"decompose_both": True}),
              "factor": ({"r": 2, "alpha": 4, "decompose_factor": 4}, {"decompose_factor": 4})}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_file_loads_in_loraplex_and_back(case, tmp_path):
    peft_kw, _ = PEFT_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(net(linear=True), peft.LoKrConfig(target_modules=["lin", "gpt2"],
                                                                         init_weights=False, **peft_kw)).eval()
        x = x_in(12)
        check_peft_round_trip(theirs, lambda: net(linear=True), lambda model: model(x), tmp_path,
                              rtol=1e-5, atol=1e-5, changed=1e-2)


def test_loraplex_file_loads_in_peft(tmp_path):
    model = attach(net(linear=True), config(init="lycoris", options={"decompose_both": True}, r=1)).eval()
    perturb(model, fan_in=True)
    x = x_in(12)
    expected = model(x)
    model.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(net(linear=True), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("options", "message"), [
    ({"decompose_factor": 0}, "decompose_factor must be"),
    ({"rank_dropout": 1.5}, "rank_dropout must satisfy"),
    ({"decompose_both": "yes"}, "decompose_both must be true or false"),
    ({"factor": 2}, "it takes:"),
])
def test_bad_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(options=options))
