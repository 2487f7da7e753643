"""PiSSA: the SVD init and residual against the paper's equations, the parameter count, merging,
deleting, files (native and as a plain LoRA), mixed batches, and parity with PEFT 0.21.

PEFT parity goes through the interchange both libraries share for residual methods: PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` and our `save(..., as_lora=True)` both
write s (B A - B₀ A₀) as a plain rank-2r LoRA for the UNMODIFIED base, which each library loads with the
other's outputs. PEFT's native PiSSA file is also checked on PEFT's own residual base, and our init is
compared with PEFT's `init_lora_weights="pissa"` tensor by tensor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_snapshot, hf_ids, snapshot, tiny_gpt2, tiny_llama
from method_checks import (
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    out_in,
    randomize_adapters,
    seeded_model,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraplex
from loraplex import LoraConfig, TargetError

torch.set_num_threads(1)


class Mlp(nn.Module):
    """A Linear and a GPT-2 Conv1D (weight stored in x out), with biases."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.conv = Conv1D(7, 5)

    def forward(self, x):
        return self.conv(torch.tanh(self.lin(x)))


def mlp(seed: int = 0) -> Mlp:
    return seeded_model(Mlp, seed, std=0.5)


def paper_residual(w: torch.Tensor, r: int) -> torch.Tensor:
    """W - U_r S_r V_rᵀ in float64."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return w - u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


@pytest.mark.parametrize("rslora", [False, True])
def test_init_and_output_match_the_paper(rslora):
    model = mlp()
    originals = {n: (out_in(getattr(model, n)), getattr(model, n).bias.detach().double()) for n in ("lin", "conv")}
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    before = model(x)
    r, alpha = 2, 3.0
    pm = loraplex.attach(model, LoraConfig(method="pissa", r=r, alpha=alpha, rslora=rslora, targets=["lin", "conv"]))
    s = alpha / r ** 0.5 if rslora else alpha / r
    # At init: W_res + s B A = W, so the model is unchanged; W_res is the paper's residual.
    torch.testing.assert_close(pm(x), before, rtol=1e-5, atol=1e-5)
    for name, (w, _) in originals.items():
        layer = getattr(pm.model, name)
        ad = layer.adapters["default"]
        torch.testing.assert_close(out_in(layer.base_layer), paper_residual(w, r), rtol=0, atol=1e-5)
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(s * ad.lora_B.double() @ ad.lora_A.double(), u[:, :r] @ torch.diag(sv[:r]) @ vh[:r],
                                   rtol=0, atol=1e-5)
        # A and B share √S_r equally: A Aᵀ = B ᵀB = diag(S_r / s).
        torch.testing.assert_close(ad.lora_A.double() @ ad.lora_A.double().t(), torch.diag(sv[:r] / s), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ad.lora_B.double().t() @ ad.lora_B.double(), torch.diag(sv[:r] / s), rtol=1e-5, atol=1e-6)
    # After training (random factors): y = W_res x + b + s B A x, from the original W, in float64.
    randomize_adapters(pm)
    h = x.double()
    for name in ("lin", "conv"):
        w, b = originals[name]
        ad = getattr(pm.model, name).adapters["default"]
        ref = h @ paper_residual(w, r).t() + b + s * (h @ ad.lora_A.double().t()) @ ad.lora_B.double().t()
        out = getattr(pm.model, name)(h.float())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        h = torch.tanh(ref)


def test_trainable_parameters_are_r_times_din_plus_dout():
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="pissa", r=2, alpha=4))
    layers = pm.adapted_layers("default")
    expected = sum(2 * (layer.spec.in_features + layer.spec.out_features) for layer in layers.values())
    assert pm.trainable_parameter_count() == expected
    names = set(pm.named_trainable_parameters())
    assert all(n.endswith(("lora_A", "lora_B")) for n in names) and len(names) == 2 * len(layers)
    # the initial factors are frozen buffers, not parameters, and never re-enabled
    pm.set_active("default")
    assert not any("A0" in n or "B0" in n for n in dict(pm.named_parameters()))


def test_merge_unmerge_and_delete_restore_the_weights():
    model = tiny_llama()
    original = copy.deepcopy(model.state_dict())
    x = hf_ids()
    pm = loraplex.attach(model, LoraConfig(method="pissa", r=2, alpha=4))
    randomize_adapters(pm)
    check_merge_unmerge(pm, x, rtol=1e-5, atol=1e-5, restore_atol=1e-6, only="base_layer.weight", logits=True)
    pm.delete_adapter("default")
    assert not pm.adapted_layers()
    for k, v in original.items():   # W_res + s B₀ A₀ = W up to one fp32 rounding
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)


def test_save_load_round_trip_is_identical(tmp_path):
    x = hf_ids()
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="pissa", r=2, alpha=4))
    randomize_adapters(pm)
    # loading on tiny_llama() re-runs the SVD of the original weight
    _, config = check_save_load(pm, tiny_llama, x, tmp_path, peft_type="LORA", rtol=0, atol=1e-6, logits=True)
    assert config["loraplex"]["config"]["method"] == "pissa"


def test_as_lora_is_a_rank_2r_lora_for_the_unmodified_base(tmp_path):
    x = hf_ids()
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="pissa", r=2, alpha=4, rslora=True))
    randomize_adapters(pm)
    plain, config = check_save_load(pm, tiny_llama, x, tmp_path, as_lora=True, rtol=1e-5, atol=1e-5, logits=True)
    assert config["r"] == 4 and config["loraplex"]["config"]["method"] == "lora"
    assert all(type(a).__name__ == "LoraAdapter" for layer in plain.adapted_layers().values()
               for a in layer.adapters.values())


def test_mixed_batch_equals_each_row_alone():
    torch.manual_seed(0)
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="pissa", r=2, alpha=4, targets=["q_proj", "v_proj"]), "a")
    pm.add_adapter("b", LoraConfig(method="pissa", r=3, alpha=3, targets=["up_proj", "down_proj"]))
    randomize_adapters(pm)
    ids = ["a", None, "b", "a", "b"]   # None: the bare base, for a residual method W_res on its layers
    check_mixed_batch(pm, hf_ids(batch=len(ids)), ids, rtol=2e-5, atol=2e-5, logits=True, no_grad=True)


def test_a_second_residual_adapter_on_a_layer_is_refused_and_changes_nothing():
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="pissa", r=2, alpha=4, targets=["q_proj"]))
    before = snapshot(pm)
    with pytest.raises(TargetError, match="already replaced by the residual of a 'pissa' adapter"):
        pm.add_adapter("again", LoraConfig(method="pissa", r=2, alpha=4, targets=["q_proj"]))
    assert_same_snapshot(before, snapshot(pm))


@pytest.mark.parametrize("options, message", [
    ({"nitre": 2}, "no option.*'nitre'.*niter"),
    ({"niter": -1}, "niter=-1 is not allowed"),
])
def test_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        loraplex.attach(tiny_llama(), LoraConfig(method="pissa", r=2, options=options))


def test_randomized_svd_init_is_deterministic_and_close():
    a = loraplex.attach(tiny_llama(), LoraConfig(method="pissa", r=2, alpha=4, options={"niter": 4}))
    b = loraplex.attach(tiny_llama(), LoraConfig(method="pissa", r=2, alpha=4, options={"niter": 4}))
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    x = hf_ids()
    torch.testing.assert_close(a(x).logits, tiny_llama()(x).logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- PEFT 0.21
def _peft_pissa(base, r=2, alpha=4):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=r, lora_alpha=alpha, init_lora_weights="pissa",
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(base, config)


def test_init_equals_peft_pissa_init():
    peft_model = _peft_pissa(tiny_llama())
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="pissa", r=2, alpha=4))
    ours = {k.replace(".adapters.default", "").replace("lora_A", "lora_A.default.weight")
            .replace("lora_B", "lora_B.default.weight"): v for k, v in pm.model.state_dict().items()}
    theirs = peft_model.base_model.model.state_dict()
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=1e-6, msg=k)


def test_peft_pissa_adapters_load_in_loraplex(tmp_path):
    x = hf_ids()
    peft_model = _peft_pissa(tiny_llama())
    peft_model.peft_config["default"].init_lora_weights = True   # PEFT's recipe for the conversion
    peft_model.save_pretrained(tmp_path / "init")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    randomize_adapters(peft_model)
    with torch.no_grad():
        expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path / "native")
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    # the converted rank-2r LoRA, on the ORIGINAL base
    ours = loraplex.load(tiny_llama(), tmp_path / "converted")
    torch.testing.assert_close(ours(x).logits, expected, rtol=1e-5, atol=1e-5)
    # the native file (init_lora_weights="pissa") on the ORIGINAL base, as PEFT loads it: the residual is
    # rebuilt from the SVD of W
    ours = loraplex.load(tiny_llama(), tmp_path / "native")
    assert ours.configs["default"].method == "pissa"
    torch.testing.assert_close(ours(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_loraplex_pissa_as_lora_loads_in_peft(tmp_path, make):
    from peft import PeftModel

    x = hf_ids()
    pm = loraplex.attach(make(), LoraConfig(method="pissa", r=2, alpha=4))
    randomize_adapters(pm)
    with torch.no_grad():
        expected = pm(x).logits
    pm.save(tmp_path, as_lora=True)
    peft_model = PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, expected, rtol=1e-5, atol=1e-5)
