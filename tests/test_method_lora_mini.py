"""LoRA-Mini (`loraplex/methods/lora_mini.py`) against the paper's equation, in float64:
y = W x + b + s · B_aux B_train A_train A_aux x, s = alpha / r; only A_train (r x a) and
B_train (b x r) train, the outer A_aux (a x d_in) and B_aux (d_out x b) are frozen.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize
from method_checks import assert_rows_match_alone
from safetensors.torch import load_file
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
    # aux_dim 9: lin (10 -> 8) gets a = 9, b = 8 (capped at d_out); gpt2 (8 -> 12) a = 8 (capped), b = 9
    return LoraConfig(**{"method": "lora-mini", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"],
                         "options": {"aux_dim": 9}, **kw})


def perturb(model, seed: int = 1) -> None:
    """O(1) random values in every trainable tensor (B_train starts at zero)."""
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
    a_aux, a_tr, b_tr, b_aux = (t.detach().double() for t in (a.lora_A_aux, a.lora_A_train, a.lora_B_train,
                                                               a.lora_B_aux))
    s = a.alpha / a.r
    xd = x.double()
    delta = s * (b_aux @ b_tr @ a_tr @ a_aux)
    return xd @ (base_weight(layer) + delta).t() + layer.base_layer.bias.detach().double()


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model)
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
    x = x_in()
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


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
    perturb(model)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    x = x_in()
    unmerged = model(x)
    model.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


def test_save_and_load_round_trip_keeps_the_frozen_outer_matrices(tmp_path):
    model = attach(net(), config())
    perturb(model)
    x = x_in()
    expected = model(x)
    model.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA_MINI"
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lin.lora_A_aux" in keys and "base_model.model.gpt2.lora_B_aux" in keys
    torch.manual_seed(123)    # different random outer matrices at construction: the file must win
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
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2, options={"aux_dim": 4}))
    perturb(model)
    model.set_active("b")
    perturb(model, seed=5)
    x = x_in(rows=5)
    ids = ["a", "b", None, "b", "a"]
    mixed = model(x, adapter_ids=ids)
    assert_rows_match_alone(model, x, ids, mixed, rtol=1e-5, atol=1e-6)


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="it takes: aux_dim"):
        attach(net(), config(options={"a": 4}))
    with pytest.raises(ValueError, match="aux_dim .* must be a positive integer"):
        attach(net(), config(options={"aux_dim": 0}))
