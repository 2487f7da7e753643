"""Hydra (`loraplex/methods/hydra.py`) against the paper's equation, in float64:
y₀ = W x + b,  y = y₀ + s B_p A_p x + s B_s A_s y₀  (parallel + sequential LoRA branch), s = alpha / r;
merged: W' = W + s (B_p A_p + B_s A_s W), b' = b + s B_s A_s b.
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
    perturb,
    perturb_both,
    two_layer_net,
    x_in,
)

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 12), adapted, then a plain head."""
    return two_layer_net(10, 8, 12, seed)


def nobias(seed: int = 0) -> TwoLayerNet:
    """Bias-free Linear layers (as in Llama): Hydra is then a plain LoRA of rank 2r after conversion."""
    return two_layer_net(10, 8, 12, seed, linear=True, bias=False)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "hydra", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    ap, bp, as_, bs = (t.detach().double() for t in (a.hydra_par_A, a.hydra_par_B, a.hydra_seq_A, a.hydra_seq_B))
    s = a.alpha / a.r
    xd = x.double()
    bias = layer.base_layer.bias
    y0 = xd @ base_weight(layer).t() + (0.0 if bias is None else bias.detach().double())
    return y0 + s * xd @ ap.t() @ bp.t() + s * y0 @ as_.t() @ bs.t()


def test_output_matches_paper_equation():
    for make in (net, nobias):
        model = attach(make(), config())
        perturb(model, std=0.5)
        for path, layer in model.adapted_layers().items():
            x = torch.randn(4, layer.spec.in_features)
            torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5,
                                       msg=path)


def test_initialisation_is_the_identity():
    model = attach(net(), config())
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        assert torch.count_nonzero(a.hydra_par_B) == 0 and torch.count_nonzero(a.hydra_seq_B) == 0
        assert a.hydra_seq_A.shape == (3, layer.spec.out_features)
    check_starts_as_base(model, x_in(), rtol=0, atol=0)


def test_trainable_parameters_are_r_din_plus_dout_plus_two_r_dout():
    model = attach(net(), config())
    r = 3
    assert model.trainable_parameter_count() == r * (10 + 8) + 2 * r * 8 + r * (8 + 12) + 2 * r * 12
    names = {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()}
    assert names == {"hydra_par_A", "hydra_par_B", "hydra_seq_A", "hydra_seq_B"}


def test_merge_unmerge_restores_weight_and_bias_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model, std=0.5)
    bias = model.model.lin.base_layer.bias.clone()

    def bias_changed() -> None:   # Δb = s B_s A_s b
        assert not torch.equal(model.model.lin.base_layer.bias, bias)

    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6, while_merged=bias_changed)


def test_two_merged_adapters_are_each_computed_from_the_bare_base():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2))
    perturb_both(model, seed_b=7, std=0.5)
    model.set_active(["a", "b"], [1.0, 0.5])
    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config())
    perturb(model, std=0.5)
    check_save_load(model, net, x_in(), tmp_path, peft_type="HYDRA", rtol=0, atol=0)


def test_save_as_plain_lora_of_rank_2r_on_bias_free_layers(tmp_path):
    model = attach(nobias(), config())
    perturb(model, std=0.5)
    _, data = check_save_load(model, nobias, x_in(), tmp_path, as_lora=True, peft_type="LORA", rtol=1e-5, atol=1e-5)
    assert data["r"] == 6


def test_layers_with_a_bias_have_no_plain_lora_form(tmp_path):
    model = attach(net(), config())
    with pytest.raises(TypeError, match="also changes the layer's bias"):
        model.save(tmp_path, as_lora=True)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2))
    perturb_both(model, seed_b=5, std=0.5)
    check_mixed_batch(model, x_in(rows=5), rtol=1e-5, atol=1e-6)


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="does not take option"):
        attach(net(), config(options={"branches": 2}))
