"""MELoRA (`loraplex/methods/melora.py`) against the paper's equation, in float64:
x = [x_1; ...; x_n] (equal slices), y = W x + b + [s B_1 A_1 x_1; ...; s B_n A_n x_n], s = alpha / r,
i.e. ΔW = s block-diag(B_i A_i); every mini-LoRA has rank r, A_i: r x d_in/n, B_i: d_out/n x r.
The reference below loops over the slices (no reshapes, no einsum).
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


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "melora", "r": 2, "options": {"n": 2}, "alpha": 6.0, "targets": ["lin", "gpt2"],
                         **kw})


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    xd = x.double()
    s = a.alpha / a.r
    d_in, d_out = layer.spec.in_features, layer.spec.out_features
    n = a.melora_A.shape[0]
    k, m = d_in // n, d_out // n
    delta = torch.zeros(xd.shape[0], d_out, dtype=torch.float64)
    for i in range(n):
        A = a.melora_A[i].detach().double()
        B = a.melora_B[i].detach().double()
        delta[:, i * m:(i + 1) * m] = s * xd[:, i * k:(i + 1) * k] @ A.t() @ B.t()
    return xd @ base_weight(layer).t() + layer.base_layer.bias.detach().double() + delta


def test_output_matches_paper_equation():
    model = attach(net(), config())
    perturb(model, std=0.5)
    for path, layer in model.adapted_layers().items():
        x = torch.randn(4, layer.spec.in_features)
        torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5, msg=path)


def test_weight_change_is_block_diagonal_of_rank_n_times_r():
    model = attach(net(), config(r=1, options={"n": 2}))
    perturb(model, std=0.5)
    dw = model.model.lin.adapters["default"].delta_weight(model.model.lin.spec)     # 8 x 10, blocks 4 x 5
    assert torch.count_nonzero(dw[:4, 5:]) == 0 and torch.count_nonzero(dw[4:, :5]) == 0
    assert torch.linalg.matrix_rank(dw) == 2


def test_initialisation_is_the_identity():
    model = attach(net(), config())
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        assert torch.count_nonzero(a.melora_B) == 0
        assert a.melora_A.abs().max() <= 1 / (layer.spec.in_features // 2) ** 0.5
    check_starts_as_base(model, x_in(), rtol=0, atol=0)


def test_trainable_parameters_are_r_times_din_plus_dout():
    model = attach(net(), config(r=2, options={"n": 2}))
    assert model.trainable_parameter_count() == 2 * (10 + 8) + 2 * (8 + 12)
    model = attach(net(), config(r=1, options={"n": 4}, targets=["gpt2"]))     # 8 -> 12: 4 minis of 2 -> 3
    assert model.trainable_parameter_count() == 4 * (1 * 2 + 3 * 1)
    assert {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()} == {"melora_A", "melora_B"}


def test_merge_unmerge_restores_the_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model, std=0.5)
    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config())
    perturb(model, std=0.5)
    check_save_load(model, net, x_in(), tmp_path, peft_type="MELORA", rtol=0, atol=0)


def test_save_as_plain_lora_of_rank_n_times_r_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model, std=0.5)
    _, data = check_save_load(model, net, x_in(), tmp_path, as_lora=True, peft_type="LORA", rtol=1e-5, atol=1e-5)
    assert data["r"] == 4


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=1, options={"n": 1}))
    perturb_both(model, seed_b=5, std=0.5)
    check_mixed_batch(model, x_in(rows=5), rtol=1e-5, atol=1e-6)


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="it takes: n"):
        attach(net(), config(options={"minis": 2}))
    with pytest.raises(ValueError, match="n=3 must divide both d_in=10 and d_out=8"):
        attach(net(), config(options={"n": 3}))
    with pytest.raises(ValueError, match="positive integer"):
        attach(net(), config(options={"n": 0}))
