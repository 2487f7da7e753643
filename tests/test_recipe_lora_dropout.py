"""LoRA Dropout (Lin et al. 2024): columns of A and rows of B dropped (entries of ΔW dropped with
probability 2p - p²), rescaled by 1/(1-p)²; and the test-time ensemble over sampled masks."""

from __future__ import annotations

import pytest
import torch
from recipe_opt_util import adapted, batch, run
from torch import nn

from loraplex.core.config import LoraConfig
from loraplex.core.model import attach
from loraplex.training.loop import TrainConfig
from loraplex.training.recipes import make_recipe
from loraplex.training.recipes._factors import generator
from loraplex.training.recipes.lora_dropout import ensemble_probs, masks_on

pytestmark = pytest.mark.usefixtures("one_thread")


def one_layer(p: float):
    torch.manual_seed(0)
    model = attach(nn.Sequential(nn.Linear(40, 30)), LoraConfig(r=4, alpha=8, init="random", targets=["0"]))
    recipe = make_recipe("lora-dropout", {"p": p, "seed": 1})
    recipe.setup(model, TrainConfig())
    return model, recipe


def test_masked_output_is_the_paper_formula():
    p = 0.3
    model, recipe = one_layer(p)
    layer = model.model[0]
    adapter = layer.adapters["default"]
    x = torch.randn(6, 40)
    adapter._lora_dropout.gen = generator(5, "ref")
    with masks_on(recipe.pairs):
        y = model(x)
    g = generator(5, "ref")  # the same draws, in the same order: m_A then m_B
    m_a = (torch.rand(40, generator=g) < 1 - p).double()
    m_b = (torch.rand(30, generator=g) < 1 - p).double()
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    A, B = adapter.lora_A.double(), adapter.lora_B.double()
    delta_w = (m_b[:, None] * B) @ (A * m_a[None, :]) / (1 - p) ** 2
    ref = x.double() @ (W + adapter.scale * delta_w).t() + b
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    # without masks (evaluation): the plain adapter, i.e. the mean of the masked ones
    ref_plain = x.double() @ (W + adapter.scale * B @ A).t() + b
    torch.testing.assert_close(model(x).double(), ref_plain, rtol=1e-5, atol=1e-6)


def test_entries_of_delta_w_drop_with_probability_2p_minus_p2():
    p = 0.2
    model, recipe = one_layer(p)
    adapter = model.model[0].adapters["default"]
    eye = torch.eye(40)
    dropped = []
    with masks_on(recipe.pairs), torch.no_grad():
        for _ in range(300):  # ΔW̃ᵀ row by row: the delta of the identity input
            d = adapter.delta(eye, torch.zeros(40, 30), model.model[0].spec)
            dropped.append((d == 0).float().mean())
    assert abs(torch.stack(dropped).mean().item() - (2 * p - p * p)) < 0.02


def test_masks_change_every_step_and_gradients_flow(tmp_path):
    report = run(tmp_path, recipe="lora-dropout", recipe_options={"p": 0.5})
    assert report["final_loss"] is not None
    recipe = make_recipe("lora-dropout", {"p": 0.5})
    model = adapted(recipe)
    recipe.setup(model, TrainConfig())
    data = batch()
    l0, _ = recipe.loss(model, data, 0)
    l1, _ = recipe.loss(model, data, 1)
    l0b, _ = recipe.loss(model, data, 0)
    assert l0.item() != l1.item() and l0.item() == l0b.item()  # per-step masks, reproducible by step
    l0.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_test_time_ensemble_averages_sampled_models():
    model, recipe = one_layer(0.4)

    class Wrap(nn.Module):  # the ensemble expects an HF-like model: logits from input_ids
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.inner(input_ids.float())})()

    x = torch.randn(3, 2, 40)
    wrapped = Wrap(model)
    wrapped.adapted_layers = model.adapted_layers
    wrapped.active = model.active
    wrapped.configs = model.configs
    probs = ensemble_probs(wrapped, x, n=5, seed=7)
    # reference: 5 masked passes with the per-adapter generator seeded the same way, averaged
    adapter = model.model[0].adapters["default"]
    adapter._lora_dropout.gen = generator(7, recipe.pairs[0].key)
    ref = 0
    with masks_on(recipe.pairs), torch.no_grad():
        for _ in range(5):
            ref = ref + torch.softmax(model(x), dim=-1)
    torch.testing.assert_close(probs, ref / 5)
    with torch.no_grad():
        single = torch.softmax(model(x), dim=-1)
    assert not torch.allclose(probs, single)
    zero = ensemble_probs(wrapped, x, n=3, seed=0, p=0.0)  # p = 0: every member is the plain adapter
    torch.testing.assert_close(zero, single)
    with pytest.raises(ValueError, match="positive integer"):
        ensemble_probs(wrapped, x, n=0)


def test_ensemble_on_the_tiny_language_model():
    recipe = make_recipe("lora-dropout", {"p": 0.3})
    model = adapted(recipe)
    recipe.setup(model, TrainConfig())
    data = batch(2)
    probs = ensemble_probs(model, data["input_ids"], data["attention_mask"], n=3)
    assert probs.shape[:2] == data["input_ids"].shape
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
