"""LoRA-GA: the gradient-SVD init and the residual against the paper's equations, the parameter count,
merging, deleting, files (native, with the initial factors, and as a plain LoRA), mixed batches,
determinism, and parity with PEFT 0.21.

PEFT parity goes through the plain-LoRA interchange (a LoRA-GA base is data-dependent, so neither
library can rebuild the other's residual from a native file): PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` loads in loraplex on the original base,
and our `save(..., as_lora=True)` loads in PEFT on the original base, each with the other's outputs.
(PEFT 0.21 scales B by diag(S) in `lora_ga_init`; we implement the paper's variant, so inits differ by
design and only the files are compared.)
"""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from conftest import hf_ids, tiny_gpt2, tiny_llama
from method_checks import check_merge_unmerge, check_mixed_batch, check_save_load, randomize_adapters
from safetensors.torch import load_file

import loraplex
from loraplex import LoraConfig

torch.set_num_threads(1)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(n: int = 3, batch: int = 2, seq: int = 7) -> list[dict]:
    out = []
    for i in range(n):
        ids = hf_ids(batch=batch, seq=seq, seed=100 + i)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def reference_gradients(model, data, paths) -> dict[str, torch.Tensor]:
    """Mean ∂loss/∂W of each targeted weight, by plain autograd on an untouched copy."""
    model = copy.deepcopy(model)
    weights = {p: model.get_submodule(p).weight for p in paths}
    for w in model.parameters():
        w.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    for batch in data:
        model(**batch).loss.backward()
    return {p: w.grad.double() / len(data) for p, w in weights.items()}


def align(x: torch.Tensor, ref: torch.Tensor, dim: int) -> torch.Tensor:
    """x with each row (dim=1) or column (dim=0) sign-flipped to match ref (singular vectors' signs are free)."""
    return x * torch.sign((x * ref).sum(dim=dim, keepdim=True))


@pytest.mark.parametrize("direction, scale", [("ArB2r", "stable"), ("A2rBr", "gd"), ("ArBr", "unit"),
                                              ("ArB2r", "weightS")])
def test_init_matches_the_paper(direction, scale):
    base, data, r, alpha = tiny_llama(), batches(), 2, 4.0
    x = hf_ids()
    before = base(x).logits
    original = {n: m.weight.detach().double().clone() for n, m in base.named_modules() if n.endswith(tuple(TARGETS))}
    grads = reference_gradients(base, data, list(original))
    pm = loraplex.attach(base, LoraConfig(method="lora-ga", r=r, alpha=alpha, options={
        "direction": direction, "scale": scale, "svd": "exact"}), calibration_data=data)
    s = alpha / r
    torch.testing.assert_close(pm(x).logits, before, rtol=1e-5, atol=1e-5)   # W_res + s B₀ A₀ = W
    for path, layer in pm.adapted_layers("default").items():
        ad = layer.adapters["default"]
        u, _, v = torch.linalg.svd(grads[path], full_matrices=False)   # rows of v: right singular vectors
        a_ref, b_ref = {
            "ArB2r": (v[:r], u[:, r:2 * r]), "A2rBr": (v[r:2 * r], u[:, :r]), "ArBr": (v[1:2 * r:2], u[:, 0:2 * r:2]),
        }[direction]
        c = {"stable": layer.spec.out_features ** 0.25 / math.sqrt(16), "gd": 1 / s, "unit": 1.0,
             "weightS": torch.sqrt(torch.linalg.svdvals(original[path])[:r] / s).mean().item()}[scale]
        a, b = ad.lora_A.detach().double(), ad.lora_B.detach().double()
        torch.testing.assert_close(align(a, a_ref, 1), c * a_ref, rtol=0, atol=1e-4, msg=path)
        torch.testing.assert_close(align(b, b_ref, 0), c * b_ref, rtol=0, atol=1e-4, msg=path)
        torch.testing.assert_close(layer.base_layer.weight.double(), original[path] - s * b @ a, rtol=0, atol=1e-6)
    # after training: y = W_res x + s B A x (A, B move; W_res stays)
    randomize_adapters(pm)
    h = torch.randn(5, 16, generator=torch.Generator().manual_seed(3)).double()
    layer = pm.model.model.layers[0].self_attn.q_proj
    ad = layer.adapters["default"]
    w_res = original["model.layers.0.self_attn.q_proj"] - s * ad.lora_B0.double() @ ad.lora_A0.double()
    ref = h @ w_res.t() + s * (h @ ad.lora_A.double().t()) @ ad.lora_B.double().t()
    torch.testing.assert_close(layer(h.float()).double(), ref, rtol=1e-5, atol=1e-5)


def test_default_lowrank_svd_is_deterministic_and_logs(caplog):
    data = batches()
    with caplog.at_level(logging.INFO, logger="loraplex"):
        a = loraplex.attach(tiny_llama(), LoraConfig(method="lora-ga", r=2, alpha=4), calibration_data=data)
    assert any("lora-ga: initialised 14 layers" in rec.message for rec in caplog.records)
    torch.manual_seed(123)   # the global RNG state must not matter
    b = loraplex.attach(tiny_llama(), LoraConfig(method="lora-ga", r=2, alpha=4), calibration_data=data)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    for (name, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(ba, bb), name


def test_without_calibration_it_is_a_plain_lora_on_the_untouched_base():
    base = tiny_llama()
    original = copy.deepcopy(base.state_dict())
    pm = loraplex.attach(base, LoraConfig(method="lora-ga", r=2, alpha=4))
    for k, v in pm.model.state_dict().items():
        if "base_layer" in k:
            assert torch.equal(v, original[k.replace(".base_layer", "")])
    x = hf_ids()
    torch.testing.assert_close(pm(x).logits, tiny_llama()(x).logits, rtol=0, atol=0)


def test_trainable_parameters_are_r_times_din_plus_dout():
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="lora-ga", r=2, alpha=4), calibration_data=batches())
    layers = pm.adapted_layers("default")
    assert pm.trainable_parameter_count() == sum(2 * (ly.spec.in_features + ly.spec.out_features) for ly in layers.values())
    assert all(n.endswith(("lora_A", "lora_B")) for n in pm.named_trainable_parameters())


def test_merge_unmerge_and_delete_restore_the_weights():
    base = tiny_llama()
    original = copy.deepcopy(base.state_dict())
    x = hf_ids()
    pm = loraplex.attach(base, LoraConfig(method="lora-ga", r=2, alpha=4), calibration_data=batches())
    randomize_adapters(pm)
    check_merge_unmerge(pm, x, rtol=1e-5, atol=1e-5, restore_atol=1e-6, only="base_layer.weight", logits=True)
    pm.delete_adapter("default")
    for k, v in original.items():
        torch.testing.assert_close(base.state_dict()[k], v, rtol=0, atol=1e-6)


def test_save_load_round_trip_keeps_the_initial_factors(tmp_path):
    x = hf_ids()
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="lora-ga", r=2, alpha=4), calibration_data=batches())
    randomize_adapters(pm)
    # loaded on tiny_llama() without calibration: W_res comes from the saved A₀, B₀
    check_save_load(pm, tiny_llama, x, tmp_path, rtol=0, atol=1e-6, logits=True)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_ga_A0" in keys


def test_mixed_batch_equals_each_row_alone():
    data = batches()
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="lora-ga", r=2, alpha=4, targets=["q_proj", "v_proj"]),
                         "a", calibration_data=data)
    pm.add_adapter("b", LoraConfig(method="lora-ga", r=2, alpha=2, targets=["up_proj"]), calibration_data=data)
    randomize_adapters(pm)
    ids = ["b", None, "a", "a", "b"]
    check_mixed_batch(pm, hf_ids(batch=len(ids)), ids, rtol=2e-5, atol=2e-5, logits=True, no_grad=True)


def test_bad_options_and_batches_say_what_is_allowed():
    with pytest.raises(ValueError, match="direction='up' is not allowed; direction must be one of"):
        loraplex.attach(tiny_llama(), LoraConfig(method="lora-ga", r=2, options={"direction": "up"}))
    with pytest.raises(ValueError, match="dicts with input_ids, attention_mask and labels"):
        loraplex.attach(tiny_llama(), LoraConfig(method="lora-ga", r=2), calibration_data=[hf_ids()])


# --------------------------------------------------------------------------- PEFT 0.21
def test_peft_lora_ga_adapter_converted_to_lora_loads_in_loraplex(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.tuners.lora import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    x, data = hf_ids(), batches()
    base = tiny_llama()
    config = PeftLoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="lora_ga",
                            lora_ga_config=LoraGAConfig())

    def train_step():
        for batch in data:
            base(**batch).loss.backward()

    preprocess_loraga(base, config, train_step)
    peft_model = get_peft_model(base, config)
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "init")
    peft_model.peft_config["default"].init_lora_weights = "lora_ga"
    randomize_adapters(peft_model)
    with torch.no_grad():
        expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours = loraplex.load(tiny_llama(), tmp_path / "converted")
    torch.testing.assert_close(ours(x).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_loraplex_lora_ga_as_lora_loads_in_loraplex_and_peft(tmp_path, make):
    from peft import PeftModel

    x = hf_ids()
    pm = loraplex.attach(make(), LoraConfig(method="lora-ga", r=2, alpha=4), calibration_data=batches())
    randomize_adapters(pm)
    with torch.no_grad():
        expected = pm(x).logits
    pm.save(tmp_path, as_lora=True)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    torch.testing.assert_close(loraplex.load(make(), tmp_path)(x).logits, expected, rtol=1e-5, atol=1e-5)
    peft_model = PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, expected, rtol=1e-5, atol=1e-5)
