"""Core capabilities every method relies on: adapters join in the model's train/eval mode, PEFT files
are read by the `init_lora_weights` PEFT re-runs on load, per-layer ranks/alphas (`rank_pattern`,
`alpha_pattern`) both ways, and mixed batches served through each method's plain low-rank form.

References are independent: PEFT 0.21 itself (for files), and each row run alone (for mixed batches).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import hf_ids, tiny_llama
from torch import nn

import loraplex
from loraplex import LoraConfig
from loraplex.core.io import AdapterFileError
from loraplex.methods import available

torch.set_num_threads(1)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def randomize(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Move every trainable tensor away from its init (loraplex and PEFT models alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def dropout_modules(model: nn.Module) -> list[nn.Dropout]:
    return [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]


# --------------------------------------------------------------------------- (a) train / eval mode
def test_adapter_joins_an_eval_model_in_eval_mode():
    model = tiny_llama()            # in eval mode
    pm = loraplex.attach(model, LoraConfig(r=4, dropout=0.5, init="random", targets=TARGETS))
    assert not pm.training and dropout_modules(pm) and not any(m.training for m in dropout_modules(pm))
    assert not [n for n, m in pm.named_modules() if m.training]
    x = hf_ids()
    with torch.no_grad():
        first, second = pm(x).logits, pm(x).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)      # no dropout: deterministic
    pm.train()
    assert all(m.training for m in dropout_modules(pm))
    with torch.no_grad():
        assert not torch.equal(pm(x).logits, first)               # dropout now active


def test_adapter_joins_a_training_model_in_training_mode_and_second_adapter_follows_eval():
    model = tiny_llama().train()
    pm = loraplex.attach(model, LoraConfig(r=4, dropout=0.5, targets=TARGETS))
    assert pm.training and all(m.training for m in dropout_modules(pm))
    pm.eval()
    pm.add_adapter("b", LoraConfig(r=2, dropout=0.3, targets=["k_proj"]))
    assert not any(m.training for m in pm.modules())


def test_loaded_adapter_takes_the_mode_of_the_model(tmp_path):
    pm = loraplex.attach(tiny_llama(), LoraConfig(r=4, dropout=0.5, targets=TARGETS))
    pm.save(tmp_path)
    loaded = loraplex.load(tiny_llama(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    loaded = loraplex.load(tiny_llama().train(), tmp_path)
    assert all(m.training for m in dropout_modules(loaded))


def test_shared_tensors_join_in_the_model_mode():
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="vera", r=4, targets=TARGETS))
    assert len(pm.shared_tensors) == 1 and not any(m.training for m in pm.shared_tensors.modules())


# --------------------------------------------------------------------------- (b) PEFT init_lora_weights
def _peft(base, init, r=4, alpha=8, **kwargs):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(base, PeftLoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init,
                                               target_modules=TARGETS, **kwargs))


@pytest.mark.parametrize(("init", "method"), [("pissa", "pissa"), ("olora", "olora"), ("eva", "lora"),
                                              ("lora_ga", "lora"), ("orthogonal", "lora"), (True, "lora")])
def test_peft_files_load_as_peft_loads_them(tmp_path, init, method):
    """PEFT re-runs `init_lora_weights` when it loads a file: PiSSA/OLoRA rewrite the base weight from W,
    the others leave it alone. Our load of PEFT's file equals PEFT's own load, on the UNMODIFIED base."""
    from peft import PeftModel

    extra = {}
    if init == "lora_ga":
        from peft import LoraGAConfig

        extra["lora_ga_config"] = LoraGAConfig()
    x = hf_ids()
    peft_model = _peft(tiny_llama(), init, **extra)
    randomize(peft_model)                        # "trained"
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == init
    with torch.no_grad():
        expected = PeftModel.from_pretrained(tiny_llama(), tmp_path)(x).logits
        ours = loraplex.load(tiny_llama(), tmp_path)
        got = ours(x).logits
    assert ours.configs["default"].method == method
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if method != "lora":   # deleting gives the original base back
        ours.delete_adapter("default")
        with torch.no_grad():
            torch.testing.assert_close(ours.model(x).logits, tiny_llama()(x).logits, rtol=1e-5, atol=1e-5)


def test_peft_pissa_niter_loads_as_randomized_pissa(tmp_path):
    peft_model = _peft(tiny_llama(), "pissa_niter_4")
    peft_model.save_pretrained(tmp_path)
    ours = loraplex.load(tiny_llama(), tmp_path)
    assert ours.configs["default"].method == "pissa" and ours.configs["default"].options == {"niter": 4}


@pytest.mark.parametrize("init", ["loftq", "corda"])
def test_base_rewriting_inits_we_cannot_reproduce_are_refused_with_the_fix(tmp_path, init):
    from peft import LoraConfig as PeftLoraConfig

    _peft(tiny_llama(), True).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["init_lora_weights"] = init
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    assert PeftLoraConfig   # the field values are PEFT's own
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterFileError, match="path_initial_model_for_weight_conversion"):
        loraplex.load(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_olora_init_is_the_qr_of_w_and_leaves_the_output_unchanged():
    base = tiny_llama()
    x = hf_ids()
    pm = loraplex.attach(copy.deepcopy(base), LoraConfig(method="olora", r=3, alpha=6, targets=["q_proj"]))
    layer = pm.adapted_layers()["model.layers.0.self_attn.q_proj"]
    w = base.model.layers[0].self_attn.q_proj.weight.detach().double()
    q, r = torch.linalg.qr(w)
    a, b = layer.adapters["default"].lora_A.double(), layer.adapters["default"].lora_B.double()
    torch.testing.assert_close(a, r[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, q[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight.double(), w - 2.0 * b @ a, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, base(x).logits, rtol=1e-4, atol=1e-4)
    assert pm.trainable_parameter_count() == sum(3 * (16 + 16) for _ in range(2))


def test_our_olora_file_loads_in_peft(tmp_path):
    from peft import PeftModel

    x = hf_ids()
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="olora", r=2, alpha=4, targets=TARGETS))
    randomize(pm)
    pm.save(tmp_path)
    with torch.no_grad():
        expected = pm(x).logits
        got = PeftModel.from_pretrained(tiny_llama(), tmp_path)(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- (c) rank / alpha patterns
def test_peft_rank_and_alpha_patterns_load_and_save_both_ways(tmp_path):
    from peft import PeftModel

    x = hf_ids()
    peft_model = _peft(tiny_llama(), False, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                       alpha_pattern={"v_proj": 3, "down_proj": 5})
    with torch.no_grad():
        expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours = loraplex.load(tiny_llama(), tmp_path / "peft")
    got = {p: (a.r, a.alpha) for p, layer in ours.adapted_layers().items() for a in [layer.adapters["default"]]}
    assert got["model.layers.0.self_attn.q_proj"] == (2, 8.0)
    assert got["model.layers.0.self_attn.v_proj"] == (4, 3.0)
    assert got["model.layers.0.mlp.down_proj"] == (4, 5.0) and got["model.layers.1.mlp.down_proj"] == (6, 5.0)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, expected, rtol=1e-5, atol=1e-6)
    ours.save(tmp_path / "ours")
    with torch.no_grad():
        back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")(x).logits
    torch.testing.assert_close(back, expected, rtol=1e-5, atol=1e-6)


def test_patterns_written_only_at_peft_level_are_honoured(tmp_path):
    """A writer may record per-layer ranks/alphas in PEFT's fields only (not in our config): both read."""
    x = hf_ids()
    pm = loraplex.attach(tiny_llama(), LoraConfig(r=4, alpha=8, init="random", targets=TARGETS,
                                                  rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}))
    with torch.no_grad():
        expected = pm(x).logits
    pm.save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = data["loraplex"]["config"]
    ours["rank_pattern"], ours["alpha_pattern"] = {}, {}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    loaded = loraplex.load(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- (d) mixed batches
LOW_RANK = sorted(n for n, cls in available().items()
                  if getattr(cls, "serving_form", "") in ("low-rank", "low-rank after conversion")
                  and n != "lora")   # plain LoRA's batched path has its own tests (test_core_math)


# settings that fit the tiny model's 16/32-wide layers (defaults are sized for real models)
TINY_OPTIONS = {"mos": {"equivalent_rank": 16}, "vb-lora": {"vector_length": 8, "num_vectors": 32},
                "fourierft": {"n_frequency": 50}}
RESIDUAL = {"pissa", "olora", "lora-ga"}   # one residual adapter per layer: the second adapter goes elsewhere


@pytest.mark.parametrize("method", LOW_RANK)
def test_low_rank_methods_are_batched_in_mixed_batches(method):
    """Rows of two adapters of the method and bare-base rows, served by the batched low-rank path, equal
    each row run alone; the batched path is the one taken."""
    torch.manual_seed(0)
    options = TINY_OPTIONS.get(method, {})
    pm = loraplex.attach(tiny_llama(), LoraConfig(method=method, r=4, alpha=8, targets=TARGETS, options=options), "a")
    second = ["k_proj", "o_proj"] if method in RESIDUAL else ["q_proj", "k_proj"]
    pm.add_adapter("b", LoraConfig(method=method, r=2, alpha=3, targets=second, options=options))
    randomize(pm.model)
    pm.set_active(["a", "b"])
    randomize(pm)                                   # both adapters' tensors, shared ones too
    layer = pm.adapted_layers()["model.layers.0.self_attn.q_proj"]
    present = [n for n in ("a", "b") if n in layer.adapters]
    assert layer._can_batch(present), f"{method} has a low-rank form but is not batched"
    ids = ["a", None, "b", "a", "b", "b"]
    x = hf_ids(batch=len(ids))
    with torch.no_grad():
        mixed = pm(x, adapter_ids=ids).logits
        alone = []
        for i, name in enumerate(ids):
            if name is None:
                with pm.disabled():
                    alone.append(pm(x[i:i + 1]).logits)
            else:
                pm.set_active(name)
                alone.append(pm(x[i:i + 1]).logits)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_methods_without_a_low_rank_form_take_the_per_adapter_path():
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="fourierft", targets=["q_proj"], options=TINY_OPTIONS["fourierft"]), "a")
    pm.add_adapter("b", LoraConfig(method="fourierft", targets=["q_proj"], options=TINY_OPTIONS["fourierft"]))
    randomize(pm)
    layer = pm.adapted_layers()["model.layers.0.self_attn.q_proj"]
    assert not layer._can_batch(["a", "b"])
    ids = ["b", None, "a"]
    x = hf_ids(batch=3)
    with torch.no_grad():
        mixed = pm(x, adapter_ids=ids).logits
        pm.set_active("b")
        first = pm(x[:1]).logits
    torch.testing.assert_close(mixed[:1], first, rtol=1e-5, atol=1e-6)


def test_batched_factors_follow_weight_changes():
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="vera", r=4, targets=["q_proj"]), "a")
    pm.add_adapter("b", LoraConfig(method="vera", r=4, targets=["q_proj"]))
    randomize(pm)
    x = hf_ids(batch=2)
    with torch.no_grad():
        pm(x, adapter_ids=["a", "b"])
        for p in pm.parameters():
            if p.requires_grad:
                p.mul_(1.5)
        mixed = pm(x, adapter_ids=["a", "b"]).logits
        pm.set_active("a")
        alone = pm(x[:1]).logits
    torch.testing.assert_close(mixed[:1], alone, rtol=1e-5, atol=1e-6)
