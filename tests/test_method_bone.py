"""Bone / MiSS (`loraplex/methods/bone.py`) against the paper's equations and PEFT 0.21's MiSS.

Reference, in float64 with explicit loops over blocks, from the adapter's raw tensor:
    "bat"     ΔW_ij = W_ij B_i + B_i     (W_ij the r x r block of row block i, column block j)
    "balance" ΔW[o, j] = D[j mod r, o]
    "mini"    ΔW[o, j] = D_mini[j mod r, o mod mini_r]
    y = W x + b + ΔW x.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import hf_ids, randomize, tiny_gpt2
from method_checks import assert_rows_match_alone
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraplex
from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer

VARIANTS = {"bat": {"r": 4}, "balance": {"r": 3}, "mini": {"r": 3, "mini_r": 4}}


class Net(nn.Module):
    """Linear 12 -> 8 and GPT-2 Conv1D 8 -> 16 (both cut into 4 x 4 blocks), then a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 8)
        self.gpt2 = Conv1D(16, 8)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.gpt2(torch.tanh(self.lin(x)))))


class LinearNet(Net):
    def __init__(self) -> None:
        super().__init__()
        self.gpt2 = nn.Linear(8, 16)


def net(seed: int = 0, cls=Net) -> Net:
    torch.manual_seed(seed)
    return randomize(cls()).eval()


def config(variant: str = "bat", **kw) -> LoraConfig:
    v = dict(VARIANTS[variant])
    options = {"variant": variant} | ({"mini_r": v["mini_r"]} if "mini_r" in v else {})
    return LoraConfig(**{"method": "bone", "r": v["r"], "targets": ["lin", "gpt2"], "options": options, **kw})


def perturb(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def base_weight(layer: AdaptedLayer) -> torch.Tensor:
    w = layer.base_layer.weight.detach().double()
    return w.t() if isinstance(layer.base_layer, Conv1D) else w


def reference_delta(layer: AdaptedLayer, name: str = "default") -> torch.Tensor:
    a = layer.adapters[name]
    w, t, r = base_weight(layer), a.miss_block.detach().double(), a.r
    delta = torch.zeros_like(w)
    d_out, d_in = w.shape
    if a.variant == "bat":
        for i in range(d_out // r):
            for j in range(d_in // r):
                block = w[i * r:(i + 1) * r, j * r:(j + 1) * r]
                delta[i * r:(i + 1) * r, j * r:(j + 1) * r] = block @ t[i] + t[i]
        return delta
    for o in range(d_out):
        for j in range(d_in):
            delta[o, j] = t[j % r, o] if a.variant == "balance" else t[j % r, o % a.mini_r]
    return delta


def x_in(d: int = 12, seed: int = 2, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_matches_paper_equation(variant):
    model = attach(net(), config(variant)).eval()
    perturb(model)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        ref = x.double() @ (base_weight(layer) + reference_delta(layer)).t() + layer.base_layer.bias.detach().double()
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=f"{variant} {path}")


@pytest.mark.parametrize(("variant", "expected"), [("bat", 8 * 4 + 16 * 4), ("balance", 3 * 8 + 3 * 16),
                                                    ("mini", 2 * 3 * 4)])
def test_trainable_parameters(variant, expected):
    model = attach(net(), config(variant))
    assert model.trainable_parameter_count() == expected
    assert set(model.named_trainable_parameters()) == {"lin.adapters.default.miss_block",
                                                       "gpt2.adapters.default.miss_block"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_starts_as_the_identity(variant):
    model = attach(net(), config(variant)).eval()
    x = x_in()
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged(variant):
    model = attach(net(), config(variant)).eval()
    perturb(model)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    x = x_in()
    unmerged = model(x)
    model.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


def test_two_block_affine_adapters_merge_from_the_bare_base():
    model = attach(net(), config("bat"), "a")
    model.add_adapter("b", config("bat"))
    model.eval()
    perturb(model)
    model.set_active("b")
    perturb(model, seed=3)
    model.set_active(["a", "b"])
    x = x_in()
    unmerged = model(x)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_and_load_round_trip(variant, tmp_path):
    model = attach(net(), config(variant)).eval()
    perturb(model)
    x = x_in()
    expected = model(x)
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "MISS" and data["init_weights"] == {"bat": "bat", "balance": True, "mini": "mini"}[variant]
    loaded = loraplex.load(net(), tmp_path).eval()
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config("bat"), "a")
    model.add_adapter("b", config("balance"))
    model.eval()
    perturb(model)
    model.set_active("b")
    perturb(model, seed=5)
    x = x_in(rows=5)
    ids = ["a", "b", None, "b", "a"]
    mixed = model(x, adapter_ids=ids)
    assert_rows_match_alone(model, x, ids, mixed, rtol=1e-5, atol=1e-6)


def test_gpt2_trains_the_blocks_and_leaves_the_base():
    model = attach(tiny_gpt2(), LoraConfig(method="bone", r=4, targets=["c_attn", "c_fc"]))
    weights = {n: p.clone() for n, p in model.model.named_parameters()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    ids = hf_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    opt.step()
    for n, p in model.model.named_parameters():
        if "adapters" not in n:
            assert torch.equal(p, weights[n]), n


# --------------------------------------------------------------------------- PEFT parity
PEFT_CASES = {"bat": {"r": 4, "init_weights": "bat"}, "balance": {"r": 3, "init_weights": False},
              "mini": {"r": 3, "init_weights": "mini", "mini_r": 4}}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_file_loads_in_loraplex_and_back(case, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(net(cls=LinearNet), peft.MissConfig(target_modules=["lin", "gpt2"],
                                                                          **PEFT_CASES[case])).eval()
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "miss_block" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        x = x_in()
        expected = theirs(x)
        theirs.save_pretrained(tmp_path / "peft")
        ours = loraplex.load(net(cls=LinearNet), tmp_path / "peft").eval()
        assert ours.configs["default"].options["variant"] == case
        assert (expected - net(cls=LinearNet)(x)).abs().max() > 1e-2
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        ours.save(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(net(cls=LinearNet), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kw", "message"), [
    ({"r": 5}, "must divide d_in"),
    ({"options": {"variant": "block"}}, "variant must be one of"),
    ({"options": {"variant": "mini", "mini_r": 3}}, "mini_r=3 to divide d_out"),
    ({"r": 13, "options": {"variant": "balance"}}, "must not exceed in_features"),
])
def test_bad_settings_say_what_is_allowed(kw, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(**kw))
