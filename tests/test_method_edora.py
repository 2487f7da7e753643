"""EDoRA (`loraplex/methods/edora.py`) against the paper's equation.

Reference, written here in float64 from the adapter's raw tensors:
    V = W + s·B R A,   y = m ⊙ (V x) / ‖V‖_row + b,
with B = U_r, A = Σ_r V_rᵀ frozen from the SVD of W and R, m trainable (m starts at ‖W + sBRA‖_row).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_gpt2_gradients,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    check_starts_as_base,
    must_not_run,
    perturb_both,
    two_layer_net,
    x_in,
)
from torch import nn

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 6), adapted, then a plain head."""
    return two_layer_net(10, 8, 6, seed)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "edora", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def perturb(model, seed: int = 1) -> None:
    """Random R (O(1)) and magnitudes scaled by 0.5..1.5, so both parts of the update matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_trainable_parameters().items():
            if name.endswith("magnitude"):
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    w, b = base_weight(layer), layer.base_layer.bias.detach().double()
    v = w + (a.alpha / a.r) * a.lora_B.double() @ a.lora_R.detach().double() @ a.lora_A.double()
    m = a.magnitude.detach().double()
    return (x.double() @ v.t()) * (m / v.norm(dim=1)) + b


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5,
                                   msg=path)


def test_initialisation_svd_pair_and_magnitude():
    model = attach(net(), config())
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        w = base_weight(layer)
        u, s, vh = torch.linalg.svd(w)
        torch.testing.assert_close(a.lora_B.double() @ a.lora_A.double(), u[:, :3] @ torch.diag(s[:3]) @ vh[:3],
                                   rtol=1e-5, atol=1e-5)
        v = w + 2.0 * a.lora_B.double() @ a.lora_R.detach().double() @ a.lora_A.double()
        torch.testing.assert_close(a.magnitude.detach().double(), v.norm(dim=1), rtol=1e-6, atol=1e-6)
        assert a.lora_R.abs().max() < 1e-3
    zeros = attach(net(), config(init="zeros"))       # R = 0: exactly the base model
    check_starts_as_base(zeros, x_in(10), rtol=1e-6, atol=1e-6)


def test_trainable_parameters_are_r_squared_plus_d_out_per_layer():
    model = attach(net(), config(r=4))
    assert model.trainable_parameter_count() == (16 + 8) + (16 + 6)
    assert set(model.named_trainable_parameters()) == {
        f"{p}.adapters.default.{t}" for p in ("lin", "gpt2") for t in ("lora_R", "magnitude")}
    for layer in model.adapted_layers().values():
        assert {n for n, _ in layer.adapters["default"].named_buffers()} == {"lora_A", "lora_B"}


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model)
    check_merge_unmerge(model, x_in(10), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_merge_together_with_a_lora_adapter_uses_the_bare_base_weight():
    model = attach(net(), config(), "e")
    model.add_adapter("l", LoraConfig(r=2, targets=["lin", "gpt2"], init="random"))
    perturb(model)
    model.set_active(["e", "l"], [0.7, 1.0])
    x = x_in(10)
    unmerged = model(x)
    model.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    model = attach(net(), config())
    perturb(model)
    # loading recomputes no decomposition
    monkeypatch.setattr("loraplex.methods.edora.xs_factors", must_not_run("the SVD of W"))
    check_save_load(model, net, x_in(10), tmp_path, peft_type="EDORA", rtol=0, atol=0)


def test_no_plain_lora_form(tmp_path):
    model = attach(net(), config())
    with pytest.raises(TypeError, match="cannot be expressed as a plain LoRA"):
        model.save(tmp_path, as_lora=True)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2))
    perturb_both(model, seed_b=5, using=perturb)
    check_mixed_batch(model, x_in(10, rows=5), rtol=1e-5, atol=1e-6)


def test_gpt2_gradients_reach_r_and_magnitude_only():
    model = attach(tiny_gpt2(), LoraConfig(method="edora", r=4, alpha=4.0, targets=["c_attn", "c_fc"]))
    check_gpt2_gradients(model, tensors=8, count=2 * (16 + 48) + 2 * (16 + 32))


def test_dropout_in_training_uses_one_mask_for_w_x_and_the_update():
    model = attach(net(), config(dropout=0.5))
    perturb(model)
    layer = model.adapted_layers()["lin"]
    layer.train()
    x = x_in(10)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    a = layer.adapters["default"]
    w, b = base_weight(layer), layer.base_layer.bias.detach().double()
    v = w + 2.0 * a.lora_B.double() @ a.lora_R.detach().double() @ a.lora_A.double()
    ratio = a.magnitude.detach().double() / v.norm(dim=1)
    expected = x.double() @ w.t() + b + (ratio - 1) * (dropped.double() @ w.t()) \
        + ratio * (dropped.double() @ (v - w).t())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="it takes: init_sigma"):
        attach(net(), config(options={"rank": 2}))
