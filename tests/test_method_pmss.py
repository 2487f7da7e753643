"""PMSS (`loraplex/methods/pmss.py`) against the paper's equations.

Reference, written here in float64: skeleton columns C = W[:, J] and rows R = W[I, :] (J, I the
pivots of QR with column pivoting of W and Wᵀ, re-derived below from a plain QR of the chosen
columns), the core U₀ = C⁺ W R⁺, the residual W_res = W - s C U₀ R and the adapted weight
W' = W_res + s C U R with only U trainable (U starts at U₀).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_gpt2_gradients,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    check_starts_as_base,
    must_not_run,
    perturb_both,
    two_layer_net,
    x_in,
)
from torch import nn

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


def net(seed: int = 0) -> TwoLayerNet:
    """A wide Linear (10 -> 8) and a tall GPT-2 Conv1D (8 -> 12), adapted, then a plain head."""
    return two_layer_net(10, 8, 12, seed)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "pmss", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def perturb(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))


def qr_pivots(m: torch.Tensor, k: int) -> list[int]:
    """Greedy pivots: next = the column farthest from the span of those chosen (via a QR of them)."""
    chosen: list[int] = []
    for _ in range(k):
        if chosen:
            q, _ = torch.linalg.qr(m[:, chosen])
            residual = m - q @ (q.t() @ m)
        else:
            residual = m
        norms = residual.norm(dim=0)
        norms[chosen] = -1.0
        chosen.append(int(torch.argmax(norms)))
    return chosen


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    w, b = base_weight(layer), layer.base_layer.bias.detach().double()
    cols, rows = qr_pivots(w, a.r), qr_pivots(w.t(), a.r)
    c, r_ = w[:, cols], w[rows, :]
    core0 = torch.linalg.pinv(c) @ w @ torch.linalg.pinv(r_)
    s = a.alpha / a.r
    adapted = (w - s * c @ core0 @ r_) + s * c @ a.pmss_U.detach().double() @ r_
    return x.double() @ adapted.t() + b


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5,
                                   msg=path)


def test_skeletons_are_pivoted_columns_and_rows_of_w():
    model = attach(net(), config())
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        w = base_weight(layer)
        cols, rows = qr_pivots(w, 3), qr_pivots(w.t(), 3)
        assert cols[0] == int(w.norm(dim=0).argmax()) and rows[0] == int(w.norm(dim=1).argmax())
        torch.testing.assert_close(a.pmss_C.double(), w[:, cols], rtol=0, atol=1e-7)
        torch.testing.assert_close(a.pmss_R.double(), w[rows, :], rtol=0, atol=1e-7)
        core0 = torch.linalg.pinv(w[:, cols]) @ w @ torch.linalg.pinv(w[rows, :])
        torch.testing.assert_close(a.pmss_U0.double(), core0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.pmss_U.detach(), a.pmss_U0, rtol=0, atol=0)
    check_starts_as_base(model, x_in(10), rtol=0, atol=0)


def test_a_rank_r_weight_is_reproduced_exactly_by_its_skeleton():
    torch.manual_seed(0)
    layer = nn.Linear(9, 7, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(7, 3) @ torch.randn(3, 9))
    holder = nn.Sequential(layer)
    model = attach(holder, LoraConfig(method="pmss", r=3, targets=["0"]))
    a = model.adapted_layers()["0"].adapters["default"]
    torch.testing.assert_close(a.pmss_C @ a.pmss_U0 @ a.pmss_R, layer.weight, rtol=1e-4, atol=1e-4)


def test_trainable_parameters_are_r_squared_per_layer():
    model = attach(net(), config(r=4))
    assert model.trainable_parameter_count() == 2 * 16
    assert {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()} == {"pmss_U"}
    for layer in model.adapted_layers().values():
        assert {n for n, _ in layer.adapters["default"].named_buffers()} == {"pmss_C", "pmss_R", "pmss_U0"}


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model)
    check_merge_unmerge(model, x_in(10), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    model = attach(net(), config())
    perturb(model)
    # loading recomputes no decomposition
    monkeypatch.setattr("loraplex.methods.pmss.skeleton", must_not_run("the skeleton selection of W"))
    check_save_load(model, net, x_in(10), tmp_path, peft_type="PMSS", rtol=0, atol=0)


def test_save_as_plain_lora_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model)
    _, data = check_save_load(model, net, x_in(10), tmp_path, as_lora=True, peft_type="LORA",
                              rtol=1e-5, atol=1e-5)
    assert data["r"] == 3


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2))
    perturb_both(model, seed_b=5, using=perturb)
    check_mixed_batch(model, x_in(10, rows=5), rtol=1e-5, atol=1e-6)


def test_gpt2_gradients_reach_the_core_only():
    model = attach(tiny_gpt2(), LoraConfig(method="pmss", r=4, alpha=4.0, targets=["c_attn", "c_fc"]))
    check_gpt2_gradients(model, tensors=4, count=4 * 16)


def test_bad_options_and_rank_say_what_is_allowed():
    with pytest.raises(ValueError, match=r"it takes: \(none\)"):
        attach(net(), config(options={"selection": "deim"}))
    with pytest.raises(ValueError, match="exceeds min"):
        attach(net(), config(r=9))
