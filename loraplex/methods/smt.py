"""SMT, Sparse Matrix Tuning (He et al. 2024, "SMT: Fine-Tuning Large Language Models with Sparse
Matrices", arXiv 2405.15525; ICLR 2025).

Only a few b x b sub-matrices (blocks) of the pre-trained weights train: those where the gradient
of the loss is largest over a few calibration batches.
    G = mean over the batches of ∂L/∂W for every adapted W (the bare base model's loss),
    score(block) = |mean of G over the block|   (the reference code's "mean_abs"; also "abs_mean",
                   "l1", "l2"),
    the n_blocks best-scoring blocks over ALL adapted layers are selected (ties: layer order, then
    row, then column), and for each selected block (i, j) of a layer
    W'[i b:(i+1) b, j b:(j+1) b] = W[...] + D_ij,   D_ij (b x b) trainable, zero at the start.
So y = W x + ΔW x with ΔW the block-sparse matrix of the D_ij; the forward gathers the selected
input blocks and scatters the b-sized outputs, never forming ΔW. Mergeable.

`calibrate(model, name, batches)` does the selection (deterministic: the model runs in eval mode);
without calibration an adapter holds no blocks and trains nothing. The chosen block coordinates are
saved with the blocks (`smt_index`, `smt_blocks`), so loading needs no data.
Options: block_size (b; default "auto": the largest power of two ≤ 256 dividing every adapted
layer's d_in and d_out), n_blocks (default: as many blocks as a rank-r LoRA on the same layers has
parameters, Σ r (d_in + d_out) / b², at least 1), score ("mean_abs").
Trainable parameters: n_blocks · b² in all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import base_weight_gradients, check_init, check_options

log = logging.getLogger("loraplex")
SCORES = ("mean_abs", "abs_mean", "l1", "l2")
MAX_AUTO_BLOCK = 256


def auto_block_size(dims: Iterable[int]) -> int:
    """The largest power of two ≤ 256 dividing every dimension."""
    b = MAX_AUTO_BLOCK
    dims = list(dims)
    while b > 1 and any(d % b for d in dims):
        b //= 2
    return b


def block_scores(grad: torch.Tensor, b: int, score: str) -> torch.Tensor:
    """Score of every b x b block of a (d_out x d_in) gradient: (d_out / b, d_in / b)."""
    blocks = grad.reshape(grad.shape[0] // b, b, grad.shape[1] // b, b)
    if score == "mean_abs":
        return blocks.mean(dim=(1, 3)).abs()
    if score == "abs_mean":
        return blocks.abs().mean(dim=(1, 3))
    if score == "l1":
        return blocks.abs().sum(dim=(1, 3))
    return blocks.pow(2).sum(dim=(1, 3)).sqrt()


@register
class SmtAdapter(Adapter):
    """SMT: trainable deltas D_ij on the b x b blocks of W with the largest calibration-gradient scores."""

    method = "smt"
    paper = ("He, Li, Wang, Hu, Yu, Wang, Jiang, Zhang 2024, SMT: Fine-Tuning Large Language Models with Sparse "
             "Matrices (arXiv 2405.15525)")
    serving_form = "merged only"
    peft_type = "SMT"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)
    option_defaults: dict[str, object] = {"block_size": "auto", "n_blocks": None, "score": "mean_abs"}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        o = self.options(config)
        check_init(config, ("kaiming", "zeros"))     # the blocks' deltas always start at zero
        self.d_in, self.d_out = spec.in_features, spec.out_features
        b = o["block_size"]
        if b != "auto" and (self.d_in % b or self.d_out % b):
            raise ValueError(f"option block_size={b} must divide d_in={self.d_in} and d_out={self.d_out}; "
                             "use block_size='auto'")
        self.block_size = auto_block_size([self.d_in, self.d_out]) if b == "auto" else b
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        device = spec.base.weight.device
        # No blocks until `calibrate` (or loading) chooses them.
        self.register_buffer("smt_index", torch.zeros(0, 2, dtype=torch.long, device=device))
        self.smt_blocks = nn.Parameter(torch.zeros(0, self.block_size, self.block_size, device=device,
                                                   dtype=config.torch_dtype))

    @classmethod
    def options(cls, config) -> dict:
        o = check_options(config, cls.option_defaults)
        b = o["block_size"]
        if b != "auto" and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"option block_size must be 'auto' or a positive integer, got {b!r}")
        n = o["n_blocks"]
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"option n_blocks must be a positive integer (or null: a rank-r LoRA's budget), got {n!r}")
        if o["score"] not in SCORES:
            raise ValueError(f"option score must be one of {SCORES}, got {o['score']!r}")
        return o

    # --- the selection ---
    def set_blocks(self, index: torch.Tensor, block_size: int, values: torch.Tensor | None = None) -> None:
        """Train the blocks at `index` ((k, 2) block row, block column), starting from `values` (or 0)."""
        with torch.no_grad():
            trainable = self.smt_blocks.requires_grad
            device, dtype = self.smt_blocks.device, self.smt_blocks.dtype
            self.block_size = block_size
            self.smt_index = index.to(device=device, dtype=torch.long)
            blocks = torch.zeros(len(index), block_size, block_size, device=device, dtype=dtype)
            if values is not None:
                blocks.copy_(values)
            self.smt_blocks = nn.Parameter(blocks, requires_grad=trainable)

    @classmethod
    def calibrate(cls, model, name: str, batches: Iterable) -> None:
        """Select the n_blocks blocks with the largest gradient scores over all adapted layers."""
        start = time.perf_counter()
        config = model.configs[name]
        o = cls.options(config)
        layers = model.adapted_layers(name)
        adapters = {path: layer.adapters[name] for path, layer in layers.items()}
        b = o["block_size"]
        if b == "auto":
            b = auto_block_size(d for a in adapters.values() for d in (a.d_in, a.d_out))
        n = o["n_blocks"]
        if n is None:   # a rank-r LoRA's parameter count on the same layers
            n = max(1, sum(a.r * (a.d_in + a.d_out) for a in adapters.values()) // (b * b))
        grads, count = base_weight_gradients(model, name, batches)
        scores, owners = [], []
        for k, path in enumerate(adapters):
            s = block_scores(grads[path].float(), b, o["score"])
            rows, cols = torch.meshgrid(torch.arange(s.shape[0]), torch.arange(s.shape[1]), indexing="ij")
            scores.append(s.flatten().cpu())
            owners.append(torch.stack([torch.full_like(rows.flatten(), k), rows.flatten(), cols.flatten()], dim=1))
        scores, owners = torch.cat(scores), torch.cat(owners)
        order = torch.sort(-scores, stable=True).indices[: min(n, len(scores))]   # ties keep (layer, row, col) order
        chosen = owners[order]
        for k, adapter in enumerate(adapters.values()):
            mine = chosen[chosen[:, 0] == k][:, 1:]
            mine = mine[torch.argsort(mine[:, 0] * (adapter.d_in // b) + mine[:, 1])]
            adapter.set_blocks(mine, b)
        log.info("smt: chose %d blocks of %dx%d over %d layers of adapter %r from %d calibration batches in %.2f s",
                 len(chosen), b, b, len(adapters), name, count, time.perf_counter() - start)

    # --- the math ---
    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        b, index = self.block_size, self.smt_index
        out = torch.zeros(*x.shape[:-1], self.d_out // b, b, device=x.device, dtype=self.smt_blocks.dtype)
        if len(index) == 0:
            return out.flatten(-2).to(base_out.dtype)
        x = x.to(self.smt_blocks.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        inputs = x.reshape(*x.shape[:-1], self.d_in // b, b).index_select(-2, index[:, 1])   # (..., k, b)
        outputs = torch.einsum("...kc,krc->...kr", inputs, self.smt_blocks)                    # D_ij x_j
        return out.index_add(-2, index[:, 0], outputs).flatten(-2).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        b = self.block_size
        update = torch.zeros(self.d_out // b, b, self.d_in // b, b, device=self.smt_blocks.device)
        update[self.smt_index[:, 0], :, self.smt_index[:, 1], :] = self.smt_blocks.float()
        return update.reshape(self.d_out, self.d_in)

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"smt_blocks": self.smt_blocks, "smt_index": self.smt_index}

    def from_peft(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """The number of blocks (and their size) comes from the file: resize, check, then copy."""
        missing = sorted({"smt_blocks", "smt_index"} - set(tensors))
        if missing:
            raise KeyError(f"{where}: missing key(s) {', '.join(missing)}")
        unexpected = sorted(set(tensors) - {"smt_blocks", "smt_index"})
        if unexpected:
            raise KeyError(f"{where}: unexpected key(s) {', '.join(unexpected)}")
        blocks, index = tensors["smt_blocks"], tensors["smt_index"]
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2] or blocks.shape[1] < 1:
            raise ValueError(f"{where}.smt_blocks: expected (k, b, b) blocks, got shape {tuple(blocks.shape)}")
        b = blocks.shape[1]
        if self.d_in % b or self.d_out % b:
            raise ValueError(f"{where}.smt_blocks: block size {b} does not divide this layer's "
                             f"{self.d_out} x {self.d_in} weight")
        if index.dtype.is_floating_point or tuple(index.shape) != (blocks.shape[0], 2):
            raise ValueError(f"{where}.smt_index: expected ({blocks.shape[0]}, 2) integer block coordinates, "
                             f"got {index.dtype} {tuple(index.shape)}")
        if len(index) and (index.min() < 0 or index[:, 0].max() >= self.d_out // b or index[:, 1].max() >= self.d_in // b):
            raise ValueError(f"{where}.smt_index: block coordinates outside the {self.d_out // b} x {self.d_in // b} grid")
        if len(index) and len({tuple(p) for p in index.tolist()}) != len(index):
            raise ValueError(f"{where}.smt_index: a block is listed twice")
        self.set_blocks(index, b, blocks)

    def extra_repr(self) -> str:
        return f"blocks={len(self.smt_index)}, block_size={self.block_size}"
