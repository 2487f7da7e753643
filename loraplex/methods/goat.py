"""GOAT (Fan, Lu, Liu, Gu, Qu, Wei, Cheng 2025, "Make LoRA Great Again: Boosting LoRA with Adaptive
Singular Values and Mixture-of-Experts Optimization Alignment", arXiv 2502.16894; ICML 2025).

A mixture of E LoRA experts of rank r_e = r / E with a top-k router, initialised from E different
segments of the base weight's SVD, with the scaling factor derived in the paper:

    W = U S Vᵀ,  n = min(d_out, d_in),  segment length m = ⌊n / E⌋,
    expert e takes singular triplets I_e = [e·m, e·m + r_e):
        A_e = diag(√(S_{I_e} / (s ρ))) V_{I_e}ᵀ,   B_e = U_{I_e} diag(√(S_{I_e} / (s ρ)))
    s = √(3 η d_in / r_e)                        (η = option eta, default 1; ρ = option rho, default 10)
    W_res = W - c · s Σ_e B_e A_e                (c = option init_cof, default 1/E: the expected router
                                                  weight of an expert, so the mean equivalent weight is W)
    g(x) = softmax(R x),  T = top-k of g(x),  w_e = g_e(x) / Σ_{j∈T} g_j(x) for e ∈ T, 0 otherwise
    y = W_res x + b + s Σ_e w_e B_e A_e x.

The experts are stored concatenated: A = [A_1; …; A_E] (r x d_in), B = [B_1 … B_E] (d_out x r), so the
update is the rank-r product s B diag(w(x) ⊗ 1_{r_e}) A x. The router R (E x d_in) starts as PEFT's nn.Linear
default (uniform ±1/√d_in). Trainable: A, B, R. This follows the authors' code (GOAT-PEFT, init "goat"),
except that dropout draws one mask for all experts instead of one per expert.

Training adds the router's load-balancing loss E Σ_e f_e P_e (f_e: share of top-k slots routed to e, P_e:
mean router probability of e) times `aux_loss_coef` (1e-3 in the paper's scripts): after a training
forward, `GoatAdapter.aux_loss(model, name)` returns it summed over layers.

Not mergeable (the routing depends on the input). The base weight is the residual while installed and
is restored on delete; loading re-runs the (deterministic) SVD to rebuild W_res. Not in PEFT 0.21: files
say peft_type "GOAT" (as the authors' PEFT fork) and hold lora_A / lora_B / lora_gating.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.pissa import ResidualBase, check_option, is_int, read_options

DEFAULTS = {"experts": 8, "top_k": 2, "eta": 1.0, "rho": 10.0, "init_cof": None, "aux_loss_coef": 1e-3}


@register
class GoatAdapter(ResidualBase, Adapter):
    """GOAT on Linear and GPT-2 Conv1D layers. Options: experts, top_k, eta, rho, init_cof, aux_loss_coef."""

    method = "goat"
    peft_type = "GOAT"
    mergeable = False
    kinds = (LINEAR, GPT2_CONV1D)
    paper = ("Fan, Lu, Liu, Gu, Qu, Wei, Cheng 2025, Make LoRA Great Again: Boosting LoRA with Adaptive "
             "Singular Values and Mixture-of-Experts Optimization Alignment (arXiv 2502.16894)")
    serving_form = "unmergeable"

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        opts = self.options(config, r)
        if config.dora:
            raise ValueError("method 'goat' does not combine with dora=True")
        self.check_free(spec, self.method)
        super().__init__(spec, r, alpha, config)
        e, d_in, d_out = opts["experts"], spec.in_features, spec.out_features
        self.experts, self.top_k, self.rank_per_expert = e, opts["top_k"], r // e
        segment = min(d_in, d_out) // e
        if self.rank_per_expert > segment:
            raise ValueError(f"GOAT: each of the {e} experts takes r/E = {self.rank_per_expert} singular vectors "
                             f"from a segment of {segment} (min(in, out) / E); lower r or experts")
        self.scale = math.sqrt(3 * opts["eta"] * d_in / self.rank_per_expert)
        self.aux_loss_coef = opts["aux_loss_coef"]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        dtype, device = config.torch_dtype, spec.base.weight.device
        u, s, vh = torch.linalg.svd(spec.weight.detach().float(), full_matrices=False)
        idx = torch.cat([torch.arange(i * segment, i * segment + self.rank_per_expert) for i in range(e)]).to(device)
        root = torch.sqrt(s[idx] / (self.scale * opts["rho"]))
        self.lora_A = nn.Parameter((root[:, None] * vh[idx]).to(dtype))
        self.lora_B = nn.Parameter((u[:, idx] * root[None, :]).to(dtype))
        bound = 1 / math.sqrt(d_in)
        self.lora_gating = nn.Parameter(torch.empty(e, d_in, dtype=dtype, device=device).uniform_(-bound, bound))
        cof = 1 / e if opts["init_cof"] is None else opts["init_cof"]
        self.init_offset(self.lora_A.detach().clone(), self.lora_B.detach().clone(), cof * self.scale)
        self.last_aux_loss: torch.Tensor | None = None

    @classmethod
    def options(cls, config, r: int | None = None) -> dict:
        o = read_options(config, DEFAULTS, cls.method)
        e, k = o["experts"], o["top_k"]
        check_option(is_int(e) and e >= 1, cls.method, "experts", e, "an integer >= 1")
        check_option(is_int(k) and 1 <= k <= e, cls.method, "top_k", k, f"an integer in [1, experts={e}]")
        for key in ("eta", "rho", "aux_loss_coef"):
            v = o[key]
            check_option(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and (v > 0 or key ==
                         "aux_loss_coef"), cls.method, key, v, "a number > 0" if key != "aux_loss_coef" else ">= 0")
        c = o["init_cof"]
        check_option(c is None or (isinstance(c, (int, float)) and not isinstance(c, bool)), cls.method, "init_cof",
                     c, "null (1/experts) or a number")
        if r is not None and r % e:
            raise ValueError(f"GOAT splits r over the experts: r={r} is not a multiple of experts={e}")
        return o

    # --- the math ---
    def gates(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w, probs, top-k indices): w (N x E) is zero outside each row's top-k and sums to 1."""
        probs = torch.softmax((x2 @ self.lora_gating.t()).float(), dim=-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        w = torch.zeros_like(probs).scatter(1, idx, top / top.sum(dim=-1, keepdim=True))
        return w, probs, idx

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        w, probs, idx = self.gates(x2)
        if self.training:
            share = torch.bincount(idx.reshape(-1), minlength=self.experts).float() / x2.shape[0]
            self.last_aux_loss = self.experts * (share * probs.mean(dim=0)).sum()
        h = self.dropout(x2) if self.dropout is not None else x2
        h = (h @ self.lora_A.t()) * w.repeat_interleave(self.rank_per_expert, dim=1).to(h.dtype)
        y = (h @ self.lora_B.t()) * self.scale
        return y.view(*x.shape[:-1], y.shape[-1]).to(base_out.dtype)

    @classmethod
    def aux_loss(cls, model, name: str) -> torch.Tensor | float:
        """aux_loss_coef × Σ over layers of the load-balancing loss of the last training forward."""
        losses = [layer.adapters[name].last_aux_loss for layer in model.adapted_layers(name).values()
                  if layer.adapters[name].last_aux_loss is not None]
        coef = cls.options(model.configs[name])["aux_loss_coef"]
        return coef * torch.stack(losses).sum() if losses else 0.0

    def merge(self, spec: LayerSpec, weight: float) -> None:
        raise TypeError("GOAT is not mergeable: its router picks experts per token, so its update is not one "
                        "weight delta; serve it unmerged")

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B, "lora_gating.weight": self.lora_gating}

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        o = cls.options(config)
        return {"r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "bias": config.bias,
                "num_experts": o["experts"], "top_k": o["top_k"], "init_type": "goat", "init_cof": o["init_cof"],
                "eta": o["eta"], "rho": o["rho"], "aux_loss_coef": o["aux_loss_coef"]}

    @classmethod
    def config_from_peft_fields(cls, data: dict) -> dict:
        options = {"experts": int(data.get("num_experts", 8)), "top_k": int(data.get("top_k", 2))}
        options |= {k: data[k] for k in ("init_cof", "eta", "rho", "aux_loss_coef") if k in data}
        if data.get("init_type", "goat") != "goat":
            raise ValueError(f"GOAT init_type {data['init_type']!r} is not supported; loraplex implements 'goat'")
        return {"r": int(data["r"]), "alpha": float(data.get("lora_alpha", 8)),
                "dropout": float(data.get("lora_dropout") or 0.0), "targets": data["target_modules"],
                "bias": data.get("bias", "none"), "options": options}

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, top_k={self.top_k}, r_e={self.rank_per_expert}, "
                f"scale={self.scale:.4g}, init_cof·s={self.offset_scale:.4g}")
