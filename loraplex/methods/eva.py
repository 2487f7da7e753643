"""EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", arXiv 2410.07170).

A data-driven LoRA initialisation. For each adapted layer, collect its inputs X (tokens x d_in; padding
and, by default, positions whose label is -100 are left out) over calibration minibatches and run an
incremental PCA (incremental SVD of the centred inputs):

    X - mean = U S Vᵀ,   explained-variance ratio  ρ_i = S_i² / Σ_j ‖x_j - mean‖².

Ranks are then redistributed across layers: each layer offers its first round(ρ · r) ratios
(ρ = option rho, default 2), and the rank budget Σ_l r_l goes to the largest ratios model-wide, so
layer l gets r'_l components (0 removes its adapter). Then

    A = V[:, :r']ᵀ  (optionally whitened: row i divided by √S_i),   B = 0,
    alpha' = alpha · r' / r  (adjust_scaling_factors; without rslora s = alpha / r is then unchanged),
    y = W x + b + s' B A x                              (the base weight is untouched).

Components are updated batch by batch, cycling through the batches, until for every layer the components
its rank needs moved less than tau in cosine similarity (|cos|: a singular vector's sign is arbitrary)
between two updates. PEFT cycles until that happens; here at most max_passes passes (default 10) are
made, then the current components are used and a warning names the unconverged inputs. Each pass costs
one forward per batch. Layers receiving the very same input tensor
(e.g. q/k/v projections) share one PCA. This follows PEFT's `initialize_lora_eva_weights`; the PCA here
is an exact incremental SVD (no randomized SVD), and its signs are fixed (largest entry positive).

After calibration the adapter is a plain LoRA: files are PEFT LoRA files with per-layer rank_pattern /
alpha_pattern, and PEFT's EVA adapters load as such.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, LayerSpec
from loraplex.methods import register
from loraplex.methods.lora import LoraAdapter
from loraplex.methods.pissa import check_option, is_int, read_options

log = logging.getLogger("loraplex")

DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
            "adjust_scaling_factors": True, "max_passes": 10}


class IncrementalPCA:
    """Top-k principal components of rows fed in batches (Ross et al. 2008, as in scikit-learn).

    Each update takes the SVD of [diag(S) C; X_b - mean_b; √(n m / (n + m)) (mean - mean_b)], which has
    the same scatter matrix as all rows seen so far, restricted to the kept components.
    """

    def __init__(self, k: int) -> None:
        self.k, self.n = k, 0
        self.mean = self.components = self.singular = None
        self.scatter = 0.0            # Σ ‖x - mean‖² over every row seen: the total variance × (n - 1)

    def update(self, x: torch.Tensor) -> None:
        x = x.float()
        m = x.shape[0]
        batch_mean = x.mean(dim=0)
        centred = x - batch_mean
        batch_scatter = centred.pow(2).sum()
        if self.n == 0:
            stack, self.scatter, self.mean = centred, batch_scatter, batch_mean
        else:
            correction = (self.n * m / (self.n + m)) ** 0.5 * (self.mean - batch_mean)
            stack = torch.cat([self.singular[:, None] * self.components, centred, correction[None]])
            self.scatter = self.scatter + batch_scatter + correction.pow(2).sum()
            self.mean = self.mean + (batch_mean - self.mean) * (m / (self.n + m))
        self.n += m
        _, s, vh = torch.linalg.svd(stack, full_matrices=False)
        vh = vh[: self.k]
        signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))
        self.components, self.singular = vh * signs, s[: self.k]

    @property
    def ratios(self) -> torch.Tensor:
        return self.singular.pow(2) / self.scatter


@register
class EvaAdapter(LoraAdapter):
    """EVA on Linear and GPT-2 Conv1D layers: a LoRA whose A comes from `calibrate`.

    Options: rho, tau, use_label_mask, label_mask_value, whiten, adjust_scaling_factors, max_passes.
    """

    method = "eva"
    kinds = (LINEAR, GPT2_CONV1D)
    paper = ("Paischer, Hauzenberger, Schmied, Alkin, Deisenroth, Hochreiter 2024, One Initialization to Rule "
             "them All: Fine-tuning via Explained Variance Adaptation (arXiv 2410.07170)")
    serving_form = "low-rank"

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config) -> None:
        self.options(config)
        if config.dora:
            raise ValueError("method 'eva' does not combine with dora=True")
        super().__init__(spec, r, alpha, config)

    @classmethod
    def options(cls, config) -> dict:
        o = read_options(config, DEFAULTS, cls.method)
        number = (int, float)
        check_option(isinstance(o["rho"], number) and o["rho"] >= 1, cls.method, "rho", o["rho"], "a number >= 1")
        check_option(isinstance(o["tau"], number) and 0 <= o["tau"] <= 1, cls.method, "tau", o["tau"], "in [0, 1]")
        for key in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            check_option(isinstance(o[key], bool), cls.method, key, o[key], "true or false")
        check_option(is_int(o["label_mask_value"]), cls.method, "label_mask_value", o["label_mask_value"],
                     "an integer")
        check_option(is_int(o["max_passes"]) and o["max_passes"] >= 1, cls.method, "max_passes", o["max_passes"],
                     "an integer >= 1")
        return o

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        return {"init_lora_weights": "eva"}

    def reinit(self, a: torch.Tensor, rank: int, alpha: float, scale: float) -> None:
        """New factors of rank `rank`: A given, B = 0."""
        dtype = self.lora_A.dtype
        self.r, self.alpha, self.scale = rank, alpha, scale
        self.lora_A = nn.Parameter(a.to(dtype).contiguous())
        self.lora_B = nn.Parameter(torch.zeros(self.lora_B.shape[0], rank, dtype=dtype, device=a.device))

    # --- the initialisation ---
    @classmethod
    def calibrate(cls, model, name: str, batches: Iterable) -> None:
        start = time.perf_counter()
        config = model.configs[name]
        opts = cls.options(config)
        layers = model.adapted_layers(name)
        batches = list(batches)
        if not batches:
            raise ValueError("EVA calibration got no batches")
        wanted = {p: min(round(layer.adapters[name].r * opts["rho"]), layer.spec.in_features)
                  for p, layer in layers.items()}
        budget = sum(layer.adapters[name].r for layer in layers.values())
        pcas, leader, converged, forwards = collect_components(model, layers, batches, wanted, budget, opts)
        ranks = redistribute(pcas, leader, wanted, budget)
        unconverged = sorted({leader[p] for p, k in ranks.items() if k and not converged[leader[p]][:k].all()})
        if unconverged:
            log.warning("eva: %d input(s) had not converged to tau=%s after %d forward passes (max_passes=%d); "
                        "using the current components: %s", len(unconverged), opts["tau"], forwards,
                        opts["max_passes"], ", ".join(unconverged[:5]))
        apply_ranks(model, name, config, layers, pcas, leader, ranks, opts)
        log.info("eva: %s initialised from %d forward passes in %.2f s; ranks %s", name, forwards,
                 time.perf_counter() - start, dict(Counter(ranks.values())))


def token_mask(batch, opts: dict) -> torch.Tensor | None:
    """Which (row, position) pairs feed the PCA: attention mask and, optionally, supervised labels."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        return None
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    if opts["use_label_mask"] and "labels" in batch:
        mask = mask & (batch["labels"] != opts["label_mask_value"])
    return mask


def run_model(model, batch) -> None:
    if isinstance(batch, dict):
        model(**{k: v for k, v in batch.items() if k != "labels"})
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def collect_components(model, layers: dict, batches: list, wanted: dict, budget: int, opts: dict):
    """Run the (adapter-free) model over the batches, feeding each distinct layer input to a PCA.

    Returns (pcas by leader path, leader of each layer, converged flags by leader, forward passes run).
    """
    leader: dict[str, str] = {}
    pending: dict[str, list[torch.Tensor]] = {}
    pcas: dict[str, IncrementalPCA] = {}
    converged: dict[str, torch.Tensor] = {}
    live: dict[int, tuple[torch.Tensor, str]] = {}   # this forward's inputs, kept alive so ids stay unique
    state = {"mask": None, "skip": set()}

    def hook(path):
        def pre_hook(module, args):
            x = args[0]
            if path not in leader:                   # first forward: which layers share one input tensor?
                leader[path] = live.setdefault(id(x), (x, path))[1]
            if leader[path] != path or path in state["skip"]:
                return
            mask = state["mask"]
            rows = x[mask] if mask is not None and x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
            pending.setdefault(path, []).append(rows.detach().float())
        return pre_hook

    def fit(path: str, rows: torch.Tensor) -> None:
        pca = pcas.setdefault(path, IncrementalPCA(min(wanted[path], rows.shape[0])))
        before = pca.components
        pca.update(rows)
        if before is None or before.shape != pca.components.shape:
            converged[path] = torch.zeros(pca.components.shape[0], dtype=torch.bool)
        else:
            converged[path] = ((pca.components * before).sum(dim=1).abs() >= opts["tau"]).cpu()

    handles = [layer.register_forward_pre_hook(hook(p)) for p, layer in layers.items()]
    was_training = model.training
    model.eval()
    forwards, finished = 0, False
    try:
        with torch.no_grad(), model.disabled():
            for _ in range(opts["max_passes"]):
                for batch in batches:
                    state["mask"] = token_mask(batch, opts)
                    run_model(model, batch)
                    live.clear()
                    forwards += 1
                    if forwards == 1:
                        unseen = [p for p in layers if p not in leader]
                        if unseen:
                            raise ValueError(f"EVA: layer(s) {unseen[:3]} received no input during calibration")
                        for p in layers:                # a shared input offers its largest request
                            wanted[leader[p]] = max(wanted[leader[p]], wanted[p])
                        for p in layers:
                            wanted[p] = wanted[leader[p]]
                    for path, chunks in pending.items():
                        rows = torch.cat(chunks) if chunks else None
                        if rows is None or (path not in pcas and rows.shape[0] < wanted[path]):
                            continue                  # the first update needs at least k rows
                        pending[path] = []
                        fit(path, rows)
                    if len(pcas) < len(set(leader.values())):
                        continue
                    need: dict[str, int] = {}
                    for p, k in redistribute(pcas, leader, wanted, budget).items():
                        need[leader[p]] = max(need.get(leader[p], 0), k)
                    state["skip"] = {q for q in pcas if bool(converged[q][: need[q]].all())}
                    if len(state["skip"]) == len(pcas):
                        finished = True
                        break
                if finished:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for path, chunks in pending.items():             # too few rows for k: use what there is
        if path not in pcas and chunks:
            fit(path, torch.cat(chunks))
    empty = sorted(set(leader.values()) - set(pcas))
    if empty:
        raise ValueError(f"EVA: no tokens reached {empty[:3]} (all masked out?); pass more calibration data "
                         "or set use_label_mask=false")
    return pcas, leader, converged, forwards


def redistribute(pcas: dict, leader: dict, wanted: dict, budget: int) -> dict[str, int]:
    """Per-layer ranks: the `budget` largest explained-variance ratios model-wide (ties: layer order)."""
    values, owners = [], []
    for path in leader:
        ratios = pcas[leader[path]].ratios[: wanted[path]]
        values.append(ratios)
        owners += [path] * ratios.shape[0]
    order = torch.argsort(torch.cat(values).cpu(), descending=True, stable=True)[:budget]
    counts = Counter(owners[i] for i in order.tolist())
    return {path: counts.get(path, 0) for path in leader}


def apply_ranks(model, name: str, config, layers: dict, pcas: dict, leader: dict, ranks: dict, opts: dict) -> None:
    """Give each layer its EVA rank and A; drop layers of rank 0; record ranks/alphas in the config."""
    rank_pattern, alpha_pattern, kept = {}, {}, []
    for path, layer in layers.items():
        adapter = layer.adapters[name]
        rank = ranks[path]
        if rank == 0:
            _drop_layer(model, name, path, layer)
            continue
        kept.append(path)
        pca = pcas[leader[path]]
        a = pca.components[:rank]
        if opts["whiten"]:
            a = a / pca.singular[:rank].sqrt()[:, None]
        r0, alpha0 = config.rank_and_alpha(path)
        alpha = alpha0 * rank / r0 if opts["adjust_scaling_factors"] else alpha0
        adapter.reinit(a.to(adapter.lora_A.device), rank, alpha, config.scale(rank, alpha))
        if rank != r0:
            rank_pattern[re.escape(path)] = rank
        if alpha != alpha0:
            alpha_pattern[re.escape(path)] = alpha
    changes = {"rank_pattern": {**rank_pattern, **config.rank_pattern},
               "alpha_pattern": {**alpha_pattern, **config.alpha_pattern}}
    if len(kept) < len(layers):
        changes |= {"targets": kept, "exclude": None}
    model.configs[name] = config.replace(**changes)
    model._update_trainable()


def _drop_layer(model, name: str, path: str, layer) -> None:
    """Remove adapter `name` from one layer (EVA gave it rank 0); unwrap the layer if nothing is left."""
    del layer.adapters[name]
    layer._stack_cache = None
    if not layer.adapters:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.model.get_submodule(parent_path) if parent_path else model.model
        setattr(parent, leaf, layer.base_layer)
    bias_paths = model._bias_params.get(name)
    if bias_paths and path in bias_paths:
        bias_paths.remove(path)
