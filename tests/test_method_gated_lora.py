"""Gated LoRA (`loraplex/methods/gated_lora.py`) against its equation, in float64:
y = W x + b + s · B diag(m ⊙ γ(g)) A x, with γ = 1, g, or softmax over unmasked ranks, and DyLoRA's
truncation to the first k ranks with s = alpha / k.
"""

from __future__ import annotations

import pytest
import torch
from recipe_rank_util import base_weight, net

import loraplex
from loraplex import LoraConfig, attach

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**options) -> LoraConfig:
    return LoraConfig(method="gated-lora", r=4, alpha=6.0, targets=["lin", "gpt2"], init="random", options=options)


def randomize_state(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapted_layers().values():
            a = layer.adapters["default"]
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g))
            if hasattr(a, "lora_gate"):
                a.lora_gate.copy_(torch.randn(a.lora_gate.shape, generator=g))
            a.rank_mask.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))


def reference_weights(a, gate: str, k: int | None = None) -> torch.Tensor:
    m = a.rank_mask.double().clone()
    if k is not None:
        m[k:] = 0
    if gate == "none":
        return m
    g = a.lora_gate.detach().double()
    if gate == "linear":
        return m * g
    e = torch.exp(g - g[m > 0].max()) * m
    return e / e.sum()


def reference(layer, x: torch.Tensor, gate: str, k: int | None = None) -> torch.Tensor:
    a = layer.adapters["default"]
    w = reference_weights(a, gate, k)
    r = a.r if k is None else k
    s = a.alpha / r
    delta = s * a.lora_B.detach().double()[:, :r] @ torch.diag(w[:r]) @ a.lora_A.detach().double()[:r]
    bias = layer.base_layer.bias.detach().double()
    return x @ (base_weight(layer) + delta).t() + bias


@pytest.mark.parametrize("gate", ["none", "linear", "softmax"])
def test_forward_matches_the_equation(gate):
    model = attach(net(), config(gate=gate))
    randomize_state(model)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(5)).double()
    layer = model.adapted_layers()["lin"]
    torch.testing.assert_close(layer(x.float()).double(), reference(layer, x, gate), rtol=1e-5, atol=1e-5)
    for k in (1, 3):
        for a in (layer.adapters["default"],):
            a.active_rank = k
        torch.testing.assert_close(layer(x.float()).double(), reference(layer, x, gate, k), rtol=1e-5, atol=1e-5)
        layer.adapters["default"].active_rank = None
    if gate == "softmax":  # AutoLoRA's selection variables sum to one over the unmasked ranks
        w = layer.adapters["default"].rank_weights()
        assert float(w.sum()) == pytest.approx(1.0) and float(w[1]) == 0.0


def test_as_lora_drops_masked_and_zero_gated_ranks_and_keeps_the_function(tmp_path):
    model = attach(net(), config(gate="linear"))
    randomize_state(model)
    with torch.no_grad():
        model.adapted_layers()["gpt2"].adapters["default"].lora_gate[3] = 0.0
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(6))
    out = model(x).detach()
    model.save(tmp_path / "plain", as_lora=True)
    loaded = loraplex.load(net(), tmp_path / "plain")
    layers = loaded.adapted_layers()
    assert layers["lin"].adapters["default"].r == 3 and layers["gpt2"].adapters["default"].r == 2
    assert loaded.configs["default"].method == "lora"
    torch.testing.assert_close(loaded(x), out, rtol=1e-5, atol=1e-6)


def test_masks_gates_and_input_statistics_round_trip_through_files(tmp_path):
    model = attach(net(), config(gate="softmax", track_inputs=True))
    randomize_state(model)
    model.train()
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(7))
    model(x)
    lin = model.adapted_layers()["lin"].adapters["default"]
    torch.testing.assert_close(lin.input_sq, (x ** 2).sum(0))   # Σ x_j² over training tokens
    model.eval()
    out = model(x).detach()
    model.save(tmp_path / "gated")
    loaded = loraplex.load(net(), tmp_path / "gated")
    again = loaded.adapted_layers()["lin"].adapters["default"]
    assert torch.equal(again.rank_mask, lin.rank_mask) and torch.equal(again.input_sq, lin.input_sq)
    torch.testing.assert_close(loaded(x), out)


def test_train_last_only_gives_a_gradient_to_rank_k_only():
    model = attach(net(), config())
    layer = model.adapted_layers()["lin"]
    a = layer.adapters["default"]
    a.rank_mask.fill_(1.0)
    a.active_rank, a.train_last_only = 3, True
    model(torch.randn(4, 10)).pow(2).sum().backward()
    rows = a.lora_A.grad.abs().sum(1)
    cols = a.lora_B.grad.abs().sum(0)
    assert torch.all(rows[[0, 1, 3]] == 0) and rows[2] > 0
    assert torch.all(cols[[0, 1, 3]] == 0) and cols[2] > 0


def test_bad_options_are_refused():
    with pytest.raises(Exception, match="gate must be one of"):
        attach(net(), config(gate="sigmoid"))
    with pytest.raises(Exception, match="init_rank must be an integer"):
        attach(net(), config(init_rank=9))
    with pytest.raises(Exception, match="does not take option"):
        attach(net(), config(rank=2))
