"""GOAT: the SVD-segment init, the derived scale and the residual, and the routed mixture's output,
against a reference written here from the paper (an explicit loop over experts, float64); the parameter
count, the load-balancing loss, refusing to merge, deleting, files, and mixed batches.

PEFT 0.21 has no GOAT, so there is no parity test; files say peft_type "GOAT" and PEFT refuses them.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same_snapshot, hf_ids, snapshot, tiny_llama
from method_checks import check_mixed_batch, check_save_load, out_in, randomize_adapters
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraplex
from loraplex import LoraConfig
from loraplex.core.io import config_from_peft

torch.set_num_threads(1)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(9, 8)
        self.conv = Conv1D(10, 8)   # GPT-2 layout: weight (in=8, out=10)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.5)

    def forward(self, x):
        return self.conv(torch.tanh(self.lin(x)))


def randomize(model) -> None:
    """Move every lora_* tensor (experts and router) away from its init."""
    randomize_adapters(model, std=0.5, names=("lora_",))


def reference_layer(x, w_res, bias, a, b, router, scale, experts, top_k):
    """y = W_res x + b + s Σ_{e ∈ top-k} (g_e / Σ_top g) B_e A_e x, g = softmax(R x); one expert at a time."""
    x, a, b, router = x.double(), a.double(), b.double(), router.double()
    r_e = a.shape[0] // experts
    probs = torch.softmax(x @ router.t(), dim=-1)
    top, idx = probs.topk(top_k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    y = x @ w_res.t() + bias
    for e in range(experts):
        weight = (top * (idx == e)).sum(-1, keepdim=True)          # 0 where e is not chosen
        a_e, b_e = a[e * r_e:(e + 1) * r_e], b[:, e * r_e:(e + 1) * r_e]
        y = y + weight * scale * (x @ a_e.t()) @ b_e.t()
    return y


@pytest.mark.parametrize("experts, top_k, r, eta, init_cof", [(2, 1, 4, 1.0, None), (4, 2, 4, 0.5, 0.3)])
def test_init_and_output_match_the_paper(experts, top_k, r, eta, init_cof):
    model = Mlp()
    originals = {n: (out_in(getattr(model, n)), getattr(model, n).bias.detach().double()) for n in ("lin", "conv")}
    rho = 10.0
    options = {"experts": experts, "top_k": top_k, "eta": eta}
    if init_cof is not None:
        options["init_cof"] = init_cof
    pm = loraplex.attach(model, LoraConfig(method="goat", r=r, alpha=16, targets=["lin", "conv"], options=options))
    r_e, cof = r // experts, (1 / experts if init_cof is None else init_cof)
    for name, (w, _) in originals.items():
        layer = getattr(pm.model, name)
        ad = layer.adapters["default"]
        d_in = w.shape[1]
        scale = math.sqrt(3 * eta * d_in / r_e)
        assert ad.scale == pytest.approx(scale)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        segment = min(w.shape) // experts
        total = torch.zeros_like(w)
        for e in range(experts):
            i = slice(e * segment, e * segment + r_e)
            part = u[:, i] @ torch.diag(s[i]) @ vh[i] / rho                 # s B_e A_e = U_I S_I V_Iᵀ / ρ
            a_e, b_e = ad.lora_A[e * r_e:(e + 1) * r_e].double(), ad.lora_B[:, e * r_e:(e + 1) * r_e].double()
            torch.testing.assert_close(scale * b_e @ a_e, part, rtol=0, atol=1e-5)
            torch.testing.assert_close(a_e @ a_e.t(), torch.diag(s[i] / (scale * rho)), rtol=1e-4, atol=1e-7)
            total = total + part
        torch.testing.assert_close(out_in(layer.base_layer), w - cof * total, rtol=0, atol=1e-5)
    randomize(pm)
    h = torch.randn(3, 4, 9, generator=torch.Generator().manual_seed(2)).double()
    for name in ("lin", "conv"):
        w, bias = originals[name]
        layer = getattr(pm.model, name)
        ad = layer.adapters["default"]
        w_res = out_in(layer.base_layer)   # checked against the paper above
        ref = reference_layer(h, w_res, bias, ad.lora_A.detach(), ad.lora_B.detach(), ad.lora_gating.detach(),
                              ad.scale, experts, top_k)
        torch.testing.assert_close(layer(h.float()).double(), ref, rtol=1e-5, atol=1e-5)
        h = torch.tanh(ref)


def test_trainable_parameters_are_experts_plus_router():
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="goat", r=4, options={"experts": 2, "top_k": 1}))
    layers = pm.adapted_layers("default")
    expected = sum(4 * (ly.spec.in_features + ly.spec.out_features) + 2 * ly.spec.in_features for ly in layers.values())
    assert pm.trainable_parameter_count() == expected
    assert {n.rsplit(".", 1)[-1] for n in pm.named_trainable_parameters()} == {"lora_A", "lora_B", "lora_gating"}


def test_load_balancing_loss_follows_the_formula_and_trains_the_router():
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="goat", r=4, targets=["q_proj"],
                                                  options={"experts": 4, "top_k": 2, "aux_loss_coef": 0.5}))
    randomize(pm)
    captured = {}
    layer = pm.model.model.layers[0].self_attn.q_proj
    layer.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].detach()))
    pm.train()
    pm(hf_ids())
    ad = layer.adapters["default"]
    x = captured["x"].reshape(-1, 16).double()
    probs = torch.softmax(x @ ad.lora_gating.double().t(), -1)
    idx = probs.topk(2, -1).indices
    share = torch.stack([(idx == e).sum() for e in range(4)]).double() / x.shape[0]
    torch.testing.assert_close(ad.last_aux_loss.double(), 4 * (share * probs.mean(0)).sum(), rtol=1e-5, atol=1e-7)
    total = type(ad).aux_loss(pm, "default")
    assert total.item() == pytest.approx(0.5 * (ad.last_aux_loss + pm.model.model.layers[1].self_attn.q_proj
                                                .adapters["default"].last_aux_loss).item())
    total.backward()
    assert ad.lora_gating.grad is not None and ad.lora_gating.grad.abs().sum() > 0


def test_merge_is_refused_and_nothing_changes():
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="goat", r=4, options={"experts": 2}))
    before = snapshot(pm)
    with pytest.raises(TypeError, match="not mergeable"):
        pm.merge()
    assert_same_snapshot(before, snapshot(pm))
    with pytest.raises(TypeError, match="cannot be expressed as a plain LoRA"):
        pm.save("/nonexistent-unused", as_lora=True)


def test_delete_restores_the_weights():
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pm = loraplex.attach(model, LoraConfig(method="goat", r=4, options={"experts": 2}))
    pm.delete_adapter("default")
    for k, v in original.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)


def test_save_load_round_trip_is_identical(tmp_path):
    x = hf_ids()
    config = LoraConfig(method="goat", r=4, dropout=0.1, options={"experts": 2, "top_k": 1, "rho": 5.0})
    pm = loraplex.attach(tiny_llama(), config)
    randomize(pm)
    pm.eval()
    # eval_loaded: new adapters start in training mode (dropout)
    _, data = check_save_load(pm, tiny_llama, x, tmp_path, peft_type="GOAT", rtol=0, atol=1e-6, eval_loaded=True,
                              logits=True)
    assert data["num_experts"] == 2 and data["top_k"] == 1
    # the GOAT fields alone (no "loraplex" key) give back the same config
    data.pop("loraplex")
    again = config_from_peft(data, "adapter_config.json")
    assert again.options == {"experts": 2, "top_k": 1, "init_cof": None, "eta": 1.0, "rho": 5.0,
                             "aux_loss_coef": 1e-3} and again.r == 4 and again.dropout == 0.1


def test_mixed_batch_equals_each_row_alone():
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="goat", r=4, targets=["q_proj", "o_proj"],
                                                  options={"experts": 2, "top_k": 1}), "a")
    pm.add_adapter("b", LoraConfig(method="goat", r=4, targets=["up_proj"], options={"experts": 4}))
    randomize(pm)
    ids = ["a", "b", None, "a", "b"]
    check_mixed_batch(pm, hf_ids(batch=len(ids)), ids, rtol=2e-5, atol=2e-5, logits=True, no_grad=True)


@pytest.mark.parametrize("r, options, message", [
    (6, {"experts": 4}, "r=6 is not a multiple of experts=4"),
    (4, {"experts": 2, "top_k": 3}, r"top_k=3 is not allowed; top_k must be an integer in \[1, experts=2\]"),
    (16, {"experts": 2}, "segment of 4"),
    (4, {"expert": 2}, "no option.*'expert'"),
])
def test_bad_settings_say_what_is_allowed(r, options, message):
    with pytest.raises(ValueError, match=message):
        loraplex.attach(tiny_llama(), LoraConfig(method="goat", r=r, targets=["k_proj"], options=options))
