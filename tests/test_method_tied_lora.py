"""Tied-LoRA (`loraplex/methods/tied_lora.py`) against the paper's equation.

Reference, written here from the paper in float64 from the raw tensors:
    y = W x + b + s Λ_v B Λ_u A x,  s = alpha / r,  A (r x d_in), B (d_out x r) one pair per tying group
    (layers of one module name and shape), u ∈ R^r and v ∈ R^d_out per layer.
PEFT has no Tied-LoRA, so there is no parity test; files are our own (peft_type "TIED_LORA").
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2
from method_checks import (
    BlockNet,
    check_gpt2_trains_and_merges,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    make_net,
    reference_with_deltas,
    x_seq,
)
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraplex import LoraConfig, attach

TARGETS = ["q", "k", "up", "down"]
R = 4


class Block(nn.Module):
    """q and k share a shape (8->8) but not a name; up is 8->16, down a GPT-2 Conv1D 16->8."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.up = nn.Linear(8, 16)
        self.down = Conv1D(8, 16)

    def forward(self, x):
        h = torch.tanh(self.q(x)) * torch.tanh(self.k(x))
        return x + self.down(torch.tanh(self.up(h)))


def net(seed: int = 0) -> BlockNet:
    """Three of these blocks, then a plain head."""
    return make_net(seed, blocks=3, block=Block)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "tied-lora", "r": R, "alpha": 6.0, "targets": TARGETS, **kw})


def perturb(model, seed: int = 1) -> None:
    """Random values in every factor, trained or frozen (frozen ones are buffers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = [*model.shared_tensors.parameters(), *model.shared_tensors.buffers()]
        for layer in model.adapted_layers().values():
            for a in layer.adapters.values():
                tensors += [a.tied_lora_u, a.tied_lora_v]
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g) / 2)


def deltas_of(model, name: str = "default", alpha: float = 6.0) -> dict[str, torch.Tensor]:
    """ΔW[o, i] = s v_o Σ_k B[o, k] u_k A[k, i], A and B looked up by the layer's module name and shape."""
    pairs = model.shared_tensors[name].pairs
    out = {}
    for path, layer in model.adapted_layers(name).items():
        ad = layer.adapters[name]
        group = f"{path.rsplit('.', 1)[-1]}_{layer.spec.out_features}x{layer.spec.in_features}"
        a, b = pairs[group].lora_A.detach().double(), pairs[group].lora_B.detach().double()
        out[path] = (alpha / R) * torch.einsum("o,ok,k,ki->oi", ad.tied_lora_v.detach().double(), b,
                                               ad.tied_lora_u.detach().double(), a)
    return out


@pytest.mark.parametrize("train", ["vBuA", "BA", "vu", "vBu"])
def test_output_matches_paper_equation(train):
    base = net()
    model = attach(copy.deepcopy(base), config(options={"train": train}))
    perturb(model)
    x = x_seq()
    ref = reference_with_deltas(base, x, deltas_of(model))
    torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_layers_of_one_name_share_one_pair_and_different_names_do_not():
    model = attach(net(), config())
    layers = model.adapted_layers()
    q0, q2 = layers["blocks.0.q"].adapters["default"], layers["blocks.2.q"].adapters["default"]
    k0 = layers["blocks.0.k"].adapters["default"]
    assert q0.factors()[0] is q2.factors()[0] and q0.factors()[1] is q2.factors()[1]
    assert q0.factors()[0] is not k0.factors()[0]
    assert sorted(model.shared_tensors["default"].pairs) == ["down_8x16", "k_8x8", "q_8x8", "up_16x8"]
    by_shape = attach(net(), config(options={"tie": "shape"}))
    assert sorted(by_shape.shared_tensors["default"].pairs) == ["16x8", "8x16", "8x8"]


# Trainable count: tied pairs r (d_in + d_out) per group once; u (r) and v (d_out) per layer.
PAIRS = {"q": (8, 8), "k": (8, 8), "up": (8, 16), "down": (16, 8)}   # name: (d_in, d_out)


def expected_count(train: str, tie: str = "name", blocks: int = 3) -> int:
    groups = set(PAIRS.values()) if tie == "shape" else list(PAIRS.values())
    tied = sum(("A" in train) * R * d_in + ("B" in train) * R * d_out for d_in, d_out in groups)
    per_layer = blocks * sum(("u" in train) * R + ("v" in train) * d_out for _, d_out in PAIRS.values())
    return tied + per_layer


@pytest.mark.parametrize(("train", "tie"), [("vBuA", "name"), ("BA", "name"), ("vu", "name"), ("uA", "name"),
                                            ("vBuA", "shape")])
def test_trainable_parameters_follow_selective_training(tmp_path, train, tie):
    model = attach(net(), config(options={"train": train, "tie": tie}))
    assert model.trainable_parameter_count() == expected_count(train, tie)
    model.set_active("default")   # frozen factors (buffers) stay frozen when the flags are reset
    assert model.trainable_parameter_count() == expected_count(train, tie)
    names = list(model.named_trainable_parameters())
    shared_names = [n for n in names if n.startswith("shared_tensors.")]
    n_groups = 3 if tie == "shape" else 4
    assert len(shared_names) == n_groups * (("A" in train) + ("B" in train))   # each tied tensor once
    model.save(tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    tied = [k for k in keys if k.startswith("base_model.tied_lora.")]
    assert len(tied) == len(set(tied)) == 2 * n_groups                      # frozen ones are saved too
    assert len(keys) == len(tied) + 2 * 4 * 3


@pytest.mark.parametrize("train", ["vBuA", "BA", "vu", "uA", "A"])
def test_starts_as_identity_with_a_gradient(train):
    base = net()
    model = attach(copy.deepcopy(base), config(options={"train": train}))
    x = x_seq()
    out = model(x)
    torch.testing.assert_close(out, base(x), rtol=0, atol=0)
    out.square().sum().backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model)
    check_merge_unmerge(model, x_seq(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


@pytest.mark.parametrize("train", ["vBuA", "vu"])
def test_save_and_load_round_trip(tmp_path, train):
    model = attach(net(), config(options={"train": train}))
    perturb(model)
    loaded, _ = check_save_load(model, net, x_seq(), tmp_path, peft_type="TIED_LORA", rtol=0, atol=0)
    assert loaded.trainable_parameter_count() == model.trainable_parameter_count()


def test_save_as_plain_lora_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model)
    check_save_load(model, net, x_seq(), tmp_path, as_lora=True, rtol=1e-5, atol=1e-5)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(init="random"), name="a")
    model.add_adapter("b", config(init="random", options={"train": "vu"}))
    check_mixed_batch(model, x_seq(rows=5), rtol=1e-6, atol=1e-6)


def test_gpt2_trains_and_merges():
    model = attach(tiny_gpt2(), LoraConfig(method="tied-lora", r=4, targets=["c_attn", "c_proj", "c_fc"]))
    perturb(model)
    check_gpt2_trains_and_merges(model, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kw", "message"), [
    ({"options": {"train": "xy"}}, "train must name a non-empty subset"),
    ({"options": {"train": ""}}, "train must name a non-empty subset"),
    ({"options": {"tie": "layer"}}, "tie must be"),
    ({"options": {"shared": 1}}, "does not take option"),
    ({"init": "gaussian"}, "init must be one of"),
    ({"rank_pattern": {"q": 2}}, "rank_pattern"),
])
def test_bad_settings_say_what_is_allowed(kw, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(**kw))
