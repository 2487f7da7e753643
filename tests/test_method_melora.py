"""MELoRA (`loraplex/methods/melora.py`) against the paper's equation, in float64:
x = [x_1; ...; x_n] (equal slices), y = W x + b + [s B_1 A_1 x_1; ...; s B_n A_n x_n], s = alpha / r,
i.e. ΔW = s block-diag(B_i A_i); every mini-LoRA has rank r, A_i: r x d_in/n, B_i: d_out/n x r.
The reference below loops over the slices (no reshapes, no einsum).
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
    return LoraConfig(**{"method": "melora", "r": 2, "options": {"n": 2}, "alpha": 6.0, "targets": ["lin", "gpt2"],
                         **kw})


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
    xd = x.double()
    s = a.alpha / a.r
    d_in, d_out = layer.spec.in_features, layer.spec.out_features
    n = a.melora_A.shape[0]
    k, m = d_in // n, d_out // n
    delta = torch.zeros(xd.shape[0], d_out, dtype=torch.float64)
    for i in range(n):
        A = a.melora_A[i].detach().double()
        B = a.melora_B[i].detach().double()
        delta[:, i * m:(i + 1) * m] = s * xd[:, i * k:(i + 1) * k] @ A.t() @ B.t()
    return xd @ base_weight(layer).t() + layer.base_layer.bias.detach().double() + delta


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model)
    for path, layer in model.adapted_layers().items():
        x = torch.randn(4, layer.spec.in_features)
        torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5, msg=path)


def test_weight_change_is_block_diagonal_of_rank_n_times_r():
    model = attach(net(), config(r=1, options={"n": 2}))
    perturb(model)
    dw = model.model.lin.adapters["default"].delta_weight(model.model.lin.spec)     # 8 x 10, blocks 4 x 5
    assert torch.count_nonzero(dw[:4, 5:]) == 0 and torch.count_nonzero(dw[4:, :5]) == 0
    assert torch.linalg.matrix_rank(dw) == 2


def test_initialisation_is_the_identity():
    model = attach(net(), config())
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        assert torch.count_nonzero(a.melora_B) == 0
        assert a.melora_A.abs().max() <= 1 / (layer.spec.in_features // 2) ** 0.5
    x = x_in()
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_trainable_parameters_are_r_times_din_plus_dout():
    model = attach(net(), config(r=2, options={"n": 2}))
    assert model.trainable_parameter_count() == 2 * (10 + 8) + 2 * (8 + 12)
    model = attach(net(), config(r=1, options={"n": 4}, targets=["gpt2"]))     # 8 -> 12: 4 minis of 2 -> 3
    assert model.trainable_parameter_count() == 4 * (1 * 2 + 3 * 1)
    assert {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()} == {"melora_A", "melora_B"}


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
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MELORA"
    loaded = loraplex.load(net(), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_save_as_plain_lora_of_rank_n_times_r_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model)
    x = x_in()
    expected = model(x)
    model.save(tmp_path, as_lora=True)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 4
    plain = loraplex.load(net(), tmp_path)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=1, options={"n": 1}))
    perturb(model)
    model.set_active("b")
    perturb(model, seed=5)
    x = x_in(rows=5)
    ids = ["a", "b", None, "b", "a"]
    mixed = model(x, adapter_ids=ids)
    assert_rows_match_alone(model, x, ids, mixed, rtol=1e-5, atol=1e-6)


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="it takes: n"):
        attach(net(), config(options={"minis": 2}))
    with pytest.raises(ValueError, match="n=3 must divide both d_in=10 and d_out=8"):
        attach(net(), config(options={"n": 3}))
    with pytest.raises(ValueError, match="positive integer"):
        attach(net(), config(options={"n": 0}))
