"""Shared pieces of the method tests (tests/test_method_*.py).

Tiny models and seeded inputs, seeded perturbations of an adapter's trainable tensors, the float64
reference of a base model with given weight changes, and the checks every method repeats: the adapter
starts as the base, merge/unmerge, the save/load round trip and mixed batches. Each method's own
equations, shapes and tolerances stay in its test file and are passed in here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from conftest import HF_VOCAB, hf_ids, randomize
from torch import nn
from transformers.pytorch_utils import Conv1D

import loraplex
from loraplex.core.layers import AdaptedLayer

MIXED_IDS = ("a", "b", None, "b", "a")


# --------------------------------------------------------------------------- tiny models
class TwoLayerNet(nn.Module):
    """`lin` Linear (d_in -> d_mid), `gpt2` GPT-2 Conv1D (d_mid -> d_out), then a plain `head` (d_out -> 5).

    linear=True puts an nn.Linear in place of the Conv1D; bias=False drops the biases of both adapted layers.
    """

    def __init__(self, d_in: int, d_mid: int, d_out: int, *, linear: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_mid, bias=bias)
        self.gpt2 = nn.Linear(d_mid, d_out, bias=bias) if linear else Conv1D(d_out, d_mid)
        self.head = nn.Linear(d_out, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.gpt2(torch.tanh(self.lin(x)))))


class Block(nn.Module):
    """Three adapted layers of three shapes: Linear 8->8, Linear 8->16, GPT-2 Conv1D 16->8."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.up = nn.Linear(8, 16)
        self.down = Conv1D(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(torch.tanh(self.q(x)))))


class BlockNet(nn.Module):
    """`blocks` residual blocks (8 features in and out) in `blocks.<i>`, then a plain head (8 -> 5)."""

    def __init__(self, blocks: int = 3, block: Callable[[], nn.Module] = Block) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([block() for _ in range(blocks)])
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def seeded_model(build: Callable[[], nn.Module], seed: int = 0, std: float = 0.5) -> nn.Module:
    """build() after torch.manual_seed(seed), every parameter drawn from N(0, std²), in eval mode."""
    torch.manual_seed(seed)
    return randomize(build(), std=std).eval()


def two_layer_net(d_in: int, d_mid: int, d_out: int, seed: int = 0, **kw) -> TwoLayerNet:
    """A seeded `TwoLayerNet(d_in, d_mid, d_out, **kw)` with N(0, 0.5²) weights and biases."""
    return seeded_model(lambda: TwoLayerNet(d_in, d_mid, d_out, **kw), seed)


def two_layer_linear_net(d_in: int, d_mid: int, d_out: int, seed: int = 0) -> TwoLayerNet:
    """`two_layer_net` with an nn.Linear swapped in for the Conv1D after construction, for PEFT methods that adapt
    nn.Linear only (the weights differ from `two_layer_net(..., linear=True)`'s: the Conv1D drew from the RNG)."""
    def build() -> TwoLayerNet:
        model = TwoLayerNet(d_in, d_mid, d_out)
        model.gpt2 = nn.Linear(d_mid, d_out)
        return model
    return seeded_model(build, seed)


def make_net(seed: int = 0, blocks: int = 3, block: Callable[[], nn.Module] = Block) -> BlockNet:
    """A seeded `BlockNet` with N(0, 0.4²) weights and biases."""
    return seeded_model(lambda: BlockNet(blocks, block), seed, std=0.4)


# --------------------------------------------------------------------------- inputs and perturbations
def x_in(d: int = 10, seed: int = 2, rows: int = 4) -> torch.Tensor:
    """(rows, d) standard-normal input from its own generator."""
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def x_seq(seed: int = 3, rows: int = 4, tokens: int = 5, d: int = 8) -> torch.Tensor:
    """(rows, tokens, d) standard-normal input from its own generator (defaults: a `BlockNet` input)."""
    return torch.randn(rows, tokens, d, generator=torch.Generator().manual_seed(seed))


def perturb(model, seed: int = 1, std: float = 1.0, fan_in: bool = False) -> None:
    """Overwrite every trainable tensor with N(0, std²) draws, or N(0, 1/last dim) with fan_in=True."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            draw = torch.randn(p.shape, generator=g)
            p.copy_(draw / p.shape[-1] ** 0.5 if fan_in else std * draw)


def perturb_both(model, seed_b: int = 5, using: Callable | None = None, **kw) -> None:
    """Perturb the active adapter (seed 1), then make "b" active and perturb it with seed_b; `using` is the
    perturbation (default `perturb`, given **kw)."""
    using = perturb if using is None else using
    using(model, **kw)
    model.set_active("b")
    using(model, seed=seed_b, **kw)


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.3,
                       names: tuple[str, ...] = ("lora_A", "lora_B")) -> None:
    """Add N(0, std²) draws to every parameter whose name contains one of `names` (loraplex or PEFT models)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.add_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------- float64 references
def out_in(module: nn.Module) -> torch.Tensor:
    """A module's weight in (out, in) layout, float64 (GPT-2's Conv1D stores it as (in, out))."""
    w = module.weight.detach().double()
    return w.t() if isinstance(module, Conv1D) else w


def base_weight(layer: AdaptedLayer) -> torch.Tensor:
    """The adapted layer's base weight W in (out, in) layout, float64."""
    return out_in(layer.base_layer)


def linear_reference(layer: AdaptedLayer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = weight x + b in float64, with b the bias of the layer's base layer."""
    return x.double() @ weight.t() + layer.base_layer.bias.detach().double()


def reference_with_deltas(base: nn.Module, x: torch.Tensor, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model in float64 with each layer's weight W + ΔW (ΔW in (out, in) layout)."""
    ref = copy.deepcopy(base).double()
    with torch.no_grad():
        for path, delta in deltas.items():
            layer = ref.get_submodule(path)
            layer.weight += delta.t() if isinstance(layer, Conv1D) else delta
    return ref(x.double())


def calibration_batches(n: int = 3) -> list[dict]:
    """n batches of 2 x 6 tokens for the tiny HF models, the first two positions unsupervised."""
    out = []
    for i in range(n):
        ids = hf_ids(batch=2, seq=6, seed=10 + i)
        labels = ids.clone()
        labels[:, :2] = -100                     # prompt positions are not supervised
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def mean_weight_gradients(model: nn.Module, batches: list[dict], paths: list[str]) -> dict[str, torch.Tensor]:
    """Mean over batches of ∂L/∂W (next-token cross-entropy) of a GPT-2 model's Conv1D weights, (d_out, d_in)."""
    weights = [model.get_submodule(p).weight for p in paths]
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, HF_VOCAB), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)
        for total, g in zip(sums, torch.autograd.grad(loss, weights)):
            total += g
    return {p: (s / len(batches)).t().double() for p, s in zip(paths, sums)}  # GPT-2 Conv1D: (in, out)


def must_not_run(what: str) -> Callable:
    """A stand-in for a decomposition that loading saved tensors must not recompute."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} ran while loading saved tensors")
    return refuse


# --------------------------------------------------------------------------- checks
def _output(model, x, logits: bool) -> torch.Tensor:
    out = model(x)
    return out.logits if logits else out


def check_starts_as_base(model, x: torch.Tensor, rtol: float = 0.0, atol: float = 0.0) -> None:
    """The adapted model's output on x equals the bare base's (adapters disabled)."""
    with model.disabled():
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=rtol, atol=atol)


def check_merge_unmerge(model, x: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                        restore_atol: float = 1e-6, only: str | None = None, logits: bool = False,
                        while_merged: Callable[[], None] | None = None) -> torch.Tensor:
    """Merged output equals unmerged (rtol, atol), and unmerge restores every base-model tensor (those whose
    state-dict key contains `only`, if given) to restore_atol. while_merged() runs between merge and unmerge.
    Returns the unmerged output."""
    before = {k: v.clone() for k, v in model.model.state_dict().items() if only is None or only in k}
    unmerged = _output(model, x, logits)
    model.merge()
    if while_merged is not None:
        while_merged()
    torch.testing.assert_close(_output(model, x, logits), unmerged, rtol=rtol, atol=atol)
    model.unmerge()
    after = model.model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=restore_atol, msg=key)
    if only is None:
        assert after.keys() == before.keys()
    return unmerged


def check_save_load(model, make_base: Callable[[], nn.Module], x: torch.Tensor, path: Path, *,
                    as_lora: bool = False, peft_type: str | None = None, rtol: float = 0.0, atol: float = 0.0,
                    eval_loaded: bool = False, logits: bool = False):
    """Save `model` (as a plain LoRA with as_lora=True) to path, load the file onto make_base(), and check the
    loaded output on x equals the saved model's (rtol, atol) and, if given, the file's peft_type.

    Returns (loaded model, adapter_config.json as a dict).
    """
    expected = _output(model, x, logits)
    model.save(path, as_lora=as_lora)
    data = json.loads((path / "adapter_config.json").read_text())
    if peft_type is not None:
        assert data["peft_type"] == peft_type, f"peft_type {data['peft_type']!r}, expected {peft_type!r}"
    loaded = loraplex.load(make_base(), path)
    if eval_loaded:
        loaded.eval()
    torch.testing.assert_close(_output(loaded, x, logits), expected, rtol=rtol, atol=atol)
    return loaded, data


def assert_rows_match_alone(model, x, ids, mixed, rtol: float = 1e-5, atol: float = 1e-6,
                            logits: bool = False) -> None:
    """Row i of a mixed-batch output `mixed` equals row i run alone with adapter ids[i] (None: bare base)."""
    for i, name in enumerate(ids):
        if name is None:
            with model.disabled():
                row = _output(model, x[i:i + 1], logits)
        else:
            model.set_active(name)
            row = _output(model, x[i:i + 1], logits)
        torch.testing.assert_close(mixed[i:i + 1], row, rtol=rtol, atol=atol, msg=f"row {i}")


def check_mixed_batch(model, x: torch.Tensor, ids: Sequence[str | None] = MIXED_IDS, *, rtol: float = 1e-5,
                      atol: float = 1e-6, logits: bool = False, no_grad: bool = False) -> None:
    """One batch mixing adapters (row i with ids[i], None: bare base; by default a, b, None, b, a) equals each
    row run alone.

    no_grad=True runs both without autograd, the serving path (batched low-rank products where possible).
    """
    with torch.set_grad_enabled(not no_grad):
        mixed = model(x, adapter_ids=list(ids))
        mixed = mixed.logits if logits else mixed
        assert_rows_match_alone(model, x, ids, mixed, rtol=rtol, atol=atol, logits=logits)


def check_peft_round_trip(theirs, make_base: Callable[[], nn.Module], run: Callable[[nn.Module], torch.Tensor],
                          path: Path, *, rtol: float = 1e-5, atol: float = 1e-5, changed: float = 1e-2):
    """A PEFT model's saved file loads in loraplex on make_base() with PEFT's output, and loraplex's re-save of it
    loads back in PEFT with that output too. run(model) is the output compared; the adapter must move it by more
    than `changed` from the bare base. Returns the loraplex model."""
    expected = run(theirs)
    theirs.save_pretrained(path / "peft")
    ours = loraplex.load(make_base(), path / "peft").eval()
    assert (expected - run(make_base())).abs().max() > changed
    torch.testing.assert_close(run(ours), expected, rtol=rtol, atol=atol)
    ours.save(path / "ours")
    back = peft.PeftModel.from_pretrained(make_base(), str(path / "ours")).eval()
    torch.testing.assert_close(run(back), expected, rtol=rtol, atol=atol)
    return ours


def check_gpt2_gradients(model, tensors: int, count: int) -> None:
    """One LM loss on tiny GPT-2 gives every trainable tensor a gradient; there are `tensors` of them holding
    `count` numbers."""
    ids = hf_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    params = model.named_trainable_parameters()
    assert len(params) == tensors and all(p.grad is not None for p in params.values())
    assert model.trainable_parameter_count() == count


def check_gpt2_trains_and_merges(model, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """On tiny GPT-2: every trainable tensor gets a gradient, and the merged logits equal the unmerged."""
    ids = hf_ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    model.merge()
    torch.testing.assert_close(model(ids).logits, out.logits.detach(), rtol=rtol, atol=atol)
