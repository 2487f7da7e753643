"""RandLoRA (`loraplex/methods/randlora.py`) against the paper's equation and PEFT 0.21.

Reference, in float64 with explicit sums from the adapter's raw tensors (written for d_out ≥ d_in,
transposed otherwise; n = ceil(min(d_in, d_out) / r) bases, s = alpha / r):
    ΔW = s · Σ_k B_k Λ_k A Γ_k = s · Σ_k Σ_i λ[i, k] · b_{k,i} ⊗ (a_i ⊙ γ_k)
with a_i the i-th row of the shared A and b_{k,i} the column of the shared B that PEFT pairs with
(rank i, basis k): flat column f = i·n + k of B viewed as (max_dim, n·r), i.e. B[:, f // r, f % r].
The bases are shared: one copy in the model and in the file (`base_model.randlora_A/B`).
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import hf_ids, tiny_gpt2
from method_checks import (
    TwoLayerNet,
    base_weight,
    check_merge_unmerge,
    check_mixed_batch,
    check_peft_round_trip,
    check_save_load,
    check_starts_as_base,
    linear_reference,
    perturb,
    perturb_both,
    two_layer_net,
    x_in,
)
from safetensors.torch import load_file
from torch import nn

import loraplex
from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


def net(seed: int = 0) -> TwoLayerNet:
    """Linear 12 -> 8 (d_out < d_in) and GPT-2 Conv1D 8 -> 16 (d_out > d_in), then a plain head."""
    return two_layer_net(12, 8, 16, seed)


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "randlora", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def reference_delta(layer: AdaptedLayer, bases: nn.Module, name: str = "default") -> torch.Tensor:
    ad = layer.adapters[name]
    d_out, d_in = layer.spec.out_features, layer.spec.in_features
    lo, hi, r = min(d_in, d_out), max(d_in, d_out), ad.r
    n = -(-lo // r)
    a, b = bases.randlora_A.double(), bases.randlora_B.double()
    lam, gamma = ad.randlora_lambda.detach().double(), ad.randlora_gamma.detach().double()
    m = torch.zeros(hi, lo, dtype=torch.float64)
    for k in range(n):
        for i in range(r):
            f = i * n + k
            m += lam[i, k] * torch.outer(b[:hi, f // r, f % r], a[i, 0, :lo] * gamma[k])
    m *= ad.alpha / r
    return m if d_in == lo else m.t()


@pytest.mark.parametrize("options", [{}, {"sparse": True}, {"projection_prng_key": 9}])
def test_output_matches_paper_equation(options):
    model = attach(net(), config(options=options)).eval()
    perturb(model, fan_in=True)
    bases = model.shared_tensors["default"]
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        delta = reference_delta(layer, bases)
        ref = linear_reference(layer, x, base_weight(layer) + delta)
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5, msg=f"{options} {path}")
    if not options.get("sparse"):   # full rank: the update reaches min(d_in, d_out), far above r
        layer = model.adapted_layers()["gpt2"]
        assert torch.linalg.matrix_rank(layer.adapters["default"].delta_weight(layer.spec)) == 8


def test_bases_are_shared_frozen_and_sized_for_the_largest_layer():
    model = attach(net(), config())
    bases = model.shared_tensors["default"]
    # largest (d_out, d_in) entrywise over the layers: (16, 12): A is (r, 1, 12), B is (16, ceil(12/3), r)
    assert tuple(bases.randlora_A.shape) == (3, 1, 12) and tuple(bases.randlora_B.shape) == (16, 4, 3)
    assert not list(bases.parameters())
    for layer in model.adapted_layers().values():
        assert layer.adapters["default"].shared is bases
        assert not list(layer.adapters["default"].buffers())
    # n = ceil(8 / 3) = 3 bases per layer: λ (3 x 3) + γ (3 x 8)
    assert model.trainable_parameter_count() == 2 * (3 * 3 + 3 * 8)
    assert not any("randlora_A" in n or "randlora_B" in n for n in model.named_trainable_parameters())


def test_starts_as_the_identity():
    model = attach(net(), config()).eval()
    check_starts_as_base(model, x_in(12), rtol=0, atol=0)


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config()).eval()
    perturb(model, fan_in=True)
    check_merge_unmerge(model, x_in(12), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_holds_the_bases_once_and_round_trips(tmp_path):
    model = attach(net(), config(options={"projection_prng_key": 4})).eval()
    perturb(model, fan_in=True)
    _, data = check_save_load(model, net, x_in(12), tmp_path, peft_type="RANDLORA", rtol=0, atol=0,
                              eval_loaded=True)
    assert data["projection_prng_key"] == 4 and data["randlora_alpha"] == 6.0
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert [k for k in keys if "randlora_A" in k or "randlora_B" in k] == ["base_model.randlora_A",
                                                                          "base_model.randlora_B"]
    assert len(keys) == 2 + 2 * 2


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2, options={"projection_prng_key": 1}))
    model.eval()
    perturb_both(model, seed_b=5, fan_in=True)
    check_mixed_batch(model, x_in(12, rows=5), rtol=1e-5, atol=1e-6)


def test_gpt2_trains_the_scales_and_keeps_the_bases():
    model = attach(tiny_gpt2(), LoraConfig(method="randlora", r=4, targets=["c_attn", "c_fc"]))
    bases = {n: t.clone() for n, t in model.shared_tensors.named_buffers()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    ids = hf_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    lambdas = [p for n, p in model.named_trainable_parameters().items() if n.endswith("randlora_lambda")]
    assert len(lambdas) == 4 and all(p.grad.abs().sum() > 0 for p in lambdas)   # λ = 0 at the start
    opt.step()
    for n, t in model.shared_tensors.named_buffers():
        assert torch.equal(t, bases[n]), n


def test_rank_pattern_is_refused_because_the_bases_are_shared():
    with pytest.raises(ValueError, match="every layer needs r=3"):
        attach(net(), config(rank_pattern={"gpt2": 2}))


# --------------------------------------------------------------------------- PEFT parity
def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("peft_kw", [{}, {"save_projection": False}, {"sparse": True}, {"very_sparse": True}],
                         ids=["saved-bases", "regenerated-bases", "sparse", "very-sparse"])
def test_peft_file_loads_in_loraplex_and_back(peft_kw, tmp_path):
    ids = hf_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_gpt2(), peft.RandLoraConfig(
            r=4, randlora_alpha=12, projection_prng_key=7, init_weights=False,
            target_modules=["c_attn", "c_fc"], **peft_kw)).eval()
        check_peft_round_trip(theirs, tiny_gpt2, lambda model: logits(model, ids), tmp_path, rtol=1e-5, atol=1e-5,
                              changed=1e-2)


def test_loraplex_file_loads_in_peft(tmp_path):
    model = attach(net(), config()).eval()
    perturb(model, fan_in=True)
    x = x_in(12)
    expected = model(x)
    model.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(net(), str(tmp_path)).eval()
    torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-5)


def test_mismatched_base_copies_in_a_file_are_refused(tmp_path):
    from safetensors.torch import save_file

    from loraplex import AdapterFileError

    model = attach(net(), config())
    model.save(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lin.randlora_A"] = tensors["base_model.randlora_A"] + 1
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in json.loads((tmp_path / "adapter_config.json").read_text()).items()
                    if k != "loraplex"} | {"target_modules": ["lin", "gpt2"]}))
    with pytest.raises(AdapterFileError, match="shared by all layers"):
        loraplex.load(net(), tmp_path)
