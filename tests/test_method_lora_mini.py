"""LoRA-Mini (`loraplex/methods/lora_mini.py`) against the paper's equation, in float64:
y = W x + b + s · B_aux B_train A_train A_aux x, s = alpha / r; only A_train (r x a) and
B_train (b x r) train, the outer A_aux (a x d_in) and B_aux (d_out x b) are frozen.
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
from safetensors.torch import load_file

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 12), adapted, then a plain head."""
    return two_layer_net(10, 8, 12, seed)


def config(**kw) -> LoraConfig:
    # aux_dim 9: lin (10 -> 8) gets a = 9, b = 8 (capped at d_out); gpt2 (8 -> 12) a = 8 (capped), b = 9
    return LoraConfig(**{"method": "lora-mini", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"],
                         "options": {"aux_dim": 9}, **kw})


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    a_aux, a_tr, b_tr, b_aux = (t.detach().double() for t in (a.lora_A_aux, a.lora_A_train, a.lora_B_train,
                                                               a.lora_B_aux))
    s = a.alpha / a.r
    xd = x.double()
    delta = s * (b_aux @ b_tr @ a_tr @ a_aux)
    return xd @ (base_weight(layer) + delta).t() + layer.base_layer.bias.detach().double()


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model, std=0.5)
    for path, layer in model.adapted_layers().items():
        x = torch.randn(4, layer.spec.in_features)
        torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5, msg=path)


def test_shapes_initialisation_and_identity_at_start():
    model = attach(net(), config())
    lin, gpt2 = model.model.lin.adapters["default"], model.model.gpt2.adapters["default"]
    assert lin.lora_A_aux.shape == (9, 10) and lin.lora_A_train.shape == (3, 9)
    assert lin.lora_B_train.shape == (8, 3) and lin.lora_B_aux.shape == (8, 8)
    assert gpt2.lora_A_aux.shape == (8, 8) and gpt2.lora_B_train.shape == (9, 3) and gpt2.lora_B_aux.shape == (12, 9)
    assert torch.count_nonzero(lin.lora_B_train) == 0 and torch.count_nonzero(lin.lora_B_aux) > 0
    check_starts_as_base(model, x_in(), rtol=0, atol=0)


def test_only_the_inner_matrices_train():
    model = attach(net(), config())
    r = 3
    assert model.trainable_parameter_count() == r * (9 + 8) + r * (8 + 9)       # r (a + b) per layer
    assert {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()} == {"lora_A_train", "lora_B_train"}
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        assert not a.lora_A_aux.requires_grad and not a.lora_B_aux.requires_grad
        assert {n for n, _ in a.named_buffers()} == {"lora_A_aux", "lora_B_aux"}
    model.set_active("default")                # re-opening the adapter must not unfreeze the outer matrices
    assert model.trainable_parameter_count() == r * (9 + 8) + r * (8 + 9)
    model(x_in()).sum().backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_merge_unmerge_restores_the_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model, std=0.5)
    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip_keeps_the_frozen_outer_matrices(tmp_path):
    model = attach(net(), config())
    perturb(model, std=0.5)
    torch.manual_seed(123)    # different random outer matrices at construction: the file must win
    check_save_load(model, net, x_in(), tmp_path, peft_type="LORA_MINI", rtol=0, atol=0)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lin.lora_A_aux" in keys and "base_model.model.gpt2.lora_B_aux" in keys


def test_save_as_plain_lora_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model, std=0.5)
    _, data = check_save_load(model, net, x_in(), tmp_path, as_lora=True, peft_type="LORA", rtol=1e-5, atol=1e-5)
    assert data["r"] == 3


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2, options={"aux_dim": 4}))
    perturb_both(model, seed_b=5, std=0.5)
    check_mixed_batch(model, x_in(rows=5), rtol=1e-5, atol=1e-6)


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="it takes: aux_dim"):
        attach(net(), config(options={"a": 4}))
    with pytest.raises(ValueError, match="aux_dim .* must be a positive integer"):
        attach(net(), config(options={"aux_dim": 0}))
