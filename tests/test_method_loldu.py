"""LoLDU (`loraplex/methods/loldu.py`) against the paper's equations.

Reference, written here in float64: W = P L D U by Gaussian elimination with partial pivoting
(implemented below, independently of torch.linalg.lu), the residual W_res = W - σ₀ P L_r diag(z₀) U_r
and the adapted weight W' = W_res + σ P L_r diag(z) U_r, with z (init z₀ = D_r) and σ (init alpha/r)
the only trainable tensors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_gpt2_gradients,
    check_mixed_batch,
    check_save_load,
    check_starts_as_base,
    must_not_run,
    perturb_both,
    two_layer_net,
    x_in,
)

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


def net(seed: int = 0) -> TwoLayerNet:
    """A wide Linear (10 -> 8) and a tall GPT-2 Conv1D (8 -> 12), adapted, then a plain head."""
    return two_layer_net(10, 8, 12, seed)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "loldu", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def perturb(model, seed: int = 1) -> None:
    """Move z and σ by O(1) relative amounts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))


def ldu(w: torch.Tensor):
    """(P L, D, U) of W = P L D U by Doolittle elimination with partial pivoting (largest |pivot|)."""
    a = w.clone()
    m, n = a.shape
    k = min(m, n)
    order = list(range(m))
    lower = torch.zeros(m, k, dtype=w.dtype)
    for j in range(k):
        p = j + int(torch.argmax(a[j:, j].abs()))
        a[[j, p]] = a[[p, j]]
        lower[[j, p]] = lower[[p, j]]
        order[j], order[p] = order[p], order[j]
        lower[j, j] = 1.0
        lower[j + 1:, j] = a[j + 1:, j] / a[j, j]
        a[j + 1:] -= torch.outer(lower[j + 1:, j], a[j])
    upper = a[:k]
    d = torch.diagonal(upper).clone()
    permuted_lower = torch.zeros_like(lower)
    permuted_lower[order] = lower            # (P L)[order[i]] = L[i]
    return permuted_lower, d, upper / d[:, None]


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    w, b = base_weight(layer), layer.base_layer.bias.detach().double()
    pl, d, u = ldu(w)
    r = a.r
    sigma0 = a.alpha / r
    residual = w - sigma0 * pl[:, :r] @ torch.diag(d[:r]) @ u[:r]
    adapted = residual + a.loldu_scale.detach().double() * pl[:, :r] @ torch.diag(a.loldu_diag.detach().double()) \
        @ u[:r]
    return x.double() @ adapted.t() + b


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5,
                                   msg=path)


def test_initialisation_is_the_ldu_decomposition_and_the_identity():
    model = attach(net(), config())
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        w = base_weight(layer)
        pl, d, u = ldu(w)
        torch.testing.assert_close(pl @ torch.diag(d) @ u, w, rtol=1e-10, atol=1e-10)   # the reference is right
        torch.testing.assert_close(a.loldu_B.double(), pl[:, :3], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.loldu_A.double(), u[:3], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.loldu_diag0.double(), d[:3], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.loldu_diag.detach(), a.loldu_diag0, rtol=0, atol=0)
        assert a.loldu_scale.item() == a.loldu_scale0.item() == 2.0
    check_starts_as_base(model, x_in(10), rtol=0, atol=0)


@pytest.mark.parametrize(("train_scale", "per_layer"), [(True, 4), (False, 3)])
def test_trainable_parameters_are_r_plus_one_per_layer(train_scale, per_layer):
    model = attach(net(), config(options={"train_scale": train_scale}))
    assert model.trainable_parameter_count() == 2 * per_layer
    expected = {"loldu_diag", "loldu_scale"} if train_scale else {"loldu_diag"}
    assert {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()} == expected
    model.set_active("default")
    assert model.trainable_parameter_count() == 2 * per_layer


def test_the_base_weight_is_never_rewritten_and_merge_unmerge_restores_it():
    model = attach(net(), config())
    perturb(model)
    before = {k: v.clone() for k, v in net().state_dict().items()}
    for key, value in model.model.state_dict().items():
        if "adapters" not in key:
            torch.testing.assert_close(value, before[key.replace("base_layer.", "")], rtol=0, atol=0)
    x = x_in(10)
    unmerged = model(x)
    model.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    after = {k.replace("base_layer.", ""): v for k, v in model.model.state_dict().items() if "adapters" not in k}
    for key, value in after.items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)
    model.delete_adapter("default")
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    model = attach(net(), config())
    perturb(model)
    # loading recomputes no decomposition
    monkeypatch.setattr("loraplex.methods.loldu.ldu_factors", must_not_run("the LU of W"))
    check_save_load(model, net, x_in(10), tmp_path, peft_type="LOLDU", rtol=0, atol=0)


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


def test_gpt2_gradients_reach_the_diagonal_and_scale():
    model = attach(tiny_gpt2(), LoraConfig(method="loldu", r=4, alpha=4.0, targets=["c_attn", "attn.c_proj"]))
    check_gpt2_gradients(model, tensors=8, count=4 * (4 + 1))


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="it takes: train_scale"):
        attach(net(), config(options={"scale": 1}))
    with pytest.raises(ValueError, match="train_scale must be true or false"):
        attach(net(), config(options={"train_scale": "yes"}))
