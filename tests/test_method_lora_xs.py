"""LoRA-XS and LoRA-SB (`loraplex/methods/lora_xs.py`) against the papers' equations.

References are written here from the papers, in float64, from the adapter's raw tensors:
    LoRA-XS: y = W x + b + s·B R A x, B = U_r, A = Σ_r V_rᵀ from the SVD of W, only R trains.
    LoRA-SB: the same architecture; s·B R A = best rank-r approximation of ΔW₁ = -η·sign(G) (or -η·G),
             G the mean gradient of the base model's loss w.r.t. W over the calibration batches,
             B and Aᵀ with orthonormal columns and R = S_r / s diagonal.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import HF_VOCAB, hf_ids, randomize, tiny_gpt2
from method_checks import assert_rows_match_alone
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraplex
from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer

METHODS = ("lora-xs", "lora-sb")


class Net(nn.Module):
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 6), adapted, then a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 8)
        self.gpt2 = Conv1D(6, 8)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.gpt2(torch.tanh(self.lin(x)))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return randomize(Net()).eval()


def config(method: str, **kw) -> LoraConfig:
    return LoraConfig(**{"method": method, "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def perturb(model, seed: int = 1) -> None:
    """Give every trainable tensor O(1) random values, so the adapter is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def base_weight(layer: AdaptedLayer) -> torch.Tensor:
    w = layer.base_layer.weight.detach().double()
    return w.t() if isinstance(layer.base_layer, Conv1D) else w


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    w, b = base_weight(layer), layer.base_layer.bias.detach().double()
    big_a, big_b, big_r = (t.detach().double() for t in (a.lora_A, a.lora_B, a.lora_R))
    s = a.alpha / a.r
    xd = x.double()
    return xd @ w.t() + b + s * ((xd @ big_a.t()) @ big_r.t()) @ big_b.t()


def x_in(d: int, seed: int = 2, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def _must_not_run(*args, **kwargs):
    raise AssertionError("the SVD of W ran while loading saved tensors")


@pytest.mark.parametrize("method", METHODS)
def test_output_matches_paper_equation(method):
    model = attach(net(), config(method))
    perturb(model)
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
    ids = x_in(10)
    with model.disabled():
        base = model(ids)
    torch.testing.assert_close(model(ids), base, rtol=0, atol=1e-3)              # nearly the identity


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
    perturb(model)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    x = x_in(10)
    unmerged = model(x)
    model.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(method, tmp_path, monkeypatch):
    model = attach(net(), config(method))
    perturb(model)
    x = x_in(10)
    expected = model(x)
    model.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == {"lora-xs": "LORA_XS", "lora-sb": "LORA_SB"}[method]  # PEFT refuses, not misreads
    monkeypatch.setattr("loraplex.methods.lora_xs.xs_factors", _must_not_run)  # loading recomputes no decomposition
    loaded = loraplex.load(net(), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert loaded.trainable_parameter_count() == model.trainable_parameter_count()


@pytest.mark.parametrize("method", METHODS)
def test_save_as_plain_lora_loads_on_the_unmodified_base(method, tmp_path):
    model = attach(net(), config(method))
    perturb(model)
    x = x_in(10)
    expected = model(x)
    model.save(tmp_path, as_lora=True)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 3
    plain = loraplex.load(net(), tmp_path)
    assert {type(a).method for layer in plain.adapted_layers().values() for a in layer.adapters.values()} == {"lora"}
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_equals_each_row_alone(method):
    model = attach(net(), config(method), "a")
    model.add_adapter("b", config(method, r=2))
    perturb(model)                      # only "a" is active, hence trainable
    model.set_active("b")
    perturb(model, seed=5)
    x = x_in(10, rows=5)
    ids = ["a", "b", None, "b", "a"]
    mixed = model(x, adapter_ids=ids)
    assert_rows_match_alone(model, x, ids, mixed, rtol=1e-5, atol=1e-6)


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
def calibration_batches(n: int = 3) -> list[dict]:
    out = []
    for i in range(n):
        ids = hf_ids(batch=2, seq=6, seed=10 + i)
        labels = ids.clone()
        labels[:, :2] = -100                     # prompt positions are not supervised
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def reference_gradients(model: nn.Module, batches: list[dict], paths: list[str]) -> dict[str, torch.Tensor]:
    """Mean over batches of ∂L/∂W on an untouched copy of the base model, (d_out, d_in) layout."""
    weights = [model.get_submodule(p).weight for p in paths]
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, HF_VOCAB), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)
        for total, g in zip(sums, torch.autograd.grad(loss, weights)):
            total += g
    return {p: (s / len(batches)).t().double() for p, s in zip(paths, sums)}  # GPT-2 Conv1D: (in, out)


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
    grads = reference_gradients(reference_model, batches, paths)
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
    x = x_in(10)
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
