"""Gated, rank-masked LoRA: the adapter the dynamic-rank recipes train over a fixed maximum rank R.

    y = W x + s · B diag(m ⊙ γ(g)) A x,        A: R x d_in, B: d_out x R, s = alpha / R

m ∈ {0, 1}^R is a rank mask (a buffer: recipes switch ranks off and on without replacing parameters,
so the optimizer keeps holding the same tensors); g ∈ R^R is an optional trainable gate and γ is
  * "none":    γ(g) = 1 (no gate; masks only: ALoRA, IncreLoRA, PRILoRA, dynamic-rank DoRA),
  * "linear":  γ(g) = g (SoRA's gate, Ding et al. 2023, "Sparse Low-rank Adaptation of Pre-trained
               Language Models": h = s B (g ⊙ A x), g trained by a proximal L1 step),
  * "softmax": γ(g) = softmax(g) over the unmasked ranks (AutoLoRA's selection variables, Zhang et al.
               2024, "AutoLoRA: Automatically Tuning Matrix Ranks in Low-Rank Adaptation Based on Meta
               Learning": ΔW = Σ_j α_j B_j A_j with α = softmax(g), Σ_j α_j = 1).
DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation") truncates: with `active_rank = k` only the first k ranks are used and
s = alpha / k, so the adapter at rank k IS a rank-k LoRA (A[:k], B[:, :k]); `train_last_only` detaches
ranks 0..k-2 (DyLoRA's "frozen" mode: only rank k-1 gets a gradient).

Options: gate ("none" | "linear" | "softmax"), gate_init (a number, or "randn" as SoRA's code),
init_rank (ranks unmasked at the start, default R), track_inputs (keep Σ x_j² over training tokens,
PRILoRA's input statistic). `as_lora` drops masked and zero-gated ranks and folds gates and scale into
the factors, so any state saves as a plain LoRA with per-layer ranks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora_xs import check_init, check_options

GATES = ("none", "linear", "softmax")
DEFAULTS = {"gate": "none", "gate_init": None, "init_rank": None, "track_inputs": False}


@register
class GatedLoraAdapter(Adapter):
    """LoRA over a maximum rank R with a rank mask, an optional gate and DyLoRA truncation."""

    method = "gated-lora"
    paper = "LoRA with rank masks and gates (SoRA, AutoLoRA, DyLoRA, AdaLoRA-style allocators)"
    serving_form = "low-rank after conversion"
    peft_type = "GATED_LORA"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        super().__init__(spec, r, alpha, config)
        options = check_options(config, DEFAULTS)
        gate = options["gate"]
        if gate not in GATES:
            raise ValueError(f"option gate must be one of {GATES}, got {gate!r}")
        init_rank = r if options["init_rank"] is None else options["init_rank"]
        if not isinstance(init_rank, int) or isinstance(init_rank, bool) or not 0 <= init_rank <= r:
            raise ValueError(f"option init_rank must be an integer in [0, r={r}], got {init_rank!r}")
        init = check_init(config, ("kaiming", "gaussian", "random"))
        self.config = config
        self.gate_mode = gate
        self.active_rank: int | None = None   # DyLoRA truncation (None: every rank)
        self.train_last_only = False
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        d_in, d_out = spec.in_features, spec.out_features
        if init == "gaussian":
            a = torch.randn(r, d_in) / r
        else:  # kaiming_uniform_(a=sqrt(5)): bound 1/sqrt(d_in), as LoRA
            a = torch.empty(r, d_in).uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in))
        b = (torch.empty(d_out, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r)) if init == "random"
             else torch.zeros(d_out, r))
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))
        mask = torch.zeros(r, device=device)
        mask[:init_rank] = 1.0
        self.register_buffer("rank_mask", mask)
        if gate != "none":
            g0 = options["gate_init"]
            if g0 is None:
                g0 = 1.0 if gate == "linear" else 0.0
            if g0 == "randn":
                g = torch.randn(r)
            elif isinstance(g0, (int, float)) and not isinstance(g0, bool) and math.isfinite(g0):
                g = torch.full((r,), float(g0))
            else:
                raise ValueError(f"option gate_init must be a finite number or 'randn', got {g0!r}")
            self.lora_gate = nn.Parameter(g.to(device=device, dtype=torch.float32))
            # 1: γ applies; 0: switched off by a recipe (AutoLoRA's retraining phase), saved with the adapter
            self.register_buffer("lora_gate_on", torch.ones((), device=device))
        if options["track_inputs"]:
            self.register_buffer("input_sq", torch.zeros(d_in, device=device))

    # --- the math ---
    @property
    def scale(self) -> float:
        k = self.r if self.active_rank is None else self.active_rank
        return self.config.scale(k, self.alpha)

    def rank_weights(self) -> torch.Tensor:
        """m ⊙ γ(g) over all R ranks (float32); ranks past `active_rank` get weight 0."""
        m = self.rank_mask.float()
        if self.active_rank is not None:
            m = m.clone()
            m[self.active_rank:] = 0
        if self.gate_mode == "none" or not bool(self.lora_gate_on):
            return m
        g = self.lora_gate
        if self.gate_mode == "linear":
            return m * g
        if not bool((m > 0).any()):
            return m
        logits = g.masked_fill(m == 0, float("-inf"))
        return torch.softmax(logits, dim=0) * m

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b, w = self.lora_A, self.lora_B, self.rank_weights()
        k = self.active_rank
        if k is not None:
            a, b, w = a[:k], b[:, :k], w[:k]
            if self.train_last_only and k > 1:  # DyLoRA "frozen": ranks 0..k-2 get no gradient
                a = torch.cat([a[: k - 1].detach(), a[k - 1:]], 0)
                b = torch.cat([b[:, : k - 1].detach(), b[:, k - 1:]], 1)
        return a, b, w

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        if self.training and hasattr(self, "input_sq"):
            with torch.no_grad():
                self.input_sq += x.detach().float().reshape(-1, x.shape[-1]).pow(2).sum(0)
        if self.dropout is not None:
            x = self.dropout(x)
        a, b, w = self._factors()
        xa = (x @ a.t()) * w.to(x.dtype)
        return ((xa @ b.t()) * self.scale).to(base_out.dtype)

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        a, b, w = self._factors()
        return (b.float() * w) @ a.float() * self.scale

    def kept_ranks(self) -> torch.Tensor:
        """Indices of the ranks that contribute (unmasked, non-zero gate, within `active_rank`)."""
        return torch.nonzero(self.rank_weights().detach() != 0).flatten()

    def pruned_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', s·B') over the kept ranks only (gates folded into A'); zero rows when every rank is pruned."""
        keep = self.kept_ranks()
        w = self.rank_weights().detach()
        return self.lora_A.detach().float()[keep] * w[keep, None], self.lora_B.detach().float()[:, keep] * self.scale

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.pruned_factors()
        if a.shape[0] == 0:  # every rank pruned: a rank-one zero update keeps the file loadable
            a, b = a.new_zeros(1, a.shape[1]), b.new_zeros(b.shape[0], 1)
        return a, b

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        out = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B, "lora_rank_mask": self.rank_mask}
        if self.gate_mode != "none":
            out["lora_gate"], out["lora_gate_on"] = self.lora_gate, self.lora_gate_on
        if hasattr(self, "input_sq"):
            out["lora_input_sq"] = self.input_sq
        return out

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, gate={self.gate_mode}, "
                f"unmasked={int(self.rank_mask.sum())}, active_rank={self.active_rank}")
