"""PaCA (`loraplex/methods/paca.py`) against the paper's equation.

Reference, in float64 from the adapter's raw tensors: the effective weight is W with the r selected
input columns J replaced by s·P (s = alpha / r),
    W'[:, J] = s · P,  W'[:, j] = W[:, j] otherwise,   y = W' x + b.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_ids, tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    check_starts_as_base,
    linear_reference,
    perturb_both,
    two_layer_net,
    x_in,
)

import loraplex
from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 6), adapted, then a plain head."""
    return two_layer_net(10, 8, 6, seed)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "paca", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def perturb(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g))


def effective_weight(layer: AdaptedLayer, name: str = "default") -> torch.Tensor:
    a = layer.adapters[name]
    w = base_weight(layer).clone()
    for k, j in enumerate(a.paca_indices.tolist()):
        w[:, j] = a.alpha / a.r * a.paca_w.detach().double()[:, k]
    return w


def test_output_matches_paper_equation():
    model = attach(net(), config()).eval()
    perturb(model)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        ref = linear_reference(layer, x, effective_weight(layer))
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=path)


def test_columns_are_distinct_random_inputs_and_start_at_the_base_values():
    torch.manual_seed(7)
    model = attach(net(), config()).eval()
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        j = a.paca_indices
        assert len(j) == 3 and len(set(j.tolist())) == 3 and int(j.min()) >= 0 and int(j.max()) < layer.spec.in_features
        torch.testing.assert_close(a.paca_w.double() * 2.0, base_weight(layer)[:, j], rtol=0, atol=1e-6)  # s P = W_J
    check_starts_as_base(model, x_in(), rtol=0, atol=1e-6)
    torch.manual_seed(7)
    again = attach(net(), config())
    assert all(torch.equal(again.adapted_layers()[p].adapters["default"].paca_indices,
                           model.adapted_layers()[p].adapters["default"].paca_indices) for p in ("lin", "gpt2"))


def test_trainable_parameters_are_d_out_times_r():
    model = attach(net(), config())
    assert model.trainable_parameter_count() == 8 * 3 + 6 * 3
    assert set(model.named_trainable_parameters()) == {"lin.adapters.default.paca_w", "gpt2.adapters.default.paca_w"}


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config()).eval()
    perturb(model)

    def columns_are_s_p() -> None:   # merged: the selected columns ARE s·P
        for layer in model.adapted_layers().values():
            torch.testing.assert_close(base_weight(layer), effective_weight(layer), rtol=0, atol=1e-6)

    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6, while_merged=columns_are_s_p)


def test_save_and_load_round_trip_keeps_the_columns(tmp_path):
    model = attach(net(), config()).eval()
    perturb(model)
    torch.manual_seed(123)                    # another RNG state: the columns come from the file
    check_save_load(model, net, x_in(), tmp_path, peft_type="PACA", rtol=0, atol=0, eval_loaded=True)


def test_save_as_plain_lora_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config()).eval()
    perturb(model)
    plain, data = check_save_load(model, net, x_in(), tmp_path, as_lora=True, peft_type="LORA", rtol=1e-5, atol=1e-5,
                                  eval_loaded=True)
    assert data["r"] == 3
    assert {type(a).method for layer in plain.adapted_layers().values() for a in layer.adapters.values()} == {"lora"}


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2))
    model.eval()
    perturb_both(model, seed_b=5, using=perturb)
    check_mixed_batch(model, x_in(rows=5), rtol=1e-5, atol=1e-6)


def test_gpt2_gradient_is_the_gradient_of_the_selected_columns():
    """∂L/∂P = s · ∂L/∂W[:, J]: training P is training those columns of W."""
    model = attach(tiny_gpt2(), LoraConfig(method="paca", r=4, alpha=8.0, targets=["c_fc"]))
    ids = hf_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    reference = tiny_gpt2()
    for w in reference.parameters():
        w.requires_grad_(False)
    for path in model.adapted_layers():
        reference.get_submodule(path).weight.requires_grad_(True)
    reference(input_ids=ids, labels=ids).loss.backward()
    for path, layer in model.adapted_layers().items():
        a = layer.adapters["default"]
        grad_w = reference.get_submodule(path).weight.grad.t()          # Conv1D: (in, out) -> (out, in)
        torch.testing.assert_close(a.paca_w.grad, 2.0 * grad_w[:, a.paca_indices], rtol=1e-4, atol=1e-6)


def test_bad_settings_say_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match="exceed in_features"):
        attach(net(), config(r=9))
    with pytest.raises(ValueError, match="it takes:"):
        attach(net(), config(options={"columns": 2}))
    model = attach(net(), config())
    model.save(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lin.paca_indices"] = torch.tensor([0, 0, 1])
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(loraplex.AdapterFileError, match="distinct"):
        loraplex.load(net(), tmp_path)
