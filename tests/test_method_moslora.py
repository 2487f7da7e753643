"""MoSLoRA (`loraplex/methods/moslora.py`) against the paper's equation, in float64:
y = W x + b + s · B M A x, s = alpha / r, with A, M, B the only trainable tensors.
"""

from __future__ import annotations

import pytest
import torch
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    check_starts_as_base,
    perturb,
    perturb_both,
    two_layer_net,
    x_in,
)

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 12), adapted, then a plain head."""
    return two_layer_net(10, 8, 12, seed)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "moslora", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    A, M, B = (t.detach().double() for t in (a.lora_A, a.lora_AB, a.lora_B))
    s = a.alpha / a.r
    xd = x.double()
    return xd @ base_weight(layer).t() + layer.base_layer.bias.detach().double() + s * xd @ A.t() @ M.t() @ B.t()


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model, std=0.5)
    for path, layer in model.adapted_layers().items():
        x = torch.randn(4, layer.spec.in_features)
        torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5, msg=path)


def test_initialisation_is_the_identity_and_follows_the_reference_code():
    model = attach(net(), config())
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        assert torch.count_nonzero(a.lora_B) == 0
        assert a.lora_A.abs().max() <= 1 / layer.spec.in_features ** 0.5
        assert a.lora_AB.abs().max() <= 1 / 3 ** 0.5 and torch.count_nonzero(a.lora_AB) == 9
    check_starts_as_base(model, x_in(), rtol=0, atol=0)
    eye = attach(net(), config(options={"mixer_init": "identity"}))
    assert torch.equal(eye.model.lin.adapters["default"].lora_AB, torch.eye(3))
    ortho = attach(net(), config(options={"mixer_init": "orthogonal"})).model.lin.adapters["default"].lora_AB
    torch.testing.assert_close(ortho @ ortho.t(), torch.eye(3), rtol=0, atol=1e-5)


def test_trainable_parameters_are_r_times_din_plus_dout_plus_r_squared():
    model = attach(net(), config())
    r = 3
    assert model.trainable_parameter_count() == r * (10 + 8) + r * r + r * (8 + 12) + r * r
    assert {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()} == {"lora_A", "lora_AB", "lora_B"}


def test_merge_unmerge_restores_the_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model, std=0.5)
    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config())
    perturb(model, std=0.5)
    check_save_load(model, net, x_in(), tmp_path, peft_type="MOSLORA", rtol=0, atol=0)


def test_save_as_plain_lora_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model, std=0.5)
    plain, data = check_save_load(model, net, x_in(), tmp_path, as_lora=True, peft_type="LORA", rtol=1e-5, atol=1e-5)
    assert data["r"] == 3
    assert plain.configs["default"].method == "lora"


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2))
    perturb_both(model, seed_b=5, std=0.5)
    check_mixed_batch(model, x_in(rows=5), rtol=1e-5, atol=1e-6)


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="it takes: mixer_init"):
        attach(net(), config(options={"mixer": "eye"}))
    with pytest.raises(ValueError, match="mixer_init must be one of"):
        attach(net(), config(options={"mixer_init": "eye"}))
