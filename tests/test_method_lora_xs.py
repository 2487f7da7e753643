"""LoRA-XS and LoRA-SB (`loraplex/methods/lora_xs.py`) against the papers' equations.

References are written here from the papers, in float64, from the adapter's raw tensors:
    LoRA-XS: y = W x + b + s·B R A x, B = U_r, A = Σ_r V_rᵀ from the SVD of W, only R trains.
    LoRA-SB: the same architecture; s·B R A = best rank-r approximation of ΔW₁ = -η·sign(G) (or -η·G),
             G the mean gradient of the base model's loss w.r.t. W over the calibration batches,
             B and Aᵀ with orthonormal columns and R = S_r / s diagonal.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import hf_ids, tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    calibration_batches,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    check_starts_as_base,
    mean_weight_gradients,
    must_not_run,
    perturb,
    perturb_both,
    two_layer_net,
    x_in,
)

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer

METHODS = ("lora-xs", "lora-sb")


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 6), adapted, then a plain head."""
    return two_layer_net(10, 8, 6, seed)


def config(method: str, **kw) -> LoraConfig:
    return LoraConfig(**{"method": method, "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    w, b = base_weight(layer), layer.base_layer.bias.detach().double()
    big_a, big_b, big_r = (t.detach().double() for t in (a.lora_A, a.lora_B, a.lora_R))
    s = a.alpha / a.r
    xd = x.double()
    return xd @ w.t() + b + s * ((xd @ big_a.t()) @ big_r.t()) @ big_b.t()


@pytest.mark.parametrize("method", METHODS)
def test_output_matches_paper_equation(method):
    model = attach(net(), config(method))
    perturb(model, fan_in=True)
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5,
                                   msg=f"{method} {path}")


def test_lora_xs_frozen_pair_is_the_truncated_svd_of_w():
    model = attach(net(), config("lora-xs"))
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        w = base_weight(layer)
        u, s, vh = torch.linalg.svd(w)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        big_b, big_a = a.lora_B.double(), a.lora_A.double()
        torch.testing.assert_close(big_b @ big_a, best, rtol=1e-5, atol=1e-5)      # B A = U_r Σ_r V_rᵀ
        torch.testing.assert_close(big_b.t() @ big_b, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-5)
        torch.testing.assert_close(big_a.norm(dim=1), s[:3], rtol=1e-5, atol=1e-6)  # A = Σ_r V_rᵀ
        assert a.lora_R.abs().max() < 1e-3                                         # R ~ N(0, 1e-10)
    check_starts_as_base(model, x_in(10), rtol=0, atol=1e-3)                      # nearly the identity


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameters_are_r_squared_per_layer_and_factors_are_buffers(method):
    model = attach(net(), config(method, r=4))
    assert model.trainable_parameter_count() == 2 * 4 * 4
    names = set(model.named_trainable_parameters())
    assert names == {"lin.adapters.default.lora_R", "gpt2.adapters.default.lora_R"}
    layer = model.adapted_layers()["lin"]
    buffers = dict(layer.adapters["default"].named_buffers())
    assert set(buffers) == {"lora_A", "lora_B"} and not any(b.requires_grad for b in buffers.values())
    model.set_active("default")  # re-running the trainable-flag update leaves the factors frozen
    assert model.trainable_parameter_count() == 32


@pytest.mark.parametrize("method", METHODS)
def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged(method):
    model = attach(net(), config(method))
    perturb(model, fan_in=True)
    x = x_in(10)
    unmerged = check_merge_unmerge(model, x, rtol=1e-5, atol=1e-5, restore_atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(method, tmp_path, monkeypatch):
    model = attach(net(), config(method))
    perturb(model, fan_in=True)
    # loading recomputes no decomposition
    monkeypatch.setattr("loraplex.methods.lora_xs.xs_factors", must_not_run("the SVD of W"))
    loaded, data = check_save_load(model, net, x_in(10), tmp_path, rtol=0, atol=0)
    assert data["peft_type"] == {"lora-xs": "LORA_XS", "lora-sb": "LORA_SB"}[method]  # PEFT refuses, not misreads
    assert loaded.trainable_parameter_count() == model.trainable_parameter_count()


@pytest.mark.parametrize("method", METHODS)
def test_save_as_plain_lora_loads_on_the_unmodified_base(method, tmp_path):
    model = attach(net(), config(method))
    perturb(model, fan_in=True)
    plain, data = check_save_load(model, net, x_in(10), tmp_path, as_lora=True, peft_type="LORA",
                                  rtol=1e-5, atol=1e-5)
    assert data["r"] == 3
    assert {type(a).method for layer in plain.adapted_layers().values() for a in layer.adapters.values()} == {"lora"}


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_equals_each_row_alone(method):
    model = attach(net(), config(method), "a")
    model.add_adapter("b", config(method, r=2))
    perturb_both(model, seed_b=5, fan_in=True)      # each while active, hence trainable
    check_mixed_batch(model, x_in(10, rows=5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_gpt2_trains_only_r_and_keeps_the_factors(method):
    model = attach(tiny_gpt2(), LoraConfig(method=method, r=4, alpha=4.0, targets=["c_attn", "c_fc"]))
    factors = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("lora_A", "lora_B"))}
    assert len(factors) == 8
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    ids = hf_ids()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    opt.step()
    for n, b in model.named_buffers():
        if n in factors:
            assert torch.equal(b, factors[n]), n
    assert model.trainable_parameter_count() == 4 * 16


@pytest.mark.parametrize(("method", "options", "message"), [
    ("lora-xs", {"sigma": 1}, "it takes: init_sigma"),
    ("lora-xs", {"init_sigma": -1.0}, "non-negative"),
    ("lora-sb", {"init_update": "adam"}, "init_update must be one of"),
    ("lora-sb", {"init_lr": 0}, "init_lr must be a positive"),
])
def test_bad_options_say_what_is_allowed(method, options, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(method, options=options))


def test_bad_init_and_rank_say_what_is_allowed():
    with pytest.raises(ValueError, match="init must be one of"):
        attach(net(), config("lora-xs", init="pissa"))
    with pytest.raises(ValueError, match="exceeds min"):
        attach(net(), config("lora-xs", r=7))


# --------------------------------------------------------------------------- LoRA-SB's initialisation
@pytest.mark.parametrize("update", ["gradient", "sign"])
def test_lora_sb_calibration_is_the_best_rank_r_approximation_of_the_first_update(update, caplog):
    base = tiny_gpt2()
    reference_model = tiny_gpt2()
    batches = calibration_batches()
    paths = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    lr = 1e-3
    cfg = LoraConfig(method="lora-sb", r=4, alpha=8.0, targets=paths,
                     options={"init_lr": lr, "init_update": update})
    with caplog.at_level(logging.INFO, logger="loraplex"):
        model = attach(base, cfg, calibration_data=batches)
    assert any("lora-sb" in r.message and "calibration batches" in r.message for r in caplog.records)
    grads = mean_weight_gradients(reference_model, batches, paths)
    for path in paths:
        a = model.adapted_layers()[path].adapters["default"]
        first = -lr * (torch.sign(grads[path]) if update == "sign" else grads[path])
        u, s, vh = torch.linalg.svd(first)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        big_a, big_b, big_r = a.lora_A.double(), a.lora_B.double(), a.lora_R.double()
        scale = 8.0 / 4
        tol = 1e-4 * s[0].item()
        torch.testing.assert_close(scale * big_b @ big_r @ big_a, best, rtol=0, atol=tol, msg=path)
        eye = torch.eye(4, dtype=torch.float64)
        torch.testing.assert_close(big_b.t() @ big_b, eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(big_a @ big_a.t(), eye, rtol=0, atol=1e-5)
        torch.testing.assert_close(big_r, torch.diag(torch.diagonal(big_r)), rtol=0, atol=0)
        torch.testing.assert_close(torch.diagonal(big_r) * scale, s[:4], rtol=1e-4, atol=0)
    # the base weights are left frozen and untouched, and the adapter trains only R
    assert not any(p.requires_grad for n, p in model.model.named_parameters() if "adapters" not in n)
    for path in paths:
        torch.testing.assert_close(model.adapted_layers()[path].base_layer.weight,
                                   reference_model.get_submodule(path).weight, rtol=0, atol=0)
    assert model.trainable_parameter_count() == 2 * 16


def test_lora_sb_calibration_is_deterministic_and_starts_at_the_first_update():
    batches = calibration_batches(2)
    cfg = LoraConfig(method="lora-sb", r=3, alpha=3.0, targets=["c_attn"])
    one = attach(tiny_gpt2(), cfg, calibration_data=batches)
    two = attach(tiny_gpt2(), cfg, calibration_data=batches)
    for (n1, t1), (n2, t2) in zip(one.state_dict().items(), two.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    ids = hf_ids()
    with one.disabled():
        base = one(input_ids=ids).logits
    assert not torch.allclose(one(input_ids=ids).logits, base)   # the first update is applied
    with pytest.raises(ValueError, match="no batches"):
        attach(tiny_gpt2(), cfg, calibration_data=[])


def test_lora_sb_without_calibration_is_the_identity():
    model = attach(net(), config("lora-sb"))
    check_starts_as_base(model, x_in(10), rtol=0, atol=0)
