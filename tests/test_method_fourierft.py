"""FourierFT (`loraplex/methods/fourierft.py`) against the paper's equation and PEFT 0.21.

Reference, in float64 from the adapter's coefficients, the inverse 2-D DFT written out:
    (u_k, v_k) = divmod(e_k, d_in),  e = randperm(d_out·d_in, seed)[:n]   (PEFT's frequencies)
    ΔW[p, q] = α / (d_out d_in) Σ_k c_k cos(2π (u_k p / d_out + v_k q / d_in))      (= α Re IDFT2)
    y = W x + b + ΔW x.
"""

from __future__ import annotations

import json
import math
import warnings

import peft
import pytest
import torch
from conftest import HF_VOCAB, hf_ids, randomize, tiny_gpt2
from method_checks import assert_rows_match_alone
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraplex
from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 8)
        self.gpt2 = Conv1D(6, 8)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.gpt2(torch.tanh(self.lin(x)))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return randomize(Net()).eval()


def config(**options) -> LoraConfig:
    return LoraConfig(method="fourierft", targets=["lin", "gpt2"],
                      options={"n_frequency": 12, "scaling": 20.0, **options})


def base_weight(layer: AdaptedLayer) -> torch.Tensor:
    w = layer.base_layer.weight.detach().double()
    return w.t() if isinstance(layer.base_layer, Conv1D) else w


def reference_delta(d_out: int, d_in: int, coefficients: torch.Tensor, scaling: float, seed: int) -> torch.Tensor:
    entries = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[: len(coefficients)]
    p = torch.arange(d_out, dtype=torch.float64)[:, None]
    q = torch.arange(d_in, dtype=torch.float64)[None, :]
    delta = torch.zeros(d_out, d_in, dtype=torch.float64)
    for c, e in zip(coefficients.double(), entries.tolist()):
        u, v = divmod(e, d_in)
        delta += c * torch.cos(2 * math.pi * (u * p / d_out + v * q / d_in))
    return scaling * delta / (d_out * d_in)


def x_in(d: int = 10, seed: int = 2, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [777, 5])
def test_output_matches_paper_equation(seed):
    model = attach(net(), config(random_loc_seed=seed)).eval()      # coefficients ~ N(0, 1) by default
    for path, layer in model.adapted_layers().items():
        a = layer.adapters["default"]
        delta = reference_delta(layer.spec.out_features, layer.spec.in_features, a.fourierft_spectrum.detach(),
                                20.0, seed)
        assert delta.abs().max() > 1e-2
        x = x_in(layer.spec.in_features)
        ref = x.double() @ (base_weight(layer) + delta).t() + layer.base_layer.bias.detach().double()
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
    x = x_in()
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config()).eval()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    x = x_in()
    unmerged = model(x)
    model.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config(random_loc_seed=3)).eval()
    x = x_in()
    expected = model(x)
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "FOURIERFT" and data["random_loc_seed"] == 3 and data["n_frequency"] == 12
    loaded = loraplex.load(net(), tmp_path).eval()
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(n_frequency=7, random_loc_seed=1))
    model.eval()
    x = x_in(rows=5)
    ids = ["a", "b", None, "b", "a"]
    mixed = model(x, adapter_ids=ids)
    assert_rows_match_alone(model, x, ids, mixed, rtol=1e-5, atol=1e-6)


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
        expected = logits(theirs, ids)
        theirs.save_pretrained(tmp_path / "peft")
        ours = loraplex.load(tiny_gpt2(), tmp_path / "peft").eval()
        assert (expected - logits(tiny_gpt2(), ids)).abs().max() > 1e-2
        torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)
        ours.save(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(logits(back, ids), expected, rtol=1e-5, atol=1e-5)


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
