"""LoRA-FA (Zhang et al. 2023): A never updates, and adapted layers keep A x (N x r), not x (N x d_in),
for the backward pass. Saved tensors are measured with torch.autograd.graph.saved_tensors_hooks."""

from __future__ import annotations

import pytest
import torch
from recipe_opt_util import adapted, batch, initial_adapter, run, saved_adapter
from torch import nn

from loraplex.core.config import LoraConfig
from loraplex.core.model import attach
from loraplex.training.recipes import make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def saved_activations(model, fn) -> list[torch.Tensor]:
    """Tensors autograd saves for backward while `fn` runs, parameters excluded (activations only)."""
    params = {p.data_ptr() for p in model.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def one_layer(recipe: str | None):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 48))
    model = attach(layer, LoraConfig(r=4, alpha=8, init="random", targets=["0"]))
    if recipe:
        make_recipe(recipe).setup(model, None)
    model.train()
    return model


def test_one_layer_stores_only_the_r_dimensional_projection():
    n, d_in, r = 10, 64, 4
    x = torch.randn(n, d_in, requires_grad=True)
    plain = one_layer(None)
    plain_saved, _ = saved_activations(plain, lambda: plain(x))
    model = one_layer("lora-fa")
    fa_saved, _ = saved_activations(model, lambda: model(x))
    assert sum(t.numel() for t in plain_saved) == n * d_in + n * r     # x and x Aᵀ
    assert sum(t.numel() for t in fa_saved) == n * r                    # x Aᵀ only
    assert not any(t.shape[-1] == d_in for t in fa_saved)


def test_gradients_match_the_paper_and_a_gets_none():
    model = one_layer("lora-fa")
    adapter = model.adapted_layers()["0"].adapters["default"]
    base = model.model[0].base_layer
    x = torch.randn(3, 5, 64, dtype=torch.float32, requires_grad=True)
    g = torch.randn(3, 5, 48)
    (model(x) * g).sum().backward()
    # reference in float64: y = W x + b + s B A x
    W, b, A, B = (t.detach().double() for t in (base.weight, base.bias, adapter.lora_A, adapter.lora_B))
    s = adapter.scale
    xd, gd = x.detach().double().reshape(-1, 64), g.double().reshape(-1, 48)
    grad_b = s * gd.t() @ (xd @ A.t())
    grad_x = gd @ W + s * (gd @ B) @ A
    assert adapter.lora_A.grad is None and not adapter.lora_A.requires_grad
    torch.testing.assert_close(adapter.lora_B.grad.double(), grad_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double().reshape(-1, 64), grad_x, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y = model(x).double().reshape(-1, 48)
    torch.testing.assert_close(y, xd @ W.t() + b + s * (xd @ A.t()) @ B.t(), rtol=1e-5, atol=1e-6)


def test_whole_model_saves_less_activation_memory_than_plain_lora():
    data = batch()

    def measure(recipe):
        model = adapted()
        if recipe:
            make_recipe(recipe).setup(model, None)
        model.train()
        saved, out = saved_activations(model, lambda: model(input_ids=data["input_ids"],
                                                            attention_mask=data["attention_mask"]).logits.sum())
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        return sum(storages.values()), model

    plain, _ = measure(None)
    fa, model = measure("lora-fa")
    # The adapted layers' inputs are no longer kept: per block the q/k/v input and the gate/up input
    # (hidden = 32 floats a token each) and the down_proj input (intermediate = 64). The o_proj input, the
    # attention output, stays: attention's own backward keeps it.
    tokens, hidden, inter, layers = data["input_ids"].numel(), 32, 64, 2
    assert plain - fa == tokens * layers * (2 * hidden + inter) * 4


def test_a_never_updates_in_training(tmp_path):
    start = initial_adapter(tmp_path, recipe="lora-fa")
    run(tmp_path, recipe="lora-fa", lr=5e-2)
    end = saved_adapter(tmp_path)
    a_keys = [k for k in end if "lora_A" in k]
    b_keys = [k for k in end if "lora_B" in k]
    assert a_keys and b_keys
    for k in a_keys:
        assert torch.equal(start[k], end[k]), k
    assert any(not torch.equal(start[k], end[k]) for k in b_keys)
