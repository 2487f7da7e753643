"""FourierFT (`loraplex/methods/fourierft.py`) against the paper's equation and PEFT 0.21.

Reference, in float64 from the adapter's coefficients, the inverse 2-D DFT written out:
    (u_k, v_k) = divmod(e_k, d_in),  e = randperm(d_out·d_in, seed)[:n]   (PEFT's frequencies)
    ΔW[p, q] = α / (d_out d_in) Σ_k c_k cos(2π (u_k p / d_out + v_k q / d_in))      (= α Re IDFT2)
    y = W x + b + ΔW x.
"""

from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch
from conftest import HF_VOCAB, hf_ids, tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_merge_unmerge,
    check_mixed_batch,
    check_peft_round_trip,
    check_save_load,
    check_starts_as_base,
    linear_reference,
    two_layer_net,
    x_in,
)

from loraplex import LoraConfig, attach


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 6), adapted, then a plain head."""
    return two_layer_net(10, 8, 6, seed)


def config(**options) -> LoraConfig:
    return LoraConfig(method="fourierft", targets=["lin", "gpt2"],
                      options={"n_frequency": 12, "scaling": 20.0, **options})


def reference_delta(d_out: int, d_in: int, coefficients: torch.Tensor, scaling: float, seed: int) -> torch.Tensor:
    entries = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[: len(coefficients)]
    p = torch.arange(d_out, dtype=torch.float64)[:, None]
    q = torch.arange(d_in, dtype=torch.float64)[None, :]
    delta = torch.zeros(d_out, d_in, dtype=torch.float64)
    for c, e in zip(coefficients.double(), entries.tolist()):
        u, v = divmod(e, d_in)
        delta += c * torch.cos(2 * math.pi * (u * p / d_out + v * q / d_in))
    return scaling * delta / (d_out * d_in)


@pytest.mark.parametrize("seed", [777, 5])
def test_output_matches_paper_equation(seed):
    model = attach(net(), config(random_loc_seed=seed)).eval()      # coefficients ~ N(0, 1) by default
    for path, layer in model.adapted_layers().items():
        a = layer.adapters["default"]
        delta = reference_delta(layer.spec.out_features, layer.spec.in_features, a.fourierft_spectrum.detach(),
                                20.0, seed)
        assert delta.abs().max() > 1e-2
        x = x_in(layer.spec.in_features)
        ref = linear_reference(layer, x, base_weight(layer) + delta)
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=f"{seed} {path}")


def test_trainable_parameters_are_n_per_layer_and_frequencies_are_not_saved(tmp_path):
    model = attach(net(), config())
    assert model.trainable_parameter_count() == 2 * 12
    assert set(model.named_trainable_parameters()) == {"lin.adapters.default.fourierft_spectrum",
                                                       "gpt2.adapters.default.fourierft_spectrum"}
    model.save(tmp_path)
    from safetensors.torch import load_file

    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == [
        "base_model.model.gpt2.fourierft_spectrum", "base_model.model.lin.fourierft_spectrum"]


def test_zeros_init_is_the_identity():
    model = attach(net(), LoraConfig(method="fourierft", targets=["lin", "gpt2"], init="zeros",
                                     options={"n_frequency": 12})).eval()
    check_starts_as_base(model, x_in(), rtol=0, atol=0)


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config()).eval()
    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config(random_loc_seed=3)).eval()
    _, data = check_save_load(model, net, x_in(), tmp_path, peft_type="FOURIERFT", rtol=0, atol=0, eval_loaded=True)
    assert data["random_loc_seed"] == 3 and data["n_frequency"] == 12


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(n_frequency=7, random_loc_seed=1))
    model.eval()
    check_mixed_batch(model, x_in(rows=5), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- PEFT parity (GPT-2 Conv1D)
def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_file_loads_in_loraplex_and_back(tmp_path):
    ids = hf_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_gpt2(), peft.FourierFTConfig(
            n_frequency=30, scaling=40.0, random_loc_seed=11, target_modules=["c_attn", "c_fc"])).eval()
        check_peft_round_trip(theirs, tiny_gpt2, lambda model: logits(model, ids), tmp_path, rtol=1e-5, atol=1e-5,
                              changed=1e-2)


def test_loraplex_file_loads_in_peft_and_merges_alike(tmp_path):
    ids = hf_ids()
    model = attach(tiny_gpt2(), LoraConfig(method="fourierft", targets=["c_attn", "c_proj"],
                                           options={"n_frequency": 25, "scaling": 60.0})).eval()
    expected = logits(model, ids)
    model.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-5, atol=1e-5)
    merged = theirs.merge_and_unload()
    assert logits(merged, ids).shape[-1] == HF_VOCAB
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("options", "message"), [
    ({"n_frequency": 0}, "n_frequency must be a positive"),
    ({"n_frequency": 49}, "exceeds d_out·d_in=48"),
    ({"scaling": -1}, "scaling must be a positive"),
    ({"seed": 1}, "it takes:"),
])
def test_bad_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(**options))
