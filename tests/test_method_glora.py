"""GLoRA (`loraplex/methods/glora.py`) against the paper's equation (PEFT's form), in float64:
W' = W + W ⊙ A + B,  b' = b + b ⊙ D + E + W C,  y = W' x + b',
each part low-rank (X_d X_u), a vector, a scalar or zero as the options choose; and parity with
Hugging Face PEFT's GLoRA (peft_type "GLORA") both ways.
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
    seeded_model,
    two_layer_net,
    x_in,
)
from torch import nn

import loraplex
from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer

STRUCTURES = [("lora", "lora", "constant"), ("vector", "vector", "vector"), ("constant", "none", "none"),
              ("none", "lora", "vector")]


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (10 -> 8) and a GPT-2 Conv1D (8 -> 12), adapted, then a plain head."""
    return two_layer_net(10, 8, 12, seed)


class Plain(nn.Module):
    """nn.Linear layers only (PEFT's GLoRA adapts nothing else): one with a bias, one without."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(10, 8)
        self.nob = nn.Linear(8, 12, bias=False)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.nob(torch.tanh(self.lin(x)))))


def plain(seed: int = 0) -> Plain:
    return seeded_model(Plain, seed)


def structure(ab: str, c: str, de: str) -> dict:
    return {"config_A_B": ab, "config_C": c, "config_D_E": de}


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "glora", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def part(p) -> torch.Tensor | float:
    """A, ..., E in float64 from the raw tensors, written out per structure."""
    if p.kind == "lora":
        return p.Xd.detach().double() @ p.Xu.detach().double()
    if p.kind == "vector":
        return p.X.detach().double()
    if p.kind == "constant":
        return p.X.detach().double().item()
    return 0.0


def reference(layer: AdaptedLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    a = layer.adapters[name]
    w = base_weight(layer)
    A, B, C, D, E = (part(getattr(a, f"glora_{k}")) for k in "ABCDE")
    w_adapted = w + w * A + B
    y = x.double() @ w_adapted.t()
    if layer.base_layer.bias is None:
        return y
    b = layer.base_layer.bias.detach().double()
    wc = (w @ C).squeeze(-1) if isinstance(C, torch.Tensor) else 0.0
    return y + b + b * D + E + wc


def expected_count(ab: str, c: str, de: str, d_in: int, d_out: int, bias: bool, r: int = 3) -> int:
    n = {"lora": 2 * r * (d_out + d_in), "vector": 2 * d_out, "constant": 2, "none": 0}[ab]
    if bias:
        n += {"lora": r * (d_in + 1), "vector": d_in, "none": 0}[c]
        n += {"vector": 2 * d_out, "constant": 2, "none": 0}[de]
    return n


@pytest.mark.parametrize("parts", STRUCTURES)
def test_output_matches_paper_equation(parts):
    for make in (net, plain):
        model = attach(make(), config(options=structure(*parts), targets=["lin", "gpt2", "nob"]))
        perturb(model, std=0.5)
        for path, layer in model.adapted_layers().items():
            x = torch.randn(4, layer.spec.in_features)
            torch.testing.assert_close(layer(x).double(), reference(layer, "default", x), rtol=1e-5, atol=1e-5,
                                       msg=f"{path} {parts}")


@pytest.mark.parametrize("parts", STRUCTURES)
def test_trainable_parameters_follow_the_chosen_structure(parts):
    model = attach(plain(), config(options=structure(*parts), targets=["lin", "nob"]))
    assert model.trainable_parameter_count() == (expected_count(*parts, 10, 8, True)
                                                 + expected_count(*parts, 8, 12, False))


def test_default_structure_and_identity_at_init():
    model = attach(net(), config())
    a = model.model.lin.adapters["default"]
    assert (a.glora_A.kind, a.glora_C.kind, a.glora_D.kind) == ("lora", "lora", "constant")
    check_starts_as_base(model, x_in(), rtol=0, atol=0)
    assert model.trainable_parameter_count() == expected_count("lora", "lora", "constant", 10, 8, True) \
        + expected_count("lora", "lora", "constant", 8, 12, True)


@pytest.mark.parametrize("parts", STRUCTURES[:2])
def test_merge_unmerge_restores_weight_and_bias_and_merged_equals_unmerged(parts):
    model = attach(net(), config(options=structure(*parts)))
    perturb(model, std=0.5)
    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_two_merged_adapters_are_each_computed_from_the_bare_base():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2, options=structure("vector", "vector", "vector")))
    perturb_both(model, seed_b=7, std=0.5)
    model.set_active(["a", "b"], [1.0, 0.5])
    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config(options=structure("vector", "lora", "vector")))
    perturb(model, std=0.5)
    check_save_load(model, net, x_in(), tmp_path, peft_type="GLORA", rtol=0, atol=0)


def test_no_plain_lora_form(tmp_path):
    with pytest.raises(TypeError, match="cannot be expressed as a plain LoRA"):
        attach(net(), config()).save(tmp_path, as_lora=True)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2, options=structure("constant", "vector", "vector")))
    perturb_both(model, seed_b=5, std=0.5)
    check_mixed_batch(model, x_in(rows=5), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- parity with PEFT
@pytest.mark.parametrize("parts", STRUCTURES)
def test_an_adapter_saved_by_peft_loads_with_identical_outputs(tmp_path, parts):
    from peft import GloraConfig, get_peft_model

    ab, c, de = parts
    peft_model = get_peft_model(plain(), GloraConfig(r=3, target_modules=["lin", "nob"], config_A_B=ab,
                                                      config_C=c, config_D_E=de, init_weights=False)).eval()
    x = x_in()
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    ours = loraplex.load(plain(), tmp_path)
    assert ours.configs["default"].method == "glora"
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
    assert ours.trainable_parameter_count() == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("parts", STRUCTURES)
def test_ours_loads_in_peft_with_identical_outputs(tmp_path, parts):
    import warnings

    from peft import PeftModel

    model = attach(plain(), config(options=structure(*parts), targets=["lin", "nob"]))
    perturb(model, std=0.5)
    x = x_in()
    expected = model(x)
    model.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT notes that it ignores our "loraplex" config key
        peft_model = PeftModel.from_pretrained(plain(), tmp_path).eval()
    torch.testing.assert_close(peft_model(x), expected, rtol=1e-5, atol=1e-6)


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="it takes: config_A_B, config_C, config_D_E"):
        attach(net(), config(options={"config_A": "lora"}))
    with pytest.raises(ValueError, match="config_D_E must be one of"):
        attach(net(), config(options={"config_D_E": "lora"}))
