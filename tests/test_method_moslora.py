"""MoSLoRA (`loraplex/methods/moslora.py`) against the paper's equation, in float64:
y = W x + b + s · B M A x, s = alpha / r, with A, M, B the only trainable tensors.
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


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "moslora", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


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
    A, M, B = (t.detach().double() for t in (a.lora_A, a.lora_AB, a.lora_B))
    s = a.alpha / a.r
    xd = x.double()
    return xd @ base_weight(layer).t() + layer.base_layer.bias.detach().double() + s * xd @ A.t() @ M.t() @ B.t()


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model)
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
    x = x_in()
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
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
    perturb(model)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    x = x_in()
    unmerged = model(x)
    model.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config())
    perturb(model)
    x = x_in()
    expected = model(x)
    model.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MOSLORA"
    loaded = loraplex.load(net(), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_save_as_plain_lora_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model)
    x = x_in()
    expected = model(x)
    model.save(tmp_path, as_lora=True)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 3
    plain = loraplex.load(net(), tmp_path)
    assert plain.configs["default"].method == "lora"
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


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
    with pytest.raises(ValueError, match="it takes: mixer_init"):
        attach(net(), config(options={"mixer": "eye"}))
    with pytest.raises(ValueError, match="mixer_init must be one of"):
        attach(net(), config(options={"mixer_init": "eye"}))
