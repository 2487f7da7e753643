"""BoRA (`loraplex/methods/bora.py`) against the paper's equations, in float64 (W is d_out x d_in):
V = W + s B A,  W₁ = m_out ⊙ V / ‖V‖_row,  W' = W₁ ⊙ m_in / ‖W₁‖_col,  y = W' x + b,
with A, B, m_out (d_out) and m_in (d_in) trainable, m_out = ‖W‖_row and m_in = ‖W‖_col at init.
"""

from __future__ import annotations

import pytest
import torch
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    check_starts_as_base,
    perturb_both,
    two_layer_net,
    x_in,
)

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 12), adapted, then a plain head."""
    return two_layer_net(10, 8, 12, seed)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "bora", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def perturb(model, seed: int = 1) -> None:
    """O(1) random A and B (B starts at zero); magnitudes scaled by factors in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_trainable_parameters().items():
            if "magnitude" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def adapted(layer: AdaptedLayer, name: str) -> torch.Tensor:
    a = layer.adapters[name]
    A, B = a.lora_A.detach().double(), a.lora_B.detach().double()
    m_out, m_in = a.magnitude_out.detach().double(), a.magnitude_in.detach().double()
    v = base_weight(layer) + (a.alpha / a.r) * B @ A
    w1 = torch.diag(m_out / torch.linalg.vector_norm(v, dim=1)) @ v          # each row rescaled
    return w1 @ torch.diag(m_in / torch.linalg.vector_norm(w1, dim=0))      # each column rescaled


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ adapted(layer, name).t() + layer.base_layer.bias.detach().double()


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model)
    for path, layer in model.adapted_layers().items():
        x = torch.randn(4, layer.spec.in_features)
        torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5, msg=path)
        w = adapted(layer, "default")    # both magnitudes hold: columns exactly, rows up to the column step
        torch.testing.assert_close(w.norm(dim=0), layer.adapters["default"].magnitude_in.detach().double())


def test_initialisation_is_the_identity_with_the_base_norms():
    model = attach(net(), config())
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        w = base_weight(layer).float()
        torch.testing.assert_close(a.magnitude_out.detach(), w.norm(dim=1))
        torch.testing.assert_close(a.magnitude_in.detach(), w.norm(dim=0))
        assert torch.count_nonzero(a.lora_B) == 0
    check_starts_as_base(model, x_in(), rtol=1e-6, atol=1e-6)


def test_trainable_parameters_are_lora_plus_both_magnitudes():
    model = attach(net(), config())
    r = 3
    assert model.trainable_parameter_count() == r * (10 + 8) + 10 + 8 + r * (8 + 12) + 8 + 12
    names = {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()}
    assert names == {"lora_A", "lora_B", "magnitude_out", "magnitude_in"}
    perturb(model)
    model(x_in()).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


def test_merge_unmerge_restores_the_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model)
    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_two_merged_adapters_are_each_computed_from_the_bare_base():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2))
    perturb_both(model, seed_b=7, using=perturb)
    model.set_active(["a", "b"], [1.0, 0.5])
    x = x_in()
    together = model(x)
    model.merge()
    torch.testing.assert_close(model(x), together, rtol=1e-5, atol=1e-5)
    model.unmerge()
    torch.testing.assert_close(model(x), together, rtol=1e-5, atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config())
    perturb(model)
    check_save_load(model, net, x_in(), tmp_path, peft_type="BORA", rtol=0, atol=0)


def test_no_plain_lora_form(tmp_path):
    model = attach(net(), config())
    with pytest.raises(TypeError, match="cannot be expressed as a plain LoRA"):
        model.save(tmp_path, as_lora=True)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2))
    perturb_both(model, seed_b=5, using=perturb)
    check_mixed_batch(model, x_in(rows=5), rtol=1e-5, atol=1e-6)


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="does not take option"):
        attach(net(), config(options={"order": "rows"}))
