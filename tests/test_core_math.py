"""The math of the core: LoRA / rsLoRA / DoRA outputs against the papers' equations, merging,
switching off, weighted combinations, mixed batches, gradients, and the bookkeeping around them
(second adapters, deletion, unloading, trainable parameters, targeting, config validation).

References are written here from the papers (see `conftest.reference_output`), computed in float64
from the adapter's raw tensors. Tolerances are rounding-error bounds (conftest.assert_within):

  |out - ref| ≤ k · u · M   elementwise,

with u the unit roundoff of the dtype the layer computes in (fp32 2^-24, bf16 2^-8) and M the same
expression evaluated on absolute values (the classic bound |fl(Σ aᵢbᵢ) - Σ aᵢbᵢ| ≤ γₙ Σ|aᵢbᵢ|).
fp32: k = 2·(inner length + rank + 8), the γₙ of the longest chain of sums (≈ 1e-5 relative here).
bf16: PyTorch accumulates bf16 products in fp32 and rounds each op's result to bf16 once; an adapted
layer is a chain of at most ~6 such roundings (x A, (x A) B, ·s, W x + b, +, DoRA's ratio), so k = 16.
A wrong scale, a missing term or a transposed factor is an O(M) error, far outside these bounds.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    UNIT_ROUNDOFF,
    Zoo,
    adapter_tensors,
    assert_same_snapshot,
    assert_within,
    has_wrappers,
    paper_scale,
    perturb_magnitudes,
    randomize,
    reference_output,
    snapshot,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    zoo,
    zoo_ids,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraplex
from loraplex import AdapterModel, ConfigError, LoraConfig, TargetError, attach
from loraplex.core.layers import AdaptedLayer, SavedModule
from loraplex.methods.lora import _LoraLinearFunction

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("linear", "gpt2", "embedding", "conv1d", "conv2d")
DORA_KINDS = ("linear", "gpt2")
# (base model dtype, adapter dtype): fp32 everywhere; bf16 everywhere (the fused path); fp32 adapters on
# a bf16 base (the mixed-precision path).
PRECISIONS = ((torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.bfloat16, "float32"))


class Holder(nn.Module):
    """A model made of one layer, so the reference is exactly the paper's equation."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@st.composite
def layer_cases(draw, kinds=KINDS):
    kind = draw(st.sampled_from(kinds))
    case = {
        "kind": kind,
        "d_in": draw(st.integers(1, 9)),
        "d_out": draw(st.integers(1, 9)),
        "bias": draw(st.booleans()),
        "precision": draw(st.sampled_from(PRECISIONS)),
        "seed": draw(st.integers(0, 2**16)),
        "lead": draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)),
    }
    if kind in ("conv1d", "conv2d"):
        dims = 1 if kind == "conv1d" else 2
        case["kernel"] = tuple(draw(st.integers(1, 3)) for _ in range(dims))
        case["stride"] = draw(st.integers(1, 2))
        case["padding"] = draw(st.integers(0, 1))
        case["dilation"] = draw(st.integers(1, 2))
    return case


@st.composite
def adapter_configs(draw, kind):
    r = draw(st.integers(1, 6))
    return dict(r=r, alpha=draw(st.floats(0.25, 32.0)), rslora=draw(st.booleans()),
                dora=kind in DORA_KINDS and draw(st.booleans()))


def build_layer(case) -> nn.Module:
    torch.manual_seed(case["seed"])
    kind, d_in, d_out, bias = case["kind"], case["d_in"], case["d_out"], case["bias"]
    if kind == "linear":
        layer = nn.Linear(d_in, d_out, bias=bias)
    elif kind == "gpt2":
        layer = Conv1D(d_out, d_in)
    elif kind == "embedding":
        layer = nn.Embedding(d_in + 1, d_out)
    else:
        cls = nn.Conv1d if kind == "conv1d" else nn.Conv2d
        layer = cls(d_in, d_out, case["kernel"], stride=case["stride"], padding=case["padding"],
                    dilation=case["dilation"], bias=bias)
    return randomize(layer).to(case["precision"][0])


def make_input(case) -> torch.Tensor:
    g = torch.Generator().manual_seed(case["seed"] + 1)
    kind, lead, dtype = case["kind"], case["lead"], case["precision"][0]
    if kind == "embedding":
        return torch.randint(0, case["d_in"] + 1, tuple(lead), generator=g)
    if kind in ("linear", "gpt2"):
        return torch.randn(*lead, case["d_in"], generator=g).to(dtype)
    spatial = [case["dilation"] * (k - 1) + 1 + 2 for k in case["kernel"]]
    return torch.randn(lead[0], case["d_in"], *spatial, generator=g).to(dtype)


def inner_length(case) -> int:
    return case["d_in"] * math.prod(case.get("kernel", ()))


def k_for(case, r: int) -> float:
    return 2.0 * (inner_length(case) + r + 8) if case["precision"][0] == torch.float32 else 16.0


def attach_one(case, cfg: dict, name: str = "default", model: AdapterModel | None = None, seed: int = 0):
    torch.manual_seed(seed)
    config = LoraConfig(targets=["layer"], init="random", dtype=case["precision"][1], **cfg)
    if model is None:
        model = attach(Holder(build_layer(case)), config, name)
    else:
        model.add_adapter(name, config)
    perturb_magnitudes(model.model.layer.adapters[name], seed)
    return model


def layer_of(model: AdapterModel) -> AdaptedLayer:
    layer = model.model.layer
    assert isinstance(layer, AdaptedLayer)
    return layer


# =========================================================================== outputs vs the papers
@SETTINGS
@given(case=layer_cases(), data=st.data())
def test_output_matches_paper_equation(case, data):
    """LoRA: W x + b + s·B A x with s = alpha/r (rsLoRA alpha/√r); DoRA: m ⊙ (W + sBA)/‖W + sBA‖_row · x + b."""
    cfg = data.draw(adapter_configs(case["kind"]))
    model = attach_one(case, cfg)
    layer = layer_of(model)
    adapter = adapter_tensors(layer, "default")
    assert adapter["scale"] == pytest.approx(paper_scale(cfg["r"], cfg["alpha"], cfg["rslora"]), rel=1e-12)
    x = make_input(case)
    with torch.no_grad():
        out = model(x)
    base = layer.base_layer
    ref = reference_output(base, x, {**adapter, "scale": paper_scale(cfg["r"], cfg["alpha"], cfg["rslora"])})
    mag = reference_output(base, x, adapter, absolute=True) + reference_output(base, x, None, absolute=True)
    assert out.dtype == case["precision"][0]
    assert_within(out, ref, mag, k_for(case, cfg["r"]), case["precision"][0], f"{case} {cfg}")


def test_dora_differs_from_lora_once_magnitude_moves():
    """Guard against a vacuous DoRA check: with m ≠ ‖W + sBA‖ the DoRA output is not the LoRA one."""
    case = {"kind": "linear", "d_in": 5, "d_out": 4, "bias": True, "precision": PRECISIONS[0], "seed": 3, "lead": [2]}
    model = attach_one(case, dict(r=2, alpha=4.0, rslora=False, dora=True))
    layer = layer_of(model)
    x = make_input(case)
    lora_ref = reference_output(layer.base_layer, x, {**adapter_tensors(layer, "default"), "m": None})
    assert (model(x).double() - lora_ref).abs().max() > 1e-2


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_in_training_uses_one_dropped_input(dora):
    """With dropout, training computes the equation on dropout(x) (one mask; DoRA's W x term sees it too)."""
    case = {"kind": "linear", "d_in": 8, "d_out": 5, "bias": True, "precision": PRECISIONS[0], "seed": 4,
            "lead": [3, 4]}
    model = attach_one(case, dict(r=3, alpha=6.0, rslora=False, dora=dora, dropout=0.5))
    layer = layer_of(model)
    x = make_input(case)
    model.train()
    torch.manual_seed(123)
    out = model(x)
    torch.manual_seed(123)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)   # the mask the layer must have drawn
    tensors = adapter_tensors(layer, "default")
    base, w, b = layer.base_layer, layer.base_layer.weight.double(), layer.base_layer.bias.double()
    if dora:
        # PEFT / paper with dropout: W x + b + (m/n - 1) ⊙ W·drop(x) + (m/n) ⊙ sBA·drop(x)
        v = w + tensors["scale"] * tensors["B"].double() @ tensors["A"].double()
        ratio = tensors["m"].double() / v.norm(dim=1)
        xd = dropped.double()
        ref = x.double() @ w.t() + b + (ratio - 1) * (xd @ w.t()) + ratio * (
            tensors["scale"] * (xd @ tensors["A"].double().t()) @ tensors["B"].double().t())
    else:
        ref = (reference_output(base, x, None)
               + tensors["scale"] * (dropped.double() @ tensors["A"].double().t()) @ tensors["B"].double().t())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():   # and no dropout at all in eval mode
        torch.testing.assert_close(model(x).double(), reference_output(base, x, tensors), rtol=1e-5, atol=1e-5)


# =========================================================================== merging
def weight_delta(layer: AdaptedLayer, name: str) -> torch.Tensor:
    """s·B A in the stored weight's layout, float64, from the raw tensors."""
    t = adapter_tensors(layer, name)
    a, b, s = t["A"].double(), t["B"].double(), t["scale"]
    base = layer.base_layer
    if isinstance(base, nn.Embedding):
        return s * (b @ a).t()
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return s * torch.einsum("or,ri...->oi...", b.flatten(1), a)
    delta = s * b @ a
    return delta.t() if isinstance(base, Conv1D) else delta


@SETTINGS
@given(case=layer_cases(), data=st.data())
def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged(case, data):
    cfg = data.draw(adapter_configs(case["kind"]))
    model = attach_one(case, cfg)
    layer = layer_of(model)
    dtype = case["precision"][0]
    w0 = layer.base_layer.weight.detach().clone()
    x = make_input(case)
    with torch.no_grad():
        unmerged = model(x)
        model.merge()
        assert not torch.equal(layer.base_layer.weight, w0)
        merged = model(x)
        model.unmerge()
    # Restore: W'' = fl(fl(W + ΔW) - ΔW) (DoRA: fl((fl(cW + a) - a)/c), the same bound with ΔW = sBA):
    # at most ~2 roundings of |W| + |ΔW| in the base dtype: fp32 ≈ 2e-7, bf16 ≈ 1.2e-2 of that sum, i.e.
    # a couple of ulps; 4u leaves room for the fp32 intermediate.
    bound = 4 * UNIT_ROUNDOFF[dtype] * (w0.double().abs() + weight_delta(layer, "default").abs()) + 1e-30
    err = (layer.base_layer.weight.double() - w0.double()).abs()
    assert (err <= bound).all(), f"unmerge left an error of {err.max().item():.3g}"
    # Merged output: the same equation with W + ΔW rounded to the base dtype once more.
    mag = (reference_output(layer.base_layer, x, adapter_tensors(layer, "default"), absolute=True)
           + reference_output(layer.base_layer, x, None, absolute=True))
    assert_within(merged, unmerged.double(), mag, 2 * k_for(case, cfg["r"]), dtype, "merged vs unmerged")


def test_switching_adapters_while_merged_unmerges_first():
    model = attach(zoo(), LoraConfig(r=2, init="random", targets=["lin", "gpt2"]), "a")
    model.add_adapter("b", LoraConfig(r=3, init="random", dora=True, targets=["lin", "head"]))
    perturb_magnitudes(model, 4)
    x = zoo_ids()
    with torch.no_grad():
        model.set_active("b")
        b_alone = model(x)
        model.set_active("a")
        model.merge()
        with pytest.warns(UserWarning, match="unmerged"):
            model.set_active("b")
        assert not any(layer.merged for layer in model.adapted_layers().values())
        torch.testing.assert_close(model(x), b_alone, rtol=1e-5, atol=1e-5)   # not a + b
        model.merge()
        model.set_active("b")   # the same active set: stays merged
        assert model.model.head.merged == [("b", 1.0)]


def test_adding_or_loading_an_adapter_while_merged_is_refused(tmp_path):
    model = attach(zoo(), LoraConfig(r=2, init="random", targets=["lin"]), "a")
    model.save(tmp_path)
    model.merge()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        model.add_adapter("b", LoraConfig(r=2, dora=True, targets=["lin"]))
    with pytest.raises(RuntimeError, match="unmerge"):
        loraplex.load(model, tmp_path, name="c")
    assert_same_snapshot(before, snapshot(model))
    model.unmerge()
    model.add_adapter("b", LoraConfig(r=2, dora=True, targets=["lin"]))   # kaiming: B = 0, so b is the identity
    model.set_active("b")
    x = zoo_ids()
    with torch.no_grad():
        with model.disabled():
            base = model(x)
        torch.testing.assert_close(model(x), base, rtol=1e-6, atol=1e-6)


# =========================================================================== disabled()
@SETTINGS
@given(case=layer_cases(), data=st.data())
def test_disabled_is_exactly_the_base_model(case, data):
    cfg = data.draw(adapter_configs(case["kind"]))
    model = attach_one(case, cfg)
    x = make_input(case)
    with torch.no_grad():
        base = layer_of(model).base_layer(x)
        adapted = model(x)
        with model.disabled():
            off = model(x)
    assert torch.equal(off, base)
    assert not torch.equal(adapted, base)
    with torch.no_grad():
        assert torch.equal(model(x), adapted)   # back on after the block


def test_disabled_while_merged_gives_base_and_restores_merge():
    model = attach(zoo(), LoraConfig(r=3, init="random", targets=["lin", "gpt2", "head", "emb", "conv1"]))
    ids = zoo_ids()
    with torch.no_grad():
        with model.disabled():
            base = model(ids)
        adapted = model(ids)
        model.merge()
        with model.disabled():
            off = model(ids)
        merged_again = model(ids)
    torch.testing.assert_close(off, base, rtol=1e-5, atol=1e-5)   # unmerged meanwhile (fp32 rounding)
    torch.testing.assert_close(merged_again, adapted, rtol=1e-5, atol=1e-5)
    assert all(layer.merged for layer in model.adapted_layers().values())


# =========================================================================== weighted combinations
@SETTINGS
@given(case=layer_cases(), data=st.data())
def test_weighted_active_adapters_sum_their_deltas(case, data):
    """set_active([a, b, ...], weights) = base + Σ wᵢ (yᵢ - base), each yᵢ from the paper; merged too."""
    n = data.draw(st.integers(2, 3))
    cfgs = [data.draw(adapter_configs(case["kind"])) for _ in range(n)]
    weights = data.draw(st.lists(st.floats(-1.5, 1.5).filter(lambda w: abs(w) > 0.05), min_size=n, max_size=n))
    model = None
    for i, cfg in enumerate(cfgs):
        model = attach_one(case, cfg, f"a{i}", model, seed=i)
    names = [f"a{i}" for i in range(n)]
    model.set_active(names, weights)
    layer = layer_of(model)
    x = make_input(case)
    base_layer = layer.base_layer
    base_ref = reference_output(base_layer, x, None)
    ref = base_ref.clone()
    mag = reference_output(base_layer, x, None, absolute=True)
    for name, w in zip(names, weights):
        t = adapter_tensors(layer, name)
        ref += w * (reference_output(base_layer, x, t) - base_ref)
        mag = mag + abs(w) * (reference_output(base_layer, x, t, absolute=True)
                              + reference_output(base_layer, x, None, absolute=True))
    k = n * k_for(case, max(c["r"] for c in cfgs))
    dtype = case["precision"][0]
    with torch.no_grad():
        out = model(x)
        assert_within(out, ref, mag, k, dtype, "weighted sum")
        model.merge()
        merged = model(x)
        model.unmerge()
    assert_within(merged, ref, mag, 2 * k, dtype, "merged weighted sum")


# =========================================================================== mixed batches
def mixed_model() -> AdapterModel:
    """Four adapters of different ranks and methods, on different layers of every kind."""
    torch.manual_seed(7)
    model = attach(zoo(), LoraConfig(r=2, alpha=4, init="random", targets=["emb", "lin", "gpt2", "conv1", "conv2",
                                                                           "head"]), "a")
    model.add_adapter("b", LoraConfig(r=4, alpha=3, rslora=True, init="random", targets=["lin", "gpt2", "head",
                                                                                          "conv1"]))
    model.add_adapter("c", LoraConfig(r=3, alpha=5, dora=True, init="random", targets=["lin", "gpt2", "head"]))
    model.add_adapter("d", LoraConfig(r=1, alpha=2, init="random", targets=["lin", "emb"]))
    perturb_magnitudes(model, 1)
    return model


def rows_alone(model: AdapterModel, x: torch.Tensor, ids: list) -> torch.Tensor:
    outs = []
    for i, name in enumerate(ids):
        if name is None:
            with model.disabled():
                outs.append(model(x[i:i + 1]))
        else:
            model.set_active(name)
            outs.append(model(x[i:i + 1]))
    return torch.cat(outs)


ADAPTER_IDS = st.lists(st.sampled_from(["a", "b", "c", "d", None]), min_size=1, max_size=6)


@settings(max_examples=12, deadline=None)
@given(ids=ADAPTER_IDS)
@example(ids=["a", "b", None, "a", "b"])        # the batched low-rank path (plain LoRA only)
@example(ids=["c", None, "a", "b", "d", "c"])   # DoRA in the batch: per-adapter path
def test_mixed_batch_no_grad_equals_each_row_alone(ids):
    model = mixed_model()
    x = zoo_ids(batch=len(ids), seed=len(ids))
    calls = []
    original = AdaptedLayer._batched_low_rank

    def spy(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    AdaptedLayer._batched_low_rank = spy
    try:
        with torch.no_grad():
            mixed = model(x, adapter_ids=ids)
    finally:
        AdaptedLayer._batched_low_rank = original
    if {"a", "b"} <= set(ids) and "c" not in set(ids):
        assert calls, "two plain LoRA adapters in a no-grad batch should take the batched path"
    with torch.no_grad():
        alone = rows_alone(model, x, ids)
    # fp32 on both sides, different summation orders; outputs are O(1), 2e-5 is ~200 ulps.
    torch.testing.assert_close(mixed, alone, rtol=2e-5, atol=2e-5)


@settings(max_examples=8, deadline=None)
@given(ids=ADAPTER_IDS)
@example(ids=["a", "b", None, "c", "d", "a"])
def test_mixed_batch_with_grad_equals_rows_alone_outputs_and_gradients(ids):
    model = mixed_model()
    x = zoo_ids(batch=len(ids), seed=len(ids) + 10)
    g = torch.randn(len(ids), x.shape[1], 13, generator=torch.Generator().manual_seed(5))
    names = ["a", "b", "c", "d"]
    model.set_active(names)   # every adapter trainable
    params = {n: p for n, p in model.named_parameters() if ".adapters." in n}
    mixed = model(x, adapter_ids=ids)
    assert mixed.requires_grad == any(i is not None for i in ids)
    if mixed.requires_grad:
        (mixed * g).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
    for p in params.values():
        p.grad = None
    outs = []
    for i, name in enumerate(ids):
        if name is None:
            with model.disabled():
                outs.append(model(x[i:i + 1]))
            continue
        model.set_active(name)
        out = model(x[i:i + 1])
        (out * g[i:i + 1]).sum().backward()
        outs.append(out)
    torch.testing.assert_close(mixed, torch.cat(outs), rtol=2e-5, atol=2e-5)
    for n, p in params.items():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grads[n], expected, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_mixed_batch_with_modules_to_save_and_unknown_ids():
    torch.manual_seed(0)
    model = attach(zoo(), LoraConfig(r=2, init="random", targets=["lin"], modules_to_save=["head"]), "a")
    model.add_adapter("b", LoraConfig(r=3, init="random", targets=["gpt2"]))
    with torch.no_grad():
        model.model.head.modules_to_save["a"].weight.add_(0.5)   # the saved copy really differs
    ids = ["a", None, "b", "a"]
    x = zoo_ids(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x, adapter_ids=ids), rows_alone(model, x, ids), rtol=2e-5, atol=2e-5)
    with pytest.raises(KeyError, match="nope"):
        model(x, adapter_ids=["a", "nope", None, "b"])
    with pytest.raises(ValueError, match="one adapter id per batch row"):
        model(x, adapter_ids=["a", "b"])


def test_mixed_batch_in_bf16_matches_rows_alone():
    torch.manual_seed(0)
    model = attach(zoo(dtype=torch.bfloat16), LoraConfig(r=2, init="random", dtype="bfloat16",
                                                         targets=["lin", "gpt2", "head"]), "a")
    model.add_adapter("b", LoraConfig(r=4, init="random", dtype="bfloat16", targets=["lin", "head"]))
    model.add_adapter("c", LoraConfig(r=3, init="random", targets=["lin", "gpt2"]))  # fp32 on bf16
    ids = ["a", "b", None, "c", "b"]
    x = zoo_ids(batch=5)
    with torch.no_grad():
        mixed = model(x, adapter_ids=ids)
        alone = rows_alone(model, x, ids)
    # bf16: a handful of roundings of O(1) values through 6 layers; 2^-5 relative is ~4 bf16 ulps.
    torch.testing.assert_close(mixed.float(), alone.float(), rtol=2**-5, atol=2**-5)


# =========================================================================== gradients
def test_fused_function_passes_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    for with_bias in (True, False):
        x = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(5, 4, dtype=torch.float64, generator=g)
        b = torch.randn(5, dtype=torch.float64, generator=g) if with_bias else None
        a = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
        bb = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, a, bb, b=b, w=w: _LoraLinearFunction.apply(x, w, b, a, bb, 0.7),
                                        (x, a, bb))
        # and the value is the equation
        ref = x @ w.t() + (0 if b is None else b) + 0.7 * (x @ a.t()) @ bb.t()
        torch.testing.assert_close(_LoraLinearFunction.apply(x, w, b, a, bb, 0.7), ref)


@settings(max_examples=20, deadline=None)
@given(case=layer_cases(kinds=DORA_KINDS), r=st.integers(1, 5), rslora=st.booleans())
def test_fused_training_path_gradients_match_autograd_on_the_reference(case, r, rslora):
    case = {**case, "precision": PRECISIONS[0]}   # the fused path: adapter, base and input in one dtype
    model = attach_one(case, dict(r=r, alpha=3.0, rslora=rslora))
    model.train()
    layer = layer_of(model)
    x = make_input(case).requires_grad_(True)
    calls = []
    original = _LoraLinearFunction.apply

    def spy(*args):
        calls.append(1)
        return original(*args)

    _LoraLinearFunction.apply = spy
    try:
        out = model(x)
    finally:
        _LoraLinearFunction.apply = original
    assert calls, "a single active LoRA adapter in training should take the fused path"
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    t = adapter_tensors(layer, "default")
    x2 = x.detach().double().requires_grad_(True)
    a2 = t["A"].detach().double().requires_grad_(True)
    b2 = t["B"].detach().double().requires_grad_(True)
    w = layer.base_layer.weight.detach().double()
    w = w.t() if case["kind"] == "gpt2" else w
    bias = layer.base_layer.bias
    ref = x2 @ w.t() + (0 if bias is None else bias.detach().double()) + t["scale"] * (x2 @ a2.t()) @ b2.t()
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in ((x.grad, x2.grad), (t["A"].grad, a2.grad), (t["B"].grad, b2.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert layer.base_layer.weight.grad is None


# =========================================================================== second adapters
SECOND_ADAPTERS = [
    LoraConfig(r=4, init="random", targets=["lin", "gpt2", "conv1"]),
    LoraConfig(r=3, init="random", dora=True, targets=["lin", "head"]),
    LoraConfig(r=2, init="random", targets=["conv2", "emb"], modules_to_save=["conv1"], bias="lora_only"),
    LoraConfig(r=2, init="random", targets="all-linear", bias="all", rank_pattern={"lin": 5}),
]


@pytest.mark.parametrize("second", SECOND_ADAPTERS, ids=["lora", "dora", "modules_to_save", "bias-all"])
def test_a_second_adapter_never_changes_the_first(second):
    torch.manual_seed(0)
    model = attach(zoo(), LoraConfig(r=2, init="random", targets=["emb", "lin", "gpt2", "head"], bias="lora_only"))
    x = zoo_ids()
    with torch.no_grad():
        before_out = model(x)
    before = {f"{p}.{k}": v.detach().clone() for p, layer in model.adapted_layers("default").items()
              for k, v in layer.adapters["default"].state_dict().items()}
    base_before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    trainable_before = {id(p) for p in model.trainable_parameters()}
    model.add_adapter("second", second)
    assert model.active == [("default", 1.0)]
    assert {id(p) for p in model.trainable_parameters()} == trainable_before
    after = {f"{p}.{k}": v for p, layer in model.adapted_layers("default").items()
             for k, v in layer.adapters["default"].state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(x), before_out)
        model.set_active("second")
        assert not torch.equal(model(x), before_out)
        model.set_active("default")
        assert torch.equal(model(x), before_out)
    # the base tensors (wherever they now live) are untouched
    base_after = {k.replace(".base_layer", "").replace(".original_module", ""): v
                  for k, v in model.state_dict().items() if ".adapters." not in k and ".modules_to_save." not in k}
    base_before = {k.replace(".base_layer", ""): v for k, v in base_before.items()}
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[k], v) for k, v in base_before.items())


# =========================================================================== deleting and unloading
def test_delete_adapter_restores_the_original_modules():
    base = zoo().requires_grad_(False)   # as attach leaves it (CPU kernels may differ with requires_grad)
    x = zoo_ids()
    with torch.no_grad():
        expected = base(x)
    original = snapshot(base)
    model = attach(base, LoraConfig(r=2, init="random", targets=["lin", "gpt2", "emb"], modules_to_save=["head"]), "a")
    model.add_adapter("b", LoraConfig(r=3, init="random", dora=True, targets=["lin"], modules_to_save=["conv1"]))
    model.delete_adapter("a")
    # layers only "a" adapted are plain again; shared ones keep "b"
    assert not isinstance(base.gpt2, AdaptedLayer) and not isinstance(base.emb, AdaptedLayer)
    assert isinstance(base.lin, AdaptedLayer) and list(base.lin.adapters) == ["b"]
    assert type(base.head) is nn.Linear and isinstance(base.conv1, SavedModule)
    assert model.adapter_names == ["b"] and model.active == []
    model.delete_adapter("b")
    assert not has_wrappers(base)
    now = snapshot(base)
    assert now["structure"] == original["structure"] and now["modules"] == original["modules"]
    assert all(torch.equal(now["state"][k], v) for k, v in original["state"].items())
    assert now["state"].keys() == original["state"].keys()
    with torch.no_grad():
        assert torch.equal(base(x), expected)
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        model.delete_adapter("a")


def test_merge_and_unload_returns_a_plain_model_with_equal_outputs():
    base = zoo()
    keys = set(base.state_dict())
    model = attach(base, LoraConfig(r=3, init="random", dora=True, targets=["lin", "gpt2"]), "d")
    model.add_adapter("l", LoraConfig(r=2, init="random", targets=["emb", "conv1", "conv2"], modules_to_save=["head"]))
    perturb_magnitudes(model, 3)
    with torch.no_grad():
        model.model.head.modules_to_save["l"].bias.add_(1.0)
    model.set_active(["d", "l"])
    x = zoo_ids()
    with torch.no_grad():
        expected = model(x)
    plain = model.merge_and_unload()
    assert type(plain) is Zoo and not has_wrappers(plain)
    assert set(plain.state_dict()) == keys
    assert all(type(m) in (Zoo, nn.Embedding, nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


# =========================================================================== trainable parameters
def test_trainable_parameters_are_exactly_the_active_adapters_tensors():
    model = attach(zoo(), LoraConfig(r=2, targets=["lin", "gpt2"], bias="lora_only"), "a")
    model.add_adapter("b", LoraConfig(r=3, dora=True, targets=["lin", "head"], modules_to_save=["conv1"]))

    def expected(names):
        out = set()
        for n in names:
            for layer in model.adapted_layers(n).values():
                out |= {id(p) for p in layer.adapters[n].parameters()}
            for m in model.model.modules():
                if isinstance(m, SavedModule) and n in m.modules_to_save:
                    out |= {id(p) for p in m.modules_to_save[n].parameters()}
        if "a" in names:   # bias="lora_only": the biases of a's own layers, not of b's head
            out |= {id(model.model.lin.base_layer.bias), id(model.model.gpt2.base_layer.bias)}
        return out

    got = {id(p) for p in model.trainable_parameters()}
    assert got == expected(["a"])
    assert id(model.model.head.base_layer.bias) not in got
    assert model.trainable_parameter_count() == sum(
        p.numel() for p in model.model.parameters() if id(p) in expected(["a"]))
    model.set_active("b")
    assert {id(p) for p in model.trainable_parameters()} == expected(["b"])
    assert any("magnitude" in n for n in model.named_trainable_parameters())
    model.set_active(["a", "b"])
    assert {id(p) for p in model.trainable_parameters()} == expected(["a", "b"])
    model.delete_adapter("a")
    assert model.active == [("b", 1.0)]
    assert {id(p) for p in model.trainable_parameters()} == expected(["b"])
    model.add_adapter("c", LoraConfig(r=2, targets=["emb"]))
    model.set_active("c")
    assert {id(p) for p in model.trainable_parameters()} == expected(["c"])
    model.delete_adapter("c")
    assert model.trainable_parameters() == []   # nothing active: everything frozen
    assert all(not p.requires_grad for p in model.model.parameters())


# =========================================================================== targeting
def adapted(model: AdapterModel) -> set[str]:
    return set(model.adapted_layers())


def test_all_linear_excludes_the_lm_head():
    gpt2 = attach(tiny_gpt2(), LoraConfig(r=2))
    assert adapted(gpt2) == {n for n, m in tiny_gpt2().named_modules() if isinstance(m, Conv1D)}
    assert "lm_head" not in adapted(gpt2)
    llama = attach(tiny_llama(), LoraConfig(r=2))
    linears = {n for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear)}
    assert adapted(llama) == linears - {"lm_head"} and len(adapted(llama)) == 14
    bert = attach(tiny_bert(classifier=True), LoraConfig(r=2))
    assert "classifier" in adapted(bert)   # a classifier is not an output *embedding*: kept, as in PEFT


def test_targets_by_regex_suffixes_classes_and_exclude():
    def chosen(**kw):
        return adapted(attach(tiny_llama(), LoraConfig(r=2, **kw)))

    assert chosen(targets=r"model\.layers\.0\.self_attn\.[qv]_proj") == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    assert chosen(targets=["q_proj", "mlp.down_proj"]) == {
        f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "mlp.down_proj")}
    assert chosen(targets=[nn.Embedding]) == {"model.embed_tokens"}
    assert chosen(targets=nn.Embedding) == {"model.embed_tokens"}
    assert chosen(targets=[nn.Embedding, "o_proj"]) == {"model.embed_tokens", "model.layers.0.self_attn.o_proj",
                                                        "model.layers.1.self_attn.o_proj"}
    assert chosen(targets="all-linear", exclude=["mlp.down_proj", "up_proj", "gate_proj"]) == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}
    assert chosen(targets="all-linear", exclude=r".*layers\.1\..*") == {
        f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    # a regex must match the whole path: a bare leaf name is not a suffix rule
    with pytest.raises(TargetError):
        chosen(targets="q_proj")


def test_targets_matching_nothing_raise_with_close_names():
    with pytest.raises(TargetError) as err:
        attach(tiny_llama(), LoraConfig(targets=["q_prj", "v_proj_"]))
    message = str(err.value)
    assert "q_proj" in message and "v_proj" in message and "match no module" in message
    with pytest.raises(TargetError, match="cannot be adapted"):
        attach(tiny_llama(), LoraConfig(targets=["input_layernorm"]))
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(TargetError):
        attach(base, LoraConfig(targets=r"model\.layers\.7\..*"))
    assert_same_snapshot(before, snapshot(base))   # a failed attach changes nothing


def test_a_module_is_either_adapted_or_saved_never_both():
    base = zoo()
    model = attach(base, LoraConfig(r=2, targets=["lin", "head"]), "a")
    before = snapshot(base)
    with pytest.raises(TargetError, match="cannot be both adapted and trained in full"):
        model.add_adapter("b", LoraConfig(r=2, targets=["gpt2"], modules_to_save=["head"]))
    model.add_adapter("c", LoraConfig(r=2, targets=["gpt2"], modules_to_save=["conv1"]))
    with pytest.raises(TargetError, match="trained in full for adapter"):
        model.add_adapter("d", LoraConfig(r=2, targets=["conv1", "conv2"]))
    assert model.adapter_names == ["a", "c"]
    model.delete_adapter("c")
    assert_same_snapshot(before, snapshot(base))
    # the same adapter may list a module in both: it is trained in full, not adapted
    model.add_adapter("e", LoraConfig(r=2, targets="all-linear", modules_to_save=["conv1"]))


def test_dora_on_unsupported_layer_says_which():
    with pytest.raises(TargetError, match="emb.*DoRA is supported on Linear"):
        attach(zoo(), LoraConfig(dora=True, targets=["emb", "lin"]))


# =========================================================================== config validation
@pytest.mark.parametrize("kwargs, allowed", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-3), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(r=True), "r must be a positive integer"),
    (dict(alpha=0), "alpha must be a positive number"),
    (dict(alpha=-1.0), "alpha must be a positive number"),
    (dict(alpha=float("nan")), "alpha must be a positive number"),
    (dict(dropout=1.0), "0 <= dropout < 1"),
    (dict(dropout=-0.1), "0 <= dropout < 1"),
    (dict(method="ia3-nope"), "available: .*lora"),
    (dict(targets="model.(q|"), "not a valid regular expression"),
    (dict(exclude="[unclosed"), "not a valid regular expression"),
    (dict(rank_pattern={"(": 4}), "not a valid regular expression"),
    (dict(rank_pattern={"q_proj": 0}), "positive int"),
    (dict(bias="some"), "'none', 'all', 'lora_only'"),
    (dict(init="xavier"), "'kaiming', 'gaussian', 'random'"),
    (dict(dtype="float64"), "'float32', 'bfloat16'"),
    (dict(targets=[]), "targets must name at least one module"),
])
def test_config_validation_says_what_is_allowed(kwargs, allowed):
    with pytest.raises(ConfigError, match=allowed):
        LoraConfig(**kwargs)


def test_valid_configs_and_scales():
    assert LoraConfig(r=16, alpha=32).scale(16, 32) == 2.0
    assert LoraConfig(r=16, alpha=32, rslora=True).scale(16, 32) == 8.0
    cfg = LoraConfig(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.0\..*": 1.0})
    assert cfg.rank_and_alpha("model.layers.0.self_attn.q_proj") == (2, 1.0)
    assert cfg.rank_and_alpha("model.layers.1.self_attn.k_proj") == (4, 8)
    assert loraplex.LoraConfig is LoraConfig and isinstance(ConfigError("x"), ValueError)
