"""Shared pieces of the core tests (test_core_math, test_core_files, test_peft_parity).

Tiny models built in-process (no model files), model snapshots to prove "left exactly as it was",
and the reference equations of LoRA / rsLoRA / DoRA written from the papers, independently of
`loraplex.methods.lora`: everything is recomputed in float64 from the adapter's raw tensors.

Helpers are plain functions; test modules import them with `from conftest import ...` (pytest puts
`tests/` on `sys.path`, as `tests/tiny.py` relies on too).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraplex.core.layers import AdaptedLayer, SavedModule

VOCAB = 13
HF_VOCAB = 40

# Unit roundoff (half an ulp at 1) of each dtype the tests compute in.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


# --------------------------------------------------------------------------- tiny models
class Zoo(nn.Module):
    """One layer of every kind loraplex adapts, chained: Embedding, Linear, GPT-2 Conv1D, Conv1d, Conv2d."""

    def __init__(self, d: int = 6, vocab: int = VOCAB) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)
        self.gpt2 = Conv1D(d, d)  # transformers' Conv1D(nf=out, nx=in), weight stored (in, out)
        self.conv1 = nn.Conv1d(d, d, 3, padding=1)
        self.conv2 = nn.Conv2d(d, d, (3, 1), padding=(1, 0))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(self.emb(ids)))
        h = torch.tanh(self.gpt2(h)).transpose(1, 2)             # (B, d, T)
        h = torch.tanh(self.conv1(h))
        h = self.conv2(h.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return self.head(h)


def randomize(module: nn.Module, std: float = 0.5) -> nn.Module:
    """O(1) weights and non-zero biases everywhere, so no term of an equation is negligible."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def zoo(seed: int = 0, dtype: torch.dtype = torch.float32) -> Zoo:
    torch.manual_seed(seed)
    return randomize(Zoo()).to(dtype).eval()


def zoo_ids(batch: int = 4, seq: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=HF_VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_inner=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, classifier: bool = False):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=HF_VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.2, num_labels=3)
    cls = BertForSequenceClassification if classifier else BertModel
    return cls(config).eval()


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=HF_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def hf_ids(batch: int = 3, seq: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, HF_VOCAB, (batch, seq), generator=g)


DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine each op can wait tens of
    milliseconds for a descheduled OpenMP worker; run them on one thread (restored afterwards)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(DEFAULT_THREADS)


@pytest.fixture
def all_threads():
    """Real models do gain from threads: undo `one_thread` for one test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_THREADS)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- snapshots
def snapshot(module: nn.Module) -> dict:
    """Everything "left exactly as it was" compares: structure, every tensor, requires_grad flags."""
    return {
        "structure": [(name, type(m).__name__) for name, m in module.named_modules()],
        "modules": {name: id(m) for name, m in module.named_modules()},
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in module.named_parameters()},
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert after["structure"] == before["structure"]
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"
    assert after["grad"] == before["grad"]


def has_wrappers(module: nn.Module) -> bool:
    return any(isinstance(m, (AdaptedLayer, SavedModule)) for m in module.modules())


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def perturb_magnitudes(module: nn.Module, seed: int = 0) -> None:
    """DoRA starts as the identity of LoRA (m = ‖W + sBA‖); scale m so the decomposition matters.

    Works on loraplex (`magnitude`) and PEFT (`lora_magnitude_vector`) models alike.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "magnitude" in name:
                p.mul_((0.5 + torch.rand(p.shape, generator=g)).to(p.dtype))


# --------------------------------------------------------------------------- reference equations
def _base_weight(base: nn.Module) -> torch.Tensor:
    """The base weight in (out, in, ...) layout, float64 (GPT-2's Conv1D stores it transposed)."""
    w = base.weight.detach().double()
    return w.t() if isinstance(base, Conv1D) else w


def _bias(base: nn.Module) -> torch.Tensor | None:
    b = getattr(base, "bias", None)
    return None if b is None else b.detach().double()


def reference_output(base: nn.Module, x: torch.Tensor, adapter: dict | None, absolute: bool = False) -> torch.Tensor:
    """The paper's output of one layer with one adapter (or none), in float64.

    adapter: {"A", "B", "scale", "m" (DoRA magnitude or None)} raw tensors.
      Linear / GPT-2 Conv1D:  y = W x + b + s·B A x;  DoRA: y = m ⊙ (W + sBA)/‖W + sBA‖_row · x + b
      Embedding (A: r x vocab, B: dim x r):  y = (E + s·(B A)ᵀ)[ids]
      Conv (A: r x in x k..., B: out x r x 1...):  y = conv(x, W + s·B A) + b, same stride/padding/dilation
    absolute=True evaluates the same expression on absolute values: the magnitude that bounds the
    rounding error of any evaluation order (|fl(Σ aᵢbᵢ) - Σ aᵢbᵢ| ≤ γₙ Σ|aᵢbᵢ|).
    """
    f = (lambda t: t.abs()) if absolute else (lambda t: t)
    w, b = f(_base_weight(base)), _bias(base)
    b = None if b is None else f(b)
    a_, b_, s, m = (None, None, 0.0, None) if adapter is None else (
        adapter["A"].detach().double(), adapter["B"].detach().double(), adapter["scale"], adapter.get("m"))
    if isinstance(base, nn.Embedding):
        if a_ is not None:
            w = w + s * (f(b_) @ f(a_)).t()   # ΔW = s (B A)ᵀ, stored (vocab, dim) like E
        return F.embedding(x, w)
    xd = f(x.detach().double())
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        delta = 0.0 if a_ is None else s * torch.einsum("or,ri...->oi...", f(b_).flatten(1), f(a_))
        conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
        return conv(xd, w + delta, b, base.stride, base.padding, base.dilation)
    if a_ is None:
        y = xd @ w.t()
    elif m is None:
        y = xd @ w.t() + s * (xd @ f(a_).t()) @ f(b_).t()
    else:
        v = _base_weight(base) + s * b_ @ a_                 # W + sBA, signed (the norm is of the real matrix)
        n = v.norm(dim=1)
        ratio = m.detach().double() / n
        y = (xd @ f(v).t()) * ratio if not absolute else (xd @ (w + s * f(b_) @ f(a_)).t()) * ratio.abs()
    return y if b is None else y + b


def adapter_tensors(layer: AdaptedLayer, name: str) -> dict:
    a = layer.adapters[name]
    return {"A": a.lora_A, "B": a.lora_B, "scale": a.scale, "m": getattr(a, "magnitude", None) if a.use_dora else None}


def paper_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def assert_within(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, k: float, dtype: torch.dtype,
                  what: str = "") -> None:
    """|out - ref| ≤ k · u(dtype) · magnitude + tiny, elementwise (see `reference_output(absolute=True)`)."""
    err = (out.double() - ref).abs()
    bound = k * UNIT_ROUNDOFF[dtype] * magnitude + 1e-12
    worst = (err - bound).max()
    assert worst <= 0, (f"{what}: error exceeds the rounding bound by {worst.item():.3g} "
                        f"(max err {err.max().item():.3g}, max magnitude {magnitude.max().item():.3g})")
