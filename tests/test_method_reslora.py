"""ResLoRA (`loraplex/methods/reslora.py`) against the paper's equations, in float64.

A stack of three blocks, each with a Linear `fc` and a GPT-2 Conv1D `proj` (8 -> 8): two chains,
`blocks.*.fc` and `blocks.*.proj`, linked block to block. The reference recomputes the whole
network from the raw tensors:
  "is", training:  fc_n(x_n) = W x_n + b + s B_n A_n (x_n + x_{n-1})   (x_{n-1} = x_n in block 0)
  "is", inference: fc_n(x_n) = W x_n + b + (1 + α_n) s B_n A_n x_n,  α_n = mean‖x_{n-1}‖ / mean‖x_n‖ over
                   the recorded training inputs (α = 1 in block 0)
  "bs":            fc_n(x_n) = W x_n + b + Σ_{k=0..pre_num} s B_{n-k} A_{n-k} x_n
"""

from __future__ import annotations

import json

import pytest
import torch
from method_checks import (
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    perturb,
    perturb_both,
    seeded_model,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraplex
from loraplex import LoraConfig, attach

LAYERS = ("fc", "proj")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.proj = Conv1D(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.proj(torch.tanh(self.fc(h))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(10, 8)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def net(seed: int = 0) -> Net:
    return seeded_model(Net, seed, std=0.3)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "reslora", "r": 2, "alpha": 4.0, "targets": ["fc", "proj"], **kw})


def x_in(seed: int = 2, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, 3, 10, generator=torch.Generator().manual_seed(seed))


def raw(model, name: str = "default") -> dict:
    """Per (block, layer): W, b, A, B, s in float64, and the mean recorded input norm."""
    out = {}
    for n, block in enumerate(model.model.blocks):
        for kind in LAYERS:
            layer = getattr(block, kind)
            a = layer.adapters[name]
            w = layer.base_layer.weight.detach().double()
            n_rec = int(min(a.reslora_input_count, a.reslora_input_norms.numel())) if a.variant == "is" else 0
            out[n, kind] = {"W": w.t() if kind == "proj" else w, "b": layer.base_layer.bias.detach().double(),
                            "A": a.lora_A.detach().double(), "B": a.lora_B.detach().double(), "s": a.alpha / a.r,
                            "norm": a.reslora_input_norms[:n_rec].double().mean() if n_rec else None}
    return out


def reference(model, x: torch.Tensor, mode: str, pre_num: int = 1, name: str = "default"):
    """Network output and each adapted layer's input norm ‖x_n‖_F, in float64."""
    p = raw(model, name)
    inp = model.model.inp
    h = x.double() @ inp.weight.detach().double().t() + inp.bias.detach().double()
    prev_input = {}
    norms = {}

    def layer(n: int, kind: str, v: torch.Tensor) -> torch.Tensor:
        q = p[n, kind]
        y = v @ q["W"].t() + q["b"]
        norms[n, kind] = v.norm()
        if mode == "train":
            shortcut = v + (prev_input[kind] if n > 0 else v)
            y = y + q["s"] * shortcut @ q["A"].t() @ q["B"].t()
        elif mode == "eval":
            alpha = 1.0
            if n > 0 and q["norm"] is not None and p[n - 1, kind]["norm"] is not None:
                alpha = float(p[n - 1, kind]["norm"] / q["norm"])
            y = y + (1 + alpha) * q["s"] * v @ q["A"].t() @ q["B"].t()
        else:  # "bs"
            for k in range(0, min(n, pre_num) + 1):
                o = p[n - k, kind]
                y = y + o["s"] * v @ o["A"].t() @ o["B"].t()
        prev_input[kind] = v
        return y

    for n in range(len(model.model.blocks)):
        h = h + torch.tanh(layer(n, "proj", torch.tanh(layer(n, "fc", h))))
    head = model.model.head
    return h @ head.weight.detach().double().t() + head.bias.detach().double(), norms


def trained_a_little(model, steps: int = 3) -> None:
    """Training-mode forwards (recording input norms) on several inputs, then back to eval mode."""
    model.train()
    for i in range(steps):
        model(x_in(seed=10 + i) * (1 + i))
    model.eval()


def test_chains_link_same_type_layers_block_to_block():
    model = attach(net(), config(targets=["inp", "fc", "proj"]))
    links = model.shared_tensors["default"]
    assert links.previous == {"inp": None, "blocks.0.fc": None, "blocks.0.proj": None,
                              "blocks.1.fc": "blocks.0.fc", "blocks.1.proj": "blocks.0.proj",
                              "blocks.2.fc": "blocks.1.fc", "blocks.2.proj": "blocks.1.proj"}


def test_training_forward_matches_the_input_shortcut_equation():
    model = attach(net(), config())
    perturb(model, std=0.5)
    model.train()
    x = x_in()
    out = model(x)
    ref, norms = reference(model, x, "train")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for (n, kind), norm in norms.items():    # each layer recorded ‖x_n‖_F of this pass
        recorded = getattr(model.model.blocks[n], kind).adapters["default"].reslora_input_norms[0]
        torch.testing.assert_close(recorded.double(), norm, rtol=1e-5, atol=1e-6)
    assert not model.shared_tensors["default"].inputs     # every kept input was taken by its successor
    out.sum().backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_inference_forward_is_the_merged_form_with_the_norm_ratio():
    model = attach(net(), config())
    perturb(model, std=0.5)
    x = x_in()
    ref, _ = reference(model, x, "eval")            # no norms recorded yet: α = 1 everywhere
    torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)
    trained_a_little(model)
    ref, _ = reference(model, x, "eval")
    first = model.model.blocks[1].fc.adapters["default"]
    assert first.shortcut_ratio() != 1.0
    torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_norm_window_keeps_the_last_inputs():
    model = attach(net(), config(options={"norm_window": 2}))
    trained_a_little(model, steps=3)              # inputs x_in(10), 2 x_in(11), 3 x_in(12)
    a = model.model.blocks[0].fc.adapters["default"]
    assert int(a.reslora_input_count) == 3 and a.reslora_input_norms.shape == (2,)
    with torch.no_grad():                         # block 0's fc sees inp(x)
        last_two = [model.model.inp(x_in(seed=10 + i) * (1 + i)).norm() for i in (1, 2)]
    torch.testing.assert_close(a.reslora_input_norms.sort().values, torch.stack(last_two).sort().values)
    torch.testing.assert_close(a.mean_input_norm(), torch.stack(last_two).mean())


def test_block_shortcut_matches_its_equation_in_training_and_inference():
    for pre_num in (1, -1):
        model = attach(net(), config(options={"variant": "bs", "pre_num": pre_num}))
        perturb(model, std=0.5)
        x = x_in()
        ref, _ = reference(model, x, "bs", pre_num=pre_num if pre_num > 0 else 99)
        torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)
        model.train()
        torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["is", "bs"])
def test_trainable_parameters_are_those_of_lora(variant):
    model = attach(net(), config(options={"variant": variant}))
    assert model.trainable_parameter_count() == 6 * 2 * (8 + 8)
    assert {n.rsplit(".", 1)[-1] for n in model.named_trainable_parameters()} == {"lora_A", "lora_B"}
    assert model.shared_tensors["default"].to_peft() == {}


@pytest.mark.parametrize("variant", ["is", "bs"])
def test_merge_unmerge_restores_the_base_and_merged_equals_unmerged(variant):
    model = attach(net(), config(options={"variant": variant}))
    perturb(model, std=0.5)
    trained_a_little(model)
    check_merge_unmerge(model, x_in(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


@pytest.mark.parametrize("variant", ["is", "bs"])
def test_save_and_load_round_trip(tmp_path, variant):
    model = attach(net(), config(options={"variant": variant}))
    perturb(model, std=0.5)
    trained_a_little(model)
    x = x_in()
    model.train()
    expected_train = model(x)
    model.eval()
    expected = model(x)
    model.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "RESLORA"
    loaded = loraplex.load(net(), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    loaded.train()
    torch.testing.assert_close(loaded(x), expected_train, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["is", "bs"])
def test_save_as_plain_lora_loads_on_the_unmodified_base(tmp_path, variant):
    model = attach(net(), config(options={"variant": variant}))
    perturb(model, std=0.5)
    trained_a_little(model)
    check_save_load(model, net, x_in(), tmp_path, as_lora=True, peft_type="LORA", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_mixed_batch_equals_each_row_alone(training):
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=1, options={"variant": "bs"}))
    perturb_both(model, seed_b=5, std=0.5)
    trained_a_little(model)
    model.train(training)
    check_mixed_batch(model, x_in(rows=5), rtol=1e-5, atol=1e-6)


def test_a_layer_run_without_its_predecessor_says_why():
    model = attach(net(), config())
    model.train()
    with pytest.raises(RuntimeError, match="needs the input of its predecessor blocks.0.fc"):
        model.model.blocks[1].fc(torch.randn(2, 8))


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="it takes: norm_window, pre_num, variant"):
        attach(net(), config(options={"shortcut": "is"}))
    with pytest.raises(ValueError, match="variant must be 'is'"):
        attach(net(), config(options={"variant": "ms"}))
    with pytest.raises(ValueError, match="pre_num must be a positive integer or -1"):
        attach(net(), config(options={"variant": "bs", "pre_num": 0}))
