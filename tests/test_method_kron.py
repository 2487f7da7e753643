"""Kronecker adapter (`loraplex/methods/kron.py`, PEFT's LoKr) against the paper's equation and PEFT.

Reference, in float64 from the adapter's raw factors:
    ΔW[(i·b + k), (j·d + l)] = s · W₁[i, j] · W₂[k, l],  s = alpha / r,
    W₁ = W₁ₐ W₁ᵦ and W₂ = W₂ₐ W₂ᵦ where they are stored as low-rank pairs,
    y = W x + b + ΔW x.
Parity both ways with PEFT 0.21's LoKr (files saved by one load in the other with identical outputs).
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
from loraplex.methods.kron import factorization


class Net(nn.Module):
    """Linear 12 -> 32 and GPT-2 Conv1D 32 -> 8 (W₂ low-rank at r = 2 in both), then a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 32)
        self.gpt2 = Conv1D(8, 32)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.gpt2(torch.tanh(self.lin(x)))))


class LinearNet(Net):
    """The same with a Linear in place of the Conv1D (PEFT's LoKr adapts Linear layers only)."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt2 = nn.Linear(32, 8)


def net(seed: int = 0, cls=Net) -> Net:
    torch.manual_seed(seed)
    return randomize(cls()).eval()


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "kron", "r": 2, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def perturb(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def base_weight(layer: AdaptedLayer) -> torch.Tensor:
    w = layer.base_layer.weight.detach().double()
    return w.t() if isinstance(layer.base_layer, Conv1D) else w


def reference_delta(adapter) -> torch.Tensor:
    t = {k: getattr(adapter, k).detach().double() for k in adapter.factor_keys}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    (a, c), (b, d) = w1.shape, w2.shape
    delta = torch.einsum("ij,kl->ikjl", w1, w2).reshape(a * b, c * d)     # [(i b + k), (j d + l)]
    return adapter.alpha / adapter.r * delta


def x_in(d: int = 12, seed: int = 2, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def test_factorization_is_closest_to_square():
    assert factorization(8) == (2, 4) and factorization(12) == (3, 4) and factorization(16) == (4, 4)
    assert factorization(127) == (1, 127) and factorization(256) == (16, 16) and factorization(576) == (24, 24)
    assert factorization(128, 4) == (4, 32) and factorization(12, 5) == (3, 4)


@pytest.mark.parametrize("options", [{}, {"decompose_both": True}, {"decompose_factor": 4}])
def test_output_matches_paper_equation(options):
    model = attach(net(), config(r=1 if options.get("decompose_both") else 2, options=options)).eval()
    perturb(model)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        delta = reference_delta(layer.adapters["default"])
        ref = x.double() @ (base_weight(layer) + delta).t() + layer.base_layer.bias.detach().double()
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=f"{options} {path}")


def test_factor_shapes_and_trainable_parameters():
    model = attach(net(), config())
    lin, gpt2 = (model.adapted_layers()[p].adapters["default"] for p in ("lin", "gpt2"))
    # lin: 32 = 4·8, 12 = 3·4; r = 2 < max(8, 4)/2 -> W₂ = W₂ₐ (8x2) W₂ᵦ (2x4); W₁ full 4x3
    assert {k: tuple(getattr(lin, k).shape) for k in lin.factor_keys} == {
        "lokr_w1": (4, 3), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 4)}
    # gpt2: 8 = 2·4, 32 = 4·8; r = 2 < max(4, 8)/2 -> low-rank W₂
    assert {k: tuple(getattr(gpt2, k).shape) for k in gpt2.factor_keys} == {
        "lokr_w1": (2, 4), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 8)}
    assert model.trainable_parameter_count() == (12 + 16 + 8) + (8 + 8 + 16)
    both = attach(net(), config(r=1, options={"decompose_both": True}))
    lin = both.adapted_layers()["lin"].adapters["default"]
    assert set(lin.factor_keys) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}


@pytest.mark.parametrize("init", ["kaiming", "lycoris"])
def test_initial_adapter_is_the_identity(init):
    model = attach(net(), config(init=init)).eval()
    x = x_in()
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config()).eval()
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
    model = attach(net(), config(options={"decompose_factor": 4})).eval()
    perturb(model)
    x = x_in()
    expected = model(x)
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LOKR" and data["r"] == 2 and data["decompose_factor"] == 4
    loaded = loraplex.load(net(), tmp_path).eval()
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=3, options={"decompose_both": True}))
    model.eval()
    perturb(model)
    model.set_active("b")
    perturb(model, seed=5)
    x = x_in(rows=5)
    ids = ["a", "b", None, "b", "a"]
    mixed = model(x, adapter_ids=ids)
    assert_rows_match_alone(model, x, ids, mixed, rtol=1e-5, atol=1e-6)


def test_rank_and_module_dropout_only_act_while_training():
    model = attach(net(), config(options={"rank_dropout": 0.5, "module_dropout": 0.5})).eval()
    perturb(model)
    x = x_in()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    outs = {tuple(model(x).flatten().tolist()) for _ in range(6)}
    assert len(outs) > 1


def test_gpt2_trains_the_factors():
    model = attach(tiny_gpt2(), LoraConfig(method="kron", r=2, targets=["c_attn", "c_fc"]))
    ids = hf_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_trainable_parameters().items()}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lokr_w1" in n)   # W₁ = 0 gets the gradient


# --------------------------------------------------------------------------- PEFT parity
PEFT_CASES = {"full": ({"r": 2, "alpha": 4}, {}), "decompose_both": ({"r": 1, "alpha": 3, "decompose_both": True},
                                                                     {"decompose_both": True}),
              "factor": ({"r": 2, "alpha": 4, "decompose_factor": 4}, {"decompose_factor": 4})}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_file_loads_in_loraplex_and_back(case, tmp_path):
    peft_kw, _ = PEFT_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(net(cls=LinearNet), peft.LoKrConfig(target_modules=["lin", "gpt2"],
                                                                           init_weights=False, **peft_kw)).eval()
        x = x_in()
        expected = theirs(x)
        theirs.save_pretrained(tmp_path / "peft")
        ours = loraplex.load(net(cls=LinearNet), tmp_path / "peft").eval()
        assert (expected - net(cls=LinearNet)(x)).abs().max() > 1e-2
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        ours.save(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(net(cls=LinearNet), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-5)


def test_loraplex_file_loads_in_peft(tmp_path):
    model = attach(net(cls=LinearNet), config(init="lycoris", options={"decompose_both": True}, r=1)).eval()
    perturb(model)
    x = x_in()
    expected = model(x)
    model.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(net(cls=LinearNet), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("options", "message"), [
    ({"decompose_factor": 0}, "decompose_factor must be"),
    ({"rank_dropout": 1.5}, "rank_dropout must satisfy"),
    ({"decompose_both": "yes"}, "decompose_both must be true or false"),
    ({"factor": 2}, "it takes:"),
])
def test_bad_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(options=options))
