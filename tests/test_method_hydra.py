"""Hydra (`loraplex/methods/hydra.py`) against the paper's equation, in float64:
y₀ = W x + b,  y = y₀ + s B_p A_p x + s B_s A_s y₀  (parallel + sequential LoRA branch), s = alpha / r;
merged: W' = W + s (B_p A_p + B_s A_s W), b' = b + s B_s A_s b.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize
from method_checks import assert_rows_match_alone
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraplex
from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


class Net(nn.Module):
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 12), adapted, then a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 8)
        self.gpt2 = Conv1D(12, 8)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.gpt2(torch.tanh(self.lin(x)))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return randomize(Net()).eval()


class NoBias(nn.Module):
    """Bias-free Linear layers (as in Llama): Hydra is then a plain LoRA of rank 2r after conversion."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 8, bias=False)
        self.gpt2 = nn.Linear(8, 12, bias=False)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.gpt2(torch.tanh(self.lin(x)))))


def nobias(seed: int = 0) -> NoBias:
    torch.manual_seed(seed)
    return randomize(NoBias()).eval()


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "hydra", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def perturb(model, seed: int = 1) -> None:
    """O(1) random values in every trainable tensor (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def x_in(seed: int = 2, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, 10, generator=torch.Generator().manual_seed(seed))


def base_weight(layer: AdaptedLayer) -> torch.Tensor:
    w = layer.base_layer.weight.detach().double()
    return w.t() if isinstance(layer.base_layer, Conv1D) else w


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    ap, bp, as_, bs = (t.detach().double() for t in (a.hydra_par_A, a.hydra_par_B, a.hydra_seq_A, a.hydra_seq_B))
    s = a.alpha / a.r
    xd = x.double()
    bias = layer.base_layer.bias
    y0 = xd @ base_weight(layer).t() + (0.0 if bias is None else bias.detach().double())
    return y0 + s * xd @ ap.t() @ bp.t() + s * y0 @ as_.t() @ bs.t()


def test_output_matches_paper_equation():
    for make in (net, nobias):
        model = attach(make(), config())
        perturb(model)
        for path, layer in model.adapted_layers().items():
            x = torch.randn(4, layer.spec.in_features)
            torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5,
                                       msg=path)


def test_initialisation_is_the_identity():
    model = attach(net(), config())
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        assert torch.count_nonzero(a.hydra_par_B) == 0 and torch.count_nonzero(a.hydra_seq_B) == 0
        assert a.hydra_seq_A.shape == (3, layer.spec.out_features)
    x = x_in()
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_trainable_parameters_are_r_din_plus_dout_plus_two_r_dout():
    model = attach(net(), config())
    r = 3
    assert model.trainable_parameter_count() == r * (10 + 8) + 2 * r * 8 + r * (8 + 12) + 2 * r * 12
    names = {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()}
    assert names == {"hydra_par_A", "hydra_par_B", "hydra_seq_A", "hydra_seq_B"}


def test_merge_unmerge_restores_weight_and_bias_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    x = x_in()
    unmerged = model(x)
    model.merge()
    assert not torch.equal(model.model.lin.base_layer.bias, before["lin.base_layer.bias"])   # Δb = s B_s A_s b
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


def test_two_merged_adapters_are_each_computed_from_the_bare_base():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2))
    perturb(model)
    model.set_active("b")
    perturb(model, seed=7)
    model.set_active(["a", "b"], [1.0, 0.5])
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    x = x_in()
    together = model(x)
    model.merge()
    torch.testing.assert_close(model(x), together, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config())
    perturb(model)
    x = x_in()
    expected = model(x)
    model.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "HYDRA"
    loaded = loraplex.load(net(), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_save_as_plain_lora_of_rank_2r_on_bias_free_layers(tmp_path):
    model = attach(nobias(), config())
    perturb(model)
    x = x_in()
    expected = model(x)
    model.save(tmp_path, as_lora=True)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 6
    plain = loraplex.load(nobias(), tmp_path)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_layers_with_a_bias_have_no_plain_lora_form(tmp_path):
    model = attach(net(), config())
    with pytest.raises(TypeError, match="also changes the layer's bias"):
        model.save(tmp_path, as_lora=True)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2))
    perturb(model)
    model.set_active("b")
    perturb(model, seed=5)
    x = x_in(rows=5)
    ids = ["a", "b", None, "b", "a"]
    mixed = model(x, adapter_ids=ids)
    assert_rows_match_alone(model, x, ids, mixed, rtol=1e-5, atol=1e-6)


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="does not take option"):
        attach(net(), config(options={"branches": 2}))
