"""MoRA (`loraplex/methods/mora.py`) against the paper's equations.

The reference builds ΔW from explicit 0/1 and rotation matrices, in float64, from the adapter's M:
    padding  E (n r̂ x d_in):  E[p, p mod d_in] = 1        (x padded by repeating its first entries)
    sharing  ΔW = T M S E,    S[k, p] = [p ≡ k (mod r̂)],  T[o, k] = [o ≡ k (mod r̂)]
    rope     ΔW = O diag(M R_0, ..., M R_{n-1}) E,  R_b = diag(cos θ_b) + diag(sin θ_b) H (H: rotate_half),
             O[o, p] = [p ≡ o (mod n r̂)]              (outputs cut to d_out, or repeated when shorter)
    r̂ = floor(sqrt((d_in + d_out) r) + 1/2), even for rope.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hf_ids, tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    check_starts_as_base,
    linear_reference,
    perturb,
    perturb_both,
    two_layer_net,
    x_in,
)

from loraplex import LoraConfig, attach

TYPES = ("sharing", "rope")


def net(seed: int = 0) -> TwoLayerNet:
    """Linear 10 -> 7 (outputs cut), GPT-2 Conv1D 7 -> 16 (outputs repeated), then a plain head."""
    return two_layer_net(10, 7, 16, seed)


def config(mora_type: str = "sharing", **kw) -> LoraConfig:
    return LoraConfig(**{"method": "mora", "r": 2, "targets": ["lin", "gpt2"], "rank_pattern": {"gpt2": 1},
                         "options": {"mora_type": mora_type}, **kw})


def reference_delta_weight(d_in: int, d_out: int, m: torch.Tensor, mora_type: str) -> torch.Tensor:
    r_hat = m.shape[0]
    n = math.ceil(d_in / r_hat)
    length = n * r_hat
    e = torch.zeros(length, d_in, dtype=torch.float64)
    for p in range(length):
        e[p, p % d_in] = 1
    if mora_type == "sharing":
        s = torch.zeros(r_hat, length, dtype=torch.float64)
        t = torch.zeros(d_out, r_hat, dtype=torch.float64)
        for p in range(length):
            s[p % r_hat, p] = 1
        for o in range(d_out):
            t[o, o % r_hat] = 1
        return t @ m @ s @ e
    half = r_hat // 2
    h = torch.zeros(r_hat, r_hat, dtype=torch.float64)     # rotate_half(v) = (-v[half:], v[:half]) = H v
    for i in range(half):
        h[i, i + half] = -1
        h[i + half, i] = 1
    omega = torch.tensor([10000 ** (-2 * j / r_hat) for j in range(half)], dtype=torch.float64).repeat(2)
    blocks = torch.zeros(length, length, dtype=torch.float64)
    for b in range(n):
        rotation = torch.diag(torch.cos(b * omega)) + torch.diag(torch.sin(b * omega)) @ h
        blocks[b * r_hat:(b + 1) * r_hat, b * r_hat:(b + 1) * r_hat] = m @ rotation
    o = torch.zeros(d_out, length, dtype=torch.float64)
    for row in range(d_out):
        o[row, row % length] = 1
    return o @ blocks @ e


@pytest.mark.parametrize("mora_type", TYPES)
def test_output_matches_paper_equation(mora_type):
    model = attach(net(), config(mora_type)).eval()
    perturb(model, fan_in=True)
    for path, layer in model.adapted_layers().items():
        a = layer.adapters["default"]
        delta = reference_delta_weight(layer.spec.in_features, layer.spec.out_features, a.mora_M.detach().double(),
                                       mora_type)
        x = x_in(layer.spec.in_features)
        ref = linear_reference(layer, x, base_weight(layer) + delta)
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=f"{mora_type} {path}")
        torch.testing.assert_close(a.delta_weight(layer.spec).double(), delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mora_type", TYPES)
def test_square_size_and_trainable_parameters(mora_type):
    model = attach(net(), config(mora_type))
    r_hat = {"lin": int(math.sqrt((10 + 7) * 2) + 0.5), "gpt2": int(math.sqrt((7 + 16) * 1) + 0.5)}
    if mora_type == "rope":
        r_hat = {k: v // 2 * 2 for k, v in r_hat.items()}
    assert r_hat == ({"lin": 6, "gpt2": 5} if mora_type == "sharing" else {"lin": 6, "gpt2": 4})
    for path, layer in model.adapted_layers().items():
        assert tuple(layer.adapters["default"].mora_M.shape) == (r_hat[path], r_hat[path])
    assert model.trainable_parameter_count() == sum(v * v for v in r_hat.values())
    assert set(model.named_trainable_parameters()) == {"lin.adapters.default.mora_M", "gpt2.adapters.default.mora_M"}


def test_starts_as_the_identity_and_reaches_high_rank():
    model = attach(net(), config()).eval()
    check_starts_as_base(model, x_in(), rtol=0, atol=0)     # M = 0
    perturb(model, fan_in=True)
    layer = model.adapted_layers()["lin"]
    # rank of ΔW can exceed a LoRA's r = 2 with the same parameter budget
    assert torch.linalg.matrix_rank(layer.adapters["default"].delta_weight(layer.spec)) > 2


@pytest.mark.parametrize("mora_type", TYPES)
def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged(mora_type):
    model = attach(net(), config(mora_type)).eval()
    perturb(model, fan_in=True)
    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


@pytest.mark.parametrize("mora_type", TYPES)
def test_save_and_load_round_trip(mora_type, tmp_path):
    model = attach(net(), config(mora_type)).eval()
    perturb(model, fan_in=True)
    loaded, _ = check_save_load(model, net, x_in(), tmp_path, peft_type="MORA", rtol=0, atol=0, eval_loaded=True)
    assert loaded.trainable_parameter_count() == model.trainable_parameter_count()


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config("sharing"), "a")
    model.add_adapter("b", config("rope", r=3))
    model.eval()
    perturb_both(model, seed_b=5, fan_in=True)
    check_mixed_batch(model, x_in(rows=5), rtol=1e-5, atol=1e-6)


def test_gpt2_trains_m():
    model = attach(tiny_gpt2(), LoraConfig(method="mora", r=2, targets=["c_attn", "c_fc"]))
    ids = hf_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    params = model.trainable_parameters()
    assert len(params) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize(("kw", "message"), [
    ({"options": {"mora_type": "truncate"}}, "mora_type must be"),
    ({"options": {"type": 1}}, "it takes: mora_type"),
    ({"init": "gaussian"}, "init must be one of"),
    ({"r": 9}, r"r̂=\d+ .* must lie in"),
])
def test_bad_settings_say_what_is_allowed(kw, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(**kw))
