"""Conv-LoRA (`loraplex/methods/conv_lora.py`) against the paper's equations.

Reference, in float64 from the adapter's raw tensors, image by image:
    h = A x laid out on the H x W token grid (after `skip_tokens` leading tokens),
    e = argmax_i (mean_grid(h) · W_gate)_i          (no noise outside training),
    E_e(h) = down(GELU(Conv3x3_e(up(h)))),  up/down: bicubic resizing by the factor e + 1 and back,
    y = W x + b + s · B (h + E_e(h)),  s = alpha / r  (skipped tokens: y = W x + b + s · B h).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_ids, tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_mixed_batch,
    check_save_load,
    check_starts_as_base,
    perturb,
    perturb_both,
    two_layer_net,
)

from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer
from loraplex.methods.conv_lora import ConvLoraAdapter

EXPERTS = 3


def net(seed: int = 0) -> TwoLayerNet:
    """A Linear (6 -> 8) and a GPT-2 Conv1D (8 -> 10), adapted, then a plain head."""
    return two_layer_net(6, 8, 10, seed)


def config(**options) -> LoraConfig:
    return LoraConfig(method="conv-lora", r=2, alpha=4.0, targets=["lin", "gpt2"],
                      options={"experts": EXPERTS, **options})


def reference(layer: AdaptedLayer, x: torch.Tensor, skip: int = 0, grid: tuple[int, int] | None = None):
    a = layer.adapters["default"]
    t = {n: p.detach().double() for n, p in a.named_parameters()}
    w = base_weight(layer)
    xd = x.double()
    h = xd @ t["lora_A"].t()
    four_d = h.dim() == 4
    tokens = h.reshape(h.shape[0], -1, h.shape[-1])[:, skip:]
    height, width = h.shape[1:3] if four_d else grid
    images = tokens.transpose(1, 2).reshape(h.shape[0], -1, height, width)
    mixed, chosen = [], []
    for img in images:
        e = int(torch.argmax(img.mean(dim=(1, 2)) @ t["w_gate"]))
        chosen.append(e)
        z = img[None]
        if e > 0:
            z = F.interpolate(z, scale_factor=e + 1, mode="bicubic")
        z = F.gelu(F.conv2d(z, t[f"convs.{e}.weight"], t[f"convs.{e}.bias"], padding=1))
        if e > 0:
            z = F.interpolate(z, size=(height, width), mode="bicubic")
        mixed.append(img + z[0])
    mixed = torch.stack(mixed).reshape(h.shape[0], h.shape[-1], -1).transpose(1, 2)
    mixed = torch.cat([h.reshape(h.shape[0], -1, h.shape[-1])[:, :skip], mixed], dim=1).reshape(h.shape)
    y = xd @ w.t() + layer.base_layer.bias.detach().double() + a.scale * mixed @ t["lora_B"].t()
    return y, chosen


def x_tokens(*shape, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("shape", "options", "grid"), [
    ((4, 16, 6), {}, (4, 4)),                                  # a ViT's 4 x 4 patch tokens
    ((4, 10, 6), {"skip_tokens": 1}, (3, 3)),                  # a class token, then 3 x 3 patches
    ((4, 3, 5, 6), {}, None),                                  # (batch, H, W, features), SAM's layout
    ((4, 7, 6), {"grid": "sequence"}, (1, 7)),                 # a 1 x L token strip
])
def test_output_matches_paper_equation(shape, options, grid):
    model = attach(net(), config(**options)).eval()
    perturb(model, seed=3, fan_in=True)
    seen = set()
    for path, layer in model.adapted_layers().items():
        x = x_tokens(*shape[:-1], layer.spec.in_features)
        ref, chosen = reference(layer, x, options.get("skip_tokens", 0), grid)
        seen |= set(chosen)
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=f"{shape} {path}")
    assert len(seen) > 1, "every image took the same expert: the routing is not exercised"


def test_trainable_parameters_match_the_formula():
    model = attach(net(), config())
    r, m = 2, EXPERTS
    expected = sum(r * (d_in + d_out) + 2 * r * m + m * (9 * r * r + r) for d_in, d_out in ((6, 8), (8, 10)))
    assert model.trainable_parameter_count() == expected


def test_starts_as_the_identity():
    model = attach(net(), config()).eval()
    check_starts_as_base(model, x_tokens(2, 9, 6), rtol=0, atol=0)     # B = 0


def test_merge_is_refused_with_a_clear_error():
    model = attach(net(), config()).eval()
    with pytest.raises(TypeError, match="not mergeable"):
        model.merge()
    layer = model.adapted_layers()["lin"]
    with pytest.raises(TypeError, match="not mergeable"):
        layer.adapters["default"].merge(layer.spec, 1.0)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config(skip_tokens=1)).eval()
    perturb(model, fan_in=True)
    check_save_load(model, net, x_tokens(3, 17, 6), tmp_path, peft_type="CONV_LORA", rtol=0, atol=0,
                    eval_loaded=True)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", LoraConfig(method="conv-lora", r=3, targets=["lin", "gpt2"], options={"experts": 2}))
    model.eval()
    perturb_both(model, seed_b=5, fan_in=True)
    check_mixed_batch(model, x_tokens(5, 9, 6), rtol=1e-5, atol=1e-6)


def test_gate_learns_through_the_load_balancing_loss():
    model = attach(net(), config())
    model.train()
    x = x_tokens(6, 9, 6)
    out = model(x)
    aux = ConvLoraAdapter.aux_loss(model, "default")
    assert torch.isfinite(aux) and aux > 0
    (out.pow(2).mean() + aux).backward()
    for layer in model.adapted_layers().values():
        a = layer.adapters["default"]
        assert a.w_gate.grad is not None and a.w_gate.grad.abs().sum() > 0
        assert a.w_noise.grad is not None and a.w_noise.grad.abs().sum() > 0
    model.eval()
    for layer in model.adapted_layers().values():
        layer.adapters["default"].last_aux_loss = None
    model(x)
    assert ConvLoraAdapter.aux_loss(model, "default") == 0.0          # no loss outside training


def test_token_strip_on_gpt2_trains():
    model = attach(tiny_gpt2(), LoraConfig(method="conv-lora", r=2, targets=["c_attn"],
                                           options={"grid": "sequence", "experts": 2}))
    ids = hf_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_trainable_parameters().items()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.endswith("lora_B"))


def test_non_square_tokens_are_refused_with_advice():
    model = attach(net(), config()).eval()
    with pytest.raises(ValueError, match="not a square.*skip_tokens.*grid='sequence'"):
        model(x_tokens(2, 7, 6))


@pytest.mark.parametrize(("options", "message"), [
    ({"experts": 0}, "experts must be an integer >= 1"),
    ({"grid": "2d"}, "grid must be one of"),
    ({"noisy_gating": 1}, "noisy_gating must be true or false"),
    ({"top_k": 2}, "it takes:"),
])
def test_bad_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(**options))
