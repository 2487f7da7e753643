"""VB-LoRA (`loraplex/methods/vb_lora.py`) against the paper's equation and against PEFT.

Reference, written here from the paper in float64 from the raw tensors, one sub-vector at a time:
    y = W x + b + B A x, every length-b sub-vector of A's rows and B's columns is
    Σ_{k ∈ top-k(l)} softmax(l restricted to the top k)_k · V_k for its own logits l ∈ R^h and the
    shared bank V (h x b).
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
R, H, LEN, K = 3, 6, 4, 2      # rank, bank vectors, vector length, top-k
OPTIONS = {"num_vectors": H, "vector_length": LEN, "topk": K}


def net(seed: int = 0) -> BlockNet:
    """Two blocks, each with Linear 8->8, Linear 8->16 and GPT-2 Conv1D 16->8 adapted."""
    return make_net(seed, blocks=2)


def config(**kw) -> LoraConfig:
    options = {**OPTIONS, **kw.pop("options", {})}
    return LoraConfig(**{"method": "vb-lora", "r": R, "targets": TARGETS, "options": options, **kw})


def sub_vector(logits: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """One sub-vector: the softmax over the k largest logits weighs the matching bank vectors."""
    order = sorted(range(len(logits)), key=lambda j: -float(logits[j]))[:K]
    weights = torch.softmax(logits[order], dim=0)
    return sum(w * bank[j] for w, j in zip(weights, order))


def vb_delta(logits_a: torch.Tensor, logits_b: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """ΔW = B A, A's row i = [a_i1, ..., a_i(d_in/b)], B's column i = [b_1i, ..., b_(d_out/b)i]."""
    la, lb, v = logits_a.double(), logits_b.double(), bank.double()
    r, n_in, _ = la.shape
    n_out = lb.shape[0]
    a = torch.stack([torch.cat([sub_vector(la[i, j], v) for j in range(n_in)]) for i in range(r)])
    b = torch.stack([torch.cat([sub_vector(lb[j, i], v) for j in range(n_out)]) for i in range(r)], dim=1)
    return b @ a


def deltas_of(model, name: str = "default") -> dict[str, torch.Tensor]:
    bank = model.shared_tensors[name].vblora_vector_bank.detach()
    return {path: vb_delta(layer.adapters[name].vblora_logits_A.detach(),
                           layer.adapters[name].vblora_logits_B.detach(), bank)
            for path, layer in model.adapted_layers(name).items()}


def test_output_matches_paper_equation():
    base = net()
    model = attach(copy.deepcopy(base), config())
    perturb(model)
    x = x_seq()
    ref = reference_with_deltas(base, x, deltas_of(model))
    torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_trainable_parameters_and_the_bank_is_stored_once(tmp_path):
    model = attach(net(), config())
    # bank h·b once + per layer logits h · r · (d_in + d_out) / b
    per_block = sum(H * R * (d_in + d_out) // LEN for d_in, d_out in ((8, 8), (8, 16), (16, 8)))
    assert model.trainable_parameter_count() == H * LEN + 2 * per_block
    names = list(model.named_trainable_parameters())
    assert [n for n in names if "vector_bank" in n] == ["shared_tensors.default.vblora_vector_bank"]
    model.save(tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    assert [k for k in keys if "vector_bank" in k] == ["base_model.vblora_vector_bank"]
    assert len(keys) == 1 + 2 * 6


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model)
    check_merge_unmerge(model, x_seq(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


@pytest.mark.parametrize("topk_only", [False, True])
def test_save_and_load_round_trip(tmp_path, topk_only):
    model = attach(net(), config(options={"save_only_topk_weights": topk_only}))
    perturb(model)
    tol = 1e-5 if topk_only else 0.0   # top-k only: the weights pass through softmax and log again
    _, data = check_save_load(model, net, x_seq(), tmp_path, peft_type="VBLORA", rtol=tol, atol=tol)
    assert data["save_only_topk_weights"] is topk_only
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ("base_model.model.blocks.0.q.vblora_logits_A_topk_indices" in keys) is topk_only


def test_save_as_plain_lora_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model)
    check_save_load(model, net, x_seq(), tmp_path, as_lora=True, rtol=1e-5, atol=1e-5)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(init="random"), name="a")
    model.add_adapter("b", config(init="random"))
    check_mixed_batch(model, x_seq(rows=5), rtol=1e-6, atol=1e-6)


def _peft_vblora(base: nn.Module, **kw):
    config = peft.VBLoRAConfig(r=R, target_modules=TARGETS, num_vectors=H, vector_length=LEN, topk=K, **kw)
    return peft.get_peft_model(base, config).eval()


@pytest.mark.parametrize("topk_only", [False, True])
def test_peft_adapter_loads_in_loraplex(tmp_path, topk_only):
    base = net()
    theirs = _peft_vblora(copy.deepcopy(base), save_only_topk_weights=topk_only)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "vblora" in n:
                p.normal_()
    theirs.save_pretrained(str(tmp_path))
    ours = loraplex.load(copy.deepcopy(base), tmp_path)
    x = x_seq()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    if not topk_only:
        assert ours.trainable_parameter_count() == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.parametrize("topk_only", [False, True])
def test_loraplex_adapter_loads_in_peft(tmp_path, topk_only):
    base = net()
    ours = attach(copy.deepcopy(base), config(options={"save_only_topk_weights": topk_only}))
    perturb(ours)
    ours.save(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = x_seq()
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def test_gpt2_attaches_and_merges():
    model = attach(tiny_gpt2(), LoraConfig(method="vb-lora", r=2, targets=["c_attn", "c_proj", "c_fc"],
                                           options={"vector_length": 16, "num_vectors": 8}))
    perturb(model)
    ids = hf_ids()
    logits = model(ids).logits
    model.merge()
    torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kw", "message"), [
    ({"options": {"vector_length": 3}}, "largest that does is 8"),
    ({"options": {"topk": 7}}, "topk .7. cannot exceed num_vectors"),
    ({"options": {"num_vectors": 0}}, "num_vectors must be an integer"),
    ({"options": {"bank": 1}}, "does not take option"),
    ({"init": "gaussian"}, "init must be one of"),
    ({"rank_pattern": {"q": 2}}, "rank_pattern"),
])
def test_bad_settings_say_what_is_allowed(kw, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(**kw))
