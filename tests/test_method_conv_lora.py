"""Conv-LoRA (`loraplex/methods/conv_lora.py`) against the paper's equations.

Reference, in float64 from the adapter's raw tensors, image by image:
    h = A x laid out on the H x W token grid (after `skip_tokens` leading tokens),
    e = argmax_i (mean_grid(h) · W_gate)_i          (no noise outside training),
    E_e(h) = down(GELU(Conv3x3_e(up(h)))),  up/down: bicubic resizing by the factor e + 1 and back,
    y = W x + b + s · B (h + E_e(h)),  s = alpha / r  (skipped tokens: y = W x + b + s · B h).

The causal token layout (our adaptation for causal LMs), in float64 literally as the docstring's equations:
the cumulative-mean routing per token, each expert's nearest-neighbour upsampling of the whole sequence
by f = e + 1, a left-padded Conv1d, GELU and the mean over each token's block of f; then causality,
KV-cache decoding against the full forward, and `loraplex train --method conv-lora` on a tiny causal LM.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import HF_VOCAB, hf_ids, tiny_bert, tiny_gpt2, tiny_llama
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
from tiny import tiny_loaded

import loraplex
from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer, adapters_of
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
    ({"grid": "causal", "skip_tokens": 1}, "skip_tokens must be 0 with grid='causal'"),
])
def test_bad_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(**options))


# --------------------------------------------------------------------------- the causal token layout
def causal_reference(layer: AdaptedLayer, x: torch.Tensor) -> tuple[torch.Tensor, set[int]]:
    """y for x (batch, L, d_in) from the causal equations in float64, and the experts the tokens chose."""
    a = layer.adapters["default"]
    t = {n: p.detach().double() for n, p in a.named_parameters()}
    xd = x.double()
    h = xd @ t["lora_A"].t()                                              # (batch, L, r)
    batch, length, r = h.shape
    pooled = h.cumsum(dim=1) / torch.arange(1, length + 1, dtype=torch.float64)[:, None]
    chosen = (pooled @ t["w_gate"]).argmax(dim=-1)                        # (batch, L)
    experts = []
    for e in range(EXPERTS):
        f = e + 1
        up = h.repeat_interleave(f, dim=1).transpose(1, 2)                # (batch, r, f·L): token t at t·f .. t·f+f-1
        conv = F.conv1d(F.pad(up, (2, 0)), t[f"convs.{e}.weight"], t[f"convs.{e}.bias"])   # sees q-2 .. q
        experts.append(F.gelu(conv).reshape(batch, r, length, f).mean(dim=-1).transpose(1, 2))
    mixed = h.clone()
    for b in range(batch):
        for pos in range(length):
            mixed[b, pos] += experts[int(chosen[b, pos])][b, pos]
    y = xd @ base_weight(layer).t() + layer.base_layer.bias.detach().double() + a.scale * mixed @ t["lora_B"].t()
    return y, set(chosen.flatten().tolist())


def causal_lm(seed: int = 0, **options) -> loraplex.AdapterModel:
    """A tiny random Llama with Conv-LoRA on every linear layer (grid left to "auto"), adapter perturbed."""
    model = attach(tiny_llama(seed), LoraConfig(method="conv-lora", r=4, alpha=8.0,
                                                          options={"experts": EXPERTS, **options})).eval()
    perturb(model, seed=3, fan_in=True)
    return model


def test_causal_output_matches_the_equations():
    model = attach(net(), config(grid="causal")).eval()
    perturb(model, seed=3, fan_in=True)
    seen = set()
    for path, layer in model.adapted_layers().items():
        x = x_tokens(4, 7, layer.spec.in_features)
        ref, chosen = causal_reference(layer, x)
        seen |= chosen
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=path)
    assert seen == set(range(EXPERTS)), f"tokens chose only experts {seen}: the routing is not exercised"


def test_grid_auto_is_causal_on_causal_lms_and_image_elsewhere():
    def grids(model) -> set[str]:
        return {layer.adapters["default"].grid for layer in model.adapted_layers().values()}

    assert grids(causal_lm()) == {"causal"}
    assert grids(attach(tiny_gpt2(), LoraConfig(method="conv-lora", r=2, targets=["c_attn"]))) == {"causal"}
    assert grids(attach(net(), config())) == {"image"}
    assert grids(attach(tiny_bert(), LoraConfig(method="conv-lora", r=2, targets=["query"]))) == {"image"}
    assert grids(attach(tiny_llama(), LoraConfig(method="conv-lora", options={"grid": "sequence"}))) == {
        "sequence"}


@pytest.mark.parametrize("training", [False, True])
def test_causal_outputs_depend_only_on_earlier_tokens(training):
    model = causal_lm().train(training)
    ids = hf_ids(batch=2, seq=8)
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 7) % HF_VOCAB
    torch.manual_seed(0)                        # the same routing noise in both runs while training
    logits = model(ids).logits
    torch.manual_seed(0)
    other = model(changed).logits
    # equal up to float round-off: the experts run on batches of other sizes when later tokens change
    torch.testing.assert_close(other[:, :5], logits[:, :5], rtol=0, atol=1e-5)
    assert (other[:, 5:] - logits[:, 5:]).abs().max() > 1e-3
    with model.disabled():                       # the adapter changes the model: the check means something
        assert (model(ids).logits - logits).abs().max() > 1e-2


def test_kv_cache_decoding_equals_the_full_forward():
    model = causal_lm()
    ids = hf_ids(batch=2, seq=9)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)                   # prefill, then one token per step
        steps, past = [out.logits], out.past_key_values
        for pos in range(4, 9):
            out = model(ids[:, pos:pos + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        # without the decode state a step would see neither its past tokens nor the running mean
        past = model(ids[:, :8], use_cache=True).past_key_values
        for layer in model.adapted_layers().values():
            layer.adapters["default"]._decode_state = None
        stateless = model(ids[:, 8:9], past_key_values=past, use_cache=True).logits[:, 0]
        assert (stateless - full[:, 8]).abs().max() > 1e-3


def test_greedy_generation_with_the_cache_equals_recomputing_each_step():
    model = causal_lm()
    ids = hf_ids(batch=3, seq=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                                 # one left-padded row, as loraplex generates
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
        with model.disabled():
            base = model.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached, base)


def test_causal_trainable_parameters_match_the_formula():
    model = attach(net(), config(grid="causal"))
    r, m = 2, EXPERTS
    expected = sum(r * (d_in + d_out) + 2 * r * m + m * (3 * r * r + r) for d_in, d_out in ((6, 8), (8, 10)))
    assert model.trainable_parameter_count() == expected


def test_causal_save_and_load_round_trip(tmp_path):
    model = attach(net(), config(grid="causal")).eval()
    perturb(model, fan_in=True)
    _, data = check_save_load(model, net, x_tokens(3, 11, 6), tmp_path / "net", peft_type="CONV_LORA", rtol=0,
                              atol=0, eval_loaded=True)
    assert data["loraplex"]["config"]["options"]["grid"] == "causal"
    # on a causal LM with the default grid ("auto" is saved and resolves to causal again)
    lm = causal_lm()
    ids = hf_ids(batch=2, seq=7)
    loaded, _ = check_save_load(lm, lambda: tiny_llama(), ids, tmp_path / "lm", rtol=0, atol=0,
                                eval_loaded=True, logits=True)
    assert {layer.adapters["default"].grid for layer in loaded.adapted_layers().values()} == {"causal"}


def test_causal_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(grid="causal"), "a")
    model.add_adapter("b", LoraConfig(method="conv-lora", r=3, targets=["lin", "gpt2"],
                                      options={"experts": 2, "grid": "causal"}))
    model.eval()
    perturb_both(model, seed_b=5, fan_in=True)
    check_mixed_batch(model, x_tokens(5, 9, 6), rtol=1e-5, atol=1e-6)


def test_loraplex_train_method_conv_lora_trains_a_causal_lm(tmp_path):
    from loraplex.cli.main import build_parser, build_train_config
    from loraplex.training.loop import train

    args = build_parser().parse_args([
        "train", "--method", "conv-lora", "--steps", "8", "--batch-size", "4", "--train-samples", "24",
        "--eval-samples", "2", "--eval-batch-size", "2", "--no-base-eval", "--checkpoint-every", "0",
        "--max-length", "512", "--r", "4", "--alpha", "8", "--lr", "1e-2", "--warmup-steps", "1",
        "--method-option", "experts=3", "--output", str(tmp_path / "run")])
    loaded = tiny_loaded()
    report = train(build_train_config(args), loaded=loaded)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"]
    trained = adapters_of(loaded.model, "default")
    assert trained and {a.grid for a in trained.values()} == {"causal"}
    assert report["trainable_parameters"] == sum(p.numel() for a in trained.values() for p in a.parameters())
    # the saved adapter loads back onto an untouched base with the trained model's outputs
    fresh = loraplex.load(tiny_loaded().model, tmp_path / "run" / "adapter").eval()
    ids = hf_ids(batch=2, seq=7)
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, loaded.model(ids).logits, rtol=1e-5, atol=1e-5)
