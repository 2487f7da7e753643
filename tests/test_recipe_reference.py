"""The RLHF reference model: the same model with adapters off (no second copy), checked against a
deep copy of the base model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from recipe_opt_util import adapted, batch, loaded

from loraplex.training.reference import reference, reference_logprobs, sequence_logprobs, token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


def logprobs_of(hf_model, data):
    """Per-token log p(label) from a plain HF model, written out independently."""
    logits = hf_model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1].double()
    labels = data["labels"][:, 1:]
    mask = labels != -100
    logp = F.log_softmax(logits, dim=-1)
    out = torch.zeros(labels.shape, dtype=torch.float64)
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            if mask[i, j]:
                out[i, j] = logp[i, j, labels[i, j]]
    return out, mask


def test_reference_equals_a_deep_copy_of_the_base_without_copying():
    src = loaded()
    base_copy = copy.deepcopy(src.model)
    torch.manual_seed(0)
    model = adapted(init="random")  # B ≠ 0: the policy differs from the base
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    data = batch(3)
    ref, mask = reference_logprobs(model, data)
    expected, expected_mask = logprobs_of(base_copy, data)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(ref.double(), expected, rtol=1e-5, atol=1e-5)
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == storages  # nothing duplicated
    policy, _ = token_logprobs(model, data)
    assert not torch.allclose(policy.double(), expected, atol=1e-3)  # adapters back on after the block
    assert not ref.requires_grad and policy.requires_grad
    seq = sequence_logprobs(model, data, reference_model=True)
    torch.testing.assert_close(seq.double(), expected.sum(1), rtol=1e-5, atol=1e-4)


def test_reference_with_merged_adapters_and_dpo_reward():
    model = adapted(init="random")
    data = batch(2)
    ref_before, _ = reference_logprobs(model, data)
    policy_before, _ = token_logprobs(model, data)
    model.merge()
    ref_merged, _ = reference_logprobs(model, data)          # merged adapters are unmerged meanwhile
    torch.testing.assert_close(ref_merged, ref_before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        policy_merged, _ = token_logprobs(model, data)
    torch.testing.assert_close(policy_merged, policy_before.detach(), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="needs a model with adapters"), reference(loaded().model):
        pass
