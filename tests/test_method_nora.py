"""NoRA (`loraplex/methods/nora.py`) against the paper's equation.

Reference, written here in float64 from the adapter's raw tensors:
    y = W x + b + s·B_o (B_i A_i) A_o x,
with the outer pair frozen from the SVD of W (B_o A_o = U_r Σ_r V_rᵀ, A_o orthonormal rows) and the
inner pair (r x r', r' x r) trainable, B_i = 0 at the start.
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
    perturb,
    perturb_both,
    two_layer_net,
    x_in,
)

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 6), adapted, then a plain head."""
    return two_layer_net(10, 8, 6, seed)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "nora", "r": 4, "alpha": 8.0, "targets": ["lin", "gpt2"],
                         "options": {"inner_r": 2}, **kw})


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    w, b = base_weight(layer), layer.base_layer.bias.detach().double()
    bo, ao = a.outer_B.double(), a.outer_A.double()
    bi, ai = a.inner_B.detach().double(), a.inner_A.detach().double()
    delta = (a.alpha / a.r) * bo @ bi @ ai @ ao
    return x.double() @ (w + delta).t() + b


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model, fan_in=True)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5,
                                   msg=path)


def test_outer_pair_is_the_truncated_svd_and_the_adapter_starts_as_the_identity():
    model = attach(net(), config())
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        u, s, vh = torch.linalg.svd(base_weight(layer))
        torch.testing.assert_close(a.outer_B.double() @ a.outer_A.double(), u[:, :4] @ torch.diag(s[:4]) @ vh[:4],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.outer_A.double() @ a.outer_A.double().t(), torch.eye(4, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        assert torch.count_nonzero(a.inner_B) == 0 and torch.count_nonzero(a.inner_A) > 0
        assert a.inner_A.abs().max() <= 1 / 4 ** 0.5                         # Kaiming-uniform, fan_in = r
    check_starts_as_base(model, x_in(10), rtol=0, atol=0)


@pytest.mark.parametrize(("r", "inner", "expected"), [(4, 2, 2 * (2 * 4 * 2)), (4, None, 2 * (2 * 4 * 1)),
                                                       (6, 3, 2 * (2 * 6 * 3))])
def test_trainable_parameters_are_two_r_r_inner_per_layer(r, inner, expected):
    model = attach(net(), config(r=r, options={} if inner is None else {"inner_r": inner}))
    assert model.trainable_parameter_count() == expected
    assert {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()} == {"inner_A", "inner_B"}
    for layer in model.adapted_layers().values():
        assert {n for n, _ in layer.adapters["default"].named_buffers()} == {"outer_A", "outer_B"}


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model, fan_in=True)
    check_merge_unmerge(model, x_in(10), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    model = attach(net(), config())
    perturb(model, fan_in=True)
    # loading recomputes no decomposition
    monkeypatch.setattr("loraplex.methods.nora.truncated_svd", must_not_run("the SVD of W"))
    loaded, _ = check_save_load(model, net, x_in(10), tmp_path, peft_type="NORA", rtol=0, atol=0)
    assert loaded.adapted_layers()["lin"].adapters["default"].inner_r == 2


def test_save_as_plain_lora_of_rank_inner_r_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model, fan_in=True)
    _, data = check_save_load(model, net, x_in(10), tmp_path, as_lora=True, peft_type="LORA",
                              rtol=1e-5, atol=1e-5)
    assert data["r"] == 2


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2, options={}))
    perturb_both(model, seed_b=5, fan_in=True)
    check_mixed_batch(model, x_in(10, rows=5), rtol=1e-5, atol=1e-6)


def test_gpt2_gradients_reach_the_inner_pair_only():
    model = attach(tiny_gpt2(), LoraConfig(method="nora", r=8, alpha=8.0, targets=["c_attn"]))
    check_gpt2_gradients(model, tensors=4, count=2 * (2 * 8 * 2))


@pytest.mark.parametrize(("options", "message"), [({"inner_r": 5}, "1 <= inner_r <= r=4"),
                                                   ({"inner_r": 1.5}, "inner_r must be an integer"),
                                                   ({"inner": 2}, "it takes: inner_r")])
def test_bad_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(options=options))
