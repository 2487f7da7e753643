"""VeRA (`loraplex/methods/vera.py`) against the paper's equation and against PEFT.

Reference, written here from the paper in float64 from the raw tensors:
    y = W x + b + Λ_b B Λ_d A x,  A (r x d_in), B (d_out x r) one frozen random pair shared by every
    layer (PEFT's rule for layers of different shapes: A[:, :d_in], B[:d_out, :] of a pair sized for
    the largest layer), b ∈ R^d_out and d ∈ R^r trainable per layer, no other scale.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import hf_ids, tiny_gpt2
from method_checks import (
    BlockNet,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    make_net,
    perturb,
    reference_with_deltas,
    x_seq,
)
from safetensors.torch import load_file
from torch import nn

import loraplex
from loraplex import LoraConfig, attach

TARGETS = ["q", "up", "down"]


def net(seed: int = 0) -> BlockNet:
    """Three blocks, each with Linear 8->8, Linear 8->16 and GPT-2 Conv1D 16->8 adapted."""
    return make_net(seed, blocks=3)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "vera", "r": 4, "targets": TARGETS, **kw})


def vera_delta(a_shared: torch.Tensor, b_shared: torch.Tensor, lam_b: torch.Tensor, lam_d: torch.Tensor,
               d_in: int, d_out: int) -> torch.Tensor:
    """ΔW = Λ_b B Λ_d A with this layer's slices, written element-wise: ΔW[o, i] = b_o Σ_k B[o, k] d_k A[k, i]."""
    a = a_shared.double()[:, :d_in]
    b = b_shared.double()[:d_out, :]
    return torch.einsum("o,ok,k,ki->oi", lam_b.double(), b, lam_d.double(), a)


def deltas_of(model, name: str = "default") -> dict[str, torch.Tensor]:
    shared = model.shared_tensors[name]
    out = {}
    for path, layer in model.adapted_layers(name).items():
        ad = layer.adapters[name]
        out[path] = vera_delta(shared.vera_A, shared.vera_B, ad.vera_lambda_b.detach(), ad.vera_lambda_d.detach(),
                               layer.spec.in_features, layer.spec.out_features)
    return out


def test_output_matches_paper_equation():
    base = net()
    model = attach(copy.deepcopy(base), config())
    perturb(model)
    x = x_seq()
    ref = reference_with_deltas(base, x, deltas_of(model))
    torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_starts_as_identity_with_paper_init_and_shared_pair_is_pefts_draw():
    base = net()
    model = attach(copy.deepcopy(base), config(options={"projection_prng_key": 7}))
    x = x_seq()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)          # b = 0
    layer = model.adapted_layers()["blocks.0.q"].adapters["default"]
    assert torch.all(layer.vera_lambda_d == 0.1)                            # d_initial
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=4, target_modules=TARGETS,
                                                                      projection_prng_key=7))
    shared = model.shared_tensors["default"]
    assert shared.vera_A.shape == (4, 16) and shared.vera_B.shape == (16, 4)   # largest d_in, d_out
    assert torch.equal(shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, theirs.base_model.vera_B["default"])


def test_trainable_parameters_are_the_vectors_and_the_pair_is_stored_once(tmp_path):
    model = attach(net(), config(r=4))
    # Σ over layers of (d_out + r): q 8+4, up 16+4, down 8+4, three blocks
    assert model.trainable_parameter_count() == 3 * ((8 + 4) + (16 + 4) + (8 + 4))
    names = set(model.named_trainable_parameters())
    assert all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in names)
    shared = model.shared_tensors["default"]
    assert not list(shared.parameters()) and {n for n, _ in shared.named_buffers()} == {"vera_A", "vera_B"}
    model.set_active("default")
    assert model.trainable_parameter_count() == 132   # the pair stays frozen after the flags are reset
    model.save(tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys.count("base_model.vera_A") == 1 and keys.count("base_model.vera_B") == 1
    assert not [k for k in keys if "vera_A" in k or "vera_B" in k][2:]
    assert len(keys) == 2 + 2 * 9


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model)
    check_merge_unmerge(model, x_seq(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_and_load_round_trip(tmp_path, save_projection):
    model = attach(net(), config(options={"save_projection": save_projection, "projection_prng_key": 3}))
    perturb(model)
    loaded, data = check_save_load(model, net, x_seq(), tmp_path, peft_type="VERA", rtol=0, atol=0)
    assert data["save_projection"] is save_projection
    assert ("base_model.vera_A" in load_file(tmp_path / "adapter_model.safetensors")) is save_projection
    assert loaded.trainable_parameter_count() == model.trainable_parameter_count()


def test_save_as_plain_lora_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model)
    check_save_load(model, net, x_seq(), tmp_path, as_lora=True, peft_type="LORA", rtol=1e-5, atol=1e-5)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(init="random"), name="a")
    model.add_adapter("b", config(init="random"))
    check_mixed_batch(model, x_seq(rows=5), rtol=1e-6, atol=1e-6)


def _peft_vera(base: nn.Module, **kw):
    return peft.get_peft_model(base, peft.VeraConfig(r=4, target_modules=TARGETS, **kw)).eval()


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_adapter_loads_in_loraplex(tmp_path, save_projection):
    base = net()
    theirs = _peft_vera(copy.deepcopy(base), save_projection=save_projection, projection_prng_key=5,
                        init_weights=False)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "vera_lambda" in n:
                p.normal_()
    theirs.save_pretrained(str(tmp_path))
    ours = loraplex.load(copy.deepcopy(base), tmp_path)
    x = x_seq()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert ours.trainable_parameter_count() == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.parametrize("save_projection", [True, False])
def test_loraplex_adapter_loads_in_peft(tmp_path, save_projection):
    base = net()
    ours = attach(copy.deepcopy(base), config(options={"save_projection": save_projection,
                                                        "projection_prng_key": 9}))
    perturb(ours)
    ours.save(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = x_seq()
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def test_gpt2_attaches_merges_and_round_trips(tmp_path):
    model = attach(tiny_gpt2(), LoraConfig(method="vera", r=4, targets=["c_attn", "c_proj", "c_fc"]))
    perturb(model)
    ids = hf_ids()
    logits = model(ids).logits
    model.merge()
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    model.unmerge()
    model.save(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(ids).logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kw", "message"), [
    ({"options": {"rank": 3}}, "does not take option"),
    ({"options": {"save_projection": "yes"}}, "save_projection must be true or false"),
    ({"options": {"projection_prng_key": -1}}, "projection_prng_key must be an integer"),
    ({"init": "gaussian"}, "init must be one of"),
    ({"rank_pattern": {"q": 2}}, "rank_pattern"),
])
def test_bad_settings_say_what_is_allowed(kw, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(**kw))
