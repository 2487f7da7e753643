"""PMSS (Wang et al. 2024, "PMSS: Pretrained Matrices Skeleton Selection for LLM Fine-tuning",
arXiv 2409.16722).

A skeleton (CUR) decomposition of the pre-trained weight, W ≈ C U₀ R, with C = W[:, J] (d_out x r)
and R = W[I, :] (r x d_in) actual columns and rows of W, frozen, and only the small core U (r x r)
trained:
    J = the first r pivots of QR with column pivoting of W, I = the same for Wᵀ,
    U₀ = C⁺ W R⁺ (the core that best fits W in the Frobenius norm), U initialised to U₀,
    W' = W_res + s · C U R with W_res = W - s · C U₀ R, i.e.
    y = W x + s · C (U - U₀) R x,    s = alpha / r (alpha / sqrt(r) with rslora).
The second form is the one computed: equal in value and gradient, it never rewrites the base layer
and is the identity at the start. Trainable parameters per layer: r². Additive, rank ≤ r,
mergeable; `as_lora` gives A' = (U - U₀) R, B' = s C.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import DecompositionInit, check_init, check_options, check_rank


def pivoted_columns(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the first k pivots of QR with column pivoting (Businger-Golub), deterministic.

    Each step takes the column of largest norm after the span of the columns taken so far is
    projected out (ties: the lowest index); columns already taken are never taken again.
    """
    m = matrix.detach().double().clone()
    taken: list[int] = []
    available = torch.ones(m.shape[1], dtype=torch.bool, device=m.device)
    for _ in range(k):
        norms = (m * m).sum(dim=0).masked_fill(~available, -1.0)
        j = int(torch.argmax(norms))
        taken.append(j)
        available[j] = False
        column = m[:, j]
        length = column.norm()
        if length > 0:
            q = column / length
            m -= torch.outer(q, q @ m)
    return torch.tensor(taken, dtype=torch.long, device=matrix.device)


def skeleton(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C, U₀, R) of W ≈ C U₀ R: r pivoted columns, r pivoted rows, U₀ = C⁺ W R⁺ (float32)."""
    w = weight.detach().double()
    cols, rows = pivoted_columns(w, r), pivoted_columns(w.t(), r)
    c, rr = w[:, cols], w[rows, :]
    core = torch.linalg.pinv(c) @ w @ torch.linalg.pinv(rr)
    return c.float(), core.float(), rr.float()


@register
class PmssAdapter(DecompositionInit, Adapter):
    """PMSS: y = W x + s·C (U - U₀) R x with C, R skeleton columns/rows of W (frozen); the core U trains."""

    method = "pmss"
    paper = ("Wang, Hu, Xu, Liu, Luan, Wang 2024, PMSS: Pretrained Matrices Skeleton Selection for LLM "
             "Fine-tuning (arXiv 2409.16722)")
    serving_form = "low-rank"
    peft_type = "PMSS"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        check_options(config, {})
        self.init = check_init(config)
        check_rank(spec, r)
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        new = {"dtype": config.torch_dtype, "device": spec.base.weight.device}
        self.register_buffer("pmss_C", torch.zeros(spec.out_features, r, **new))
        self.register_buffer("pmss_R", torch.zeros(r, spec.in_features, **new))
        self.register_buffer("pmss_U0", torch.zeros(r, r, **new))
        self.pmss_U = nn.Parameter(torch.zeros(r, r, **new))

    def initialise(self, spec: LayerSpec) -> None:
        """C, R: skeleton columns and rows of W; U = U₀ = C⁺ W R⁺."""
        c, core, rows = skeleton(spec.weight, self.r)
        self.pmss_C.copy_(c)
        self.pmss_R.copy_(rows)
        self.pmss_U0.copy_(core)
        if self.init == "zeros":
            self.pmss_U.zero_()       # the adapter then removes the skeleton part: W' = W_res
        elif self.init == "random":  # a non-trivial adapter, for tests
            self.pmss_U.copy_(core + torch.randn(self.r, self.r) * (core.abs().mean() + 1e-3))
        else:
            self.pmss_U.copy_(self.pmss_U0)

    # --- the math ---
    def core_change(self) -> torch.Tensor:
        """U - U₀ (trainable core minus its frozen initial value)."""
        return self.pmss_U - self.pmss_U0

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.pmss_U.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = (x @ self.pmss_R.t()) @ self.core_change().t()
        return (h @ self.pmss_C.t() * self.scale).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        return self.pmss_C.float() @ self.core_change().float() @ self.pmss_R.float() * self.scale

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.core_change().detach().float() @ self.pmss_R.float(), self.pmss_C.float() * self.scale)

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"pmss_C": self.pmss_C, "pmss_R": self.pmss_R, "pmss_U": self.pmss_U, "pmss_U0": self.pmss_U0}

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}"
