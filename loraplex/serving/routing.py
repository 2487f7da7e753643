"""Prompt-level routing among served adapters, after MiLoRA (Zhang et al., 2024, arXiv 2410.18035).

MiLoRA routes "once before generating the first new token and reuses these results for subsequent
tokens". Here the experts are whole served adapters and the router reads the prompt once, at submission:

    e = mean_t E[x_t],  ê = e / ‖e‖                 (E: the base model's input embeddings of the prompt)
    centroid router:  logits_k = ê · c_k / τ,        c_k = normalised mean of ê over adapter k's prompts
    linear router:    logits = W ê + b,              fitted by softmax regression on labelled prompts
    p = softmax(logits); the top-k adapters, weights p renormalised over them (k = 1: the argmax alone)

The request is then served by that adapter (or weighted mix) for every token. Features are read from
the unwrapped embedding table, so routing never runs the (adapter-wrapped) model off the engine thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from loraplex.core.io import AdapterFileError, atomic_write_files, tensors_to_bytes

ROUTER_CONFIG = "router.json"
ROUTER_WEIGHTS = "router.safetensors"
FORMAT = "loraplex-prompt-router"
KINDS = ("centroid", "linear")


def prompt_features(embedding: nn.Embedding, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """ê per prompt: the normalised mean of the prompt's input embeddings, (n, d) in float32."""
    weight = embedding.weight
    rows = []
    with torch.no_grad():
        for ids in prompts:
            if not ids:
                raise ValueError("cannot route an empty prompt")
            e = weight.index_select(0, torch.as_tensor(list(ids), device=weight.device)).float().mean(0)
            rows.append(e / e.norm().clamp_min(1e-12))
    return torch.stack(rows).cpu()


@dataclass
class PromptRouter:
    """logits = ê Wᵀ + b over `adapters`; `top_k` adapters serve the request."""

    adapters: list[str]
    kind: str
    weight: torch.Tensor          # (n_adapters, d)
    bias: torch.Tensor            # (n_adapters,)
    top_k: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"router kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.adapters) < 2 or len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"a router chooses among at least two distinct adapters, got {self.adapters}")
        if not 1 <= self.top_k <= len(self.adapters):
            raise ValueError(f"top_k must be in [1, {len(self.adapters)}], got {self.top_k}")
        if self.weight.shape[0] != len(self.adapters) or self.bias.shape != (len(self.adapters),):
            raise ValueError("router weight/bias do not match its adapter list")

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(features.float() @ self.weight.t() + self.bias, dim=-1)

    def route(self, features: torch.Tensor) -> str | dict[str, float]:
        """One prompt's features (d,) -> an adapter name (top_k = 1) or {name: weight} (weights sum to 1)."""
        p = self.probabilities(features.reshape(1, -1))[0]
        top = torch.topk(p, self.top_k)
        if self.top_k == 1:
            return self.adapters[int(top.indices[0])]
        w = top.values / top.values.sum()
        return {self.adapters[int(i)]: float(x) for i, x in zip(top.indices, w)}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        config = {"format": FORMAT, "version": 1, "kind": self.kind, "adapters": self.adapters, "top_k": self.top_k,
                  "features": "mean input embedding, normalised", "dim": self.dim}
        atomic_write_files({folder / ROUTER_WEIGHTS: tensors_to_bytes({"weight": self.weight, "bias": self.bias}),
                            folder / ROUTER_CONFIG: json.dumps(config, indent=2).encode()})

    @classmethod
    def load(cls, folder: str | Path) -> PromptRouter:
        folder = Path(folder)
        config_file, weights_file = folder / ROUTER_CONFIG, folder / ROUTER_WEIGHTS
        if not config_file.exists() or not weights_file.exists():
            raise AdapterFileError(f"{folder}: a router folder holds {ROUTER_CONFIG} and {ROUTER_WEIGHTS} "
                                   "(made by `loraplex route`)")
        try:
            config = json.loads(config_file.read_text())
            tensors = load_file(weights_file)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError, SafetensorError, ValueError, RuntimeError) as err:
            raise AdapterFileError(f"{folder}: unreadable router ({err})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise AdapterFileError(f"{config_file}: not a loraplex prompt router (format {FORMAT!r})")
        try:
            return cls(list(config["adapters"]), config["kind"], tensors["weight"].float(), tensors["bias"].float(),
                       int(config.get("top_k", 1)))
        except (KeyError, TypeError, ValueError) as err:
            raise AdapterFileError(f"{folder}: invalid router: {err}") from None


def fit_router(embedding: nn.Embedding, prompts: Mapping[str, Sequence[Sequence[int]]], *, kind: str = "centroid",
               temperature: float = 0.05, top_k: int = 1, steps: int = 300, lr: float = 0.5,
               weight_decay: float = 1e-4, seed: int = 0) -> PromptRouter:
    """Fit a router from example prompts (token ids) of each adapter's task."""
    names = list(prompts)
    if len(names) < 2:
        raise ValueError("give example prompts for at least two adapters")
    empty = [n for n in names if not prompts[n]]
    if empty:
        raise ValueError(f"no example prompts for adapter(s) {empty}")
    feats = [prompt_features(embedding, prompts[n]) for n in names]
    if kind == "centroid":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        cents = torch.stack([f.mean(0) for f in feats])
        cents = cents / cents.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return PromptRouter(names, kind, cents / temperature, torch.zeros(len(names)), top_k)
    if kind != "linear":
        raise ValueError(f"router kind must be one of {KINDS}, got {kind!r}")
    x = torch.cat(feats)
    y = torch.cat([torch.full((len(f),), k, dtype=torch.long) for k, f in enumerate(feats)])
    # standardise the features for the fit (mean-pooled embeddings are nearly parallel), fold it back after
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    torch.manual_seed(seed)
    w = torch.zeros(len(names), x.shape[1], requires_grad=True)
    b = torch.zeros(len(names), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr * 0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.t() + b, y) + weight_decay * w.square().sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w_x = w / sd                       # logits = ((x - mu)/sd) Wᵀ + b = x (W/sd)ᵀ + (b - (W/sd) mu)
        return PromptRouter(names, kind, w_x.detach().clone(), (b - w_x @ mu).detach().clone(), top_k)
