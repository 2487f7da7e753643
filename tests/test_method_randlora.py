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
from conftest import hf_ids, randomize, tiny_gpt2
from method_checks import assert_rows_match_alone
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraplex
from loraplex import LoraConfig, attach
from loraplex.core.layers import AdaptedLayer


class Net(nn.Module):
    """Linear 12 -> 8 (d_out < d_in) and GPT-2 Conv1D 8 -> 16 (d_out > d_in), then a plain head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 8)
        self.gpt2 = Conv1D(16, 8)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.gpt2(torch.tanh(self.lin(x)))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return randomize(Net()).eval()


def config(**kw) -> LoraConfig:
    return LoraConfig(**{"method": "randlora", "r": 3, "alpha": 6.0, "targets": ["lin", "gpt2"], **kw})


def perturb(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def base_weight(layer: AdaptedLayer) -> torch.Tensor:
    w = layer.base_layer.weight.detach().double()
    return w.t() if isinstance(layer.base_layer, Conv1D) else w


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


def x_in(d: int = 12, seed: int = 2, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{}, {"sparse": True}, {"projection_prng_key": 9}])
def test_output_matches_paper_equation(options):
    model = attach(net(), config(options=options)).eval()
    perturb(model)
    bases = model.shared_tensors["default"]
    for path, layer in model.adapted_layers().items():
        x = x_in(layer.spec.in_features)
        delta = reference_delta(layer, bases)
        ref = x.double() @ (base_weight(layer) + delta).t() + layer.base_layer.bias.detach().double()
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
    x = x_in()
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config()).eval()
    perturb(model)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    x = x_in()
    unmerged = model(x)
    model.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


def test_save_holds_the_bases_once_and_round_trips(tmp_path):
    model = attach(net(), config(options={"projection_prng_key": 4})).eval()
    perturb(model)
    x = x_in()
    expected = model(x)
    model.save(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert [k for k in keys if "randlora_A" in k or "randlora_B" in k] == ["base_model.randlora_A",
                                                                          "base_model.randlora_B"]
    assert len(keys) == 2 + 2 * 2
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "RANDLORA" and data["projection_prng_key"] == 4 and data["randlora_alpha"] == 6.0
    loaded = loraplex.load(net(), tmp_path).eval()
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(), "a")
    model.add_adapter("b", config(r=2, options={"projection_prng_key": 1}))
    model.eval()
    perturb(model)
    model.set_active("b")
    perturb(model, seed=5)
    x = x_in(rows=5)
    ids = ["a", "b", None, "b", "a"]
    mixed = model(x, adapter_ids=ids)
    assert_rows_match_alone(model, x, ids, mixed, rtol=1e-5, atol=1e-6)


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
        expected = logits(theirs, ids)
        theirs.save_pretrained(tmp_path / "peft")
        ours = loraplex.load(tiny_gpt2(), tmp_path / "peft").eval()
        assert (expected - logits(tiny_gpt2(), ids)).abs().max() > 1e-2
        torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)
        ours.save(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(logits(back, ids), expected, rtol=1e-5, atol=1e-5)


def test_loraplex_file_loads_in_peft(tmp_path):
    model = attach(net(), config()).eval()
    perturb(model)
    x = x_in()
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
