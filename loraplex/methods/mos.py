"""MoS (Mixture of Shards): every layer's A and B are concatenations of shards from shared pools.

Wang, Chen, Chen, Dong, Xue, Jiang, Kong, Wu 2024, "MoS: Unleashing Parameter Efficiency of Low-Rank
Adaptation with Mixture of Shards" (arXiv 2410.00938):
    y = W x + b + s · B A x,     s = alpha / r (alpha / sqrt(r) with rslora),
    A_j = [P_A[i_A(j, 1)], ..., P_A[i_A(j, l)]]      (row j of A, r x d_in),
    B^j = [P_B[i_B(j, 1)], ..., P_B[i_B(j, l)]]      (column j of B, d_out x r),
with the four differentiation strategies of the paper:
  * vector sharding: each rank vector is the concatenation of l shards (option `shards`), so a pool
    row is a shard of length d_in/l (P_A) or d_out/l (P_B);
  * subset selection: a layer of rank r routes r · l shards out of a pool of e · L · l shards (L the
    number of layers sharing the pool, e = option `equivalent_rank`: the pool holds as many
    parameters as a rank-e LoRA on those L layers) through a fixed random index matrix (the MoE-like
    router), drawn without repetition within a layer from a generator seeded with option `seed`;
  * pair dissociation: A's and B's indices are drawn independently (option `dissociate`);
  * shard privatisation: the last p = option `private_rank` rank vectors of every layer use shards
    of a private part of the pool that no other layer touches (p · l shards per layer); the other
    r - p come from the public part of (e - p) · L · l shards.
Defaults: shards = 2, equivalent_rank = max(1, r // 4), private_rank = min(1, e - 1), seed = 0.
Pools are shared by the layers of one module name and shape (every q_proj across blocks, as the
reference code keeps one pool per projection type). Init as the reference code: P_A Kaiming-uniform
with bound 1/sqrt(d_in), P_B = 0 (the adapter starts as the identity). The reference code's
"random scaling" vector is fixed to 1 there and is omitted here.

Trainable parameters: Σ_pools e · L · (d_in + d_out), a rank-e LoRA's count. The update is additive,
rank <= r and mergeable. Files: per layer the index buffers `mos_index_A`, `mos_index_B` (r · l
each); the pools once, at `base_model.mos.<group>.lora_A` / `.lora_B` (not a PEFT method: peft_type
"MOS").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, Adapter, LayerSpec
from loraplex.methods import register
from loraplex.methods.vera import (
    bool_option,
    check_init,
    check_options,
    check_uniform_rank,
    group_layers,
    int_option,
    take_shared,
)

PREFIX = "base_model.mos."


class ShardPool(nn.Module):
    """The shard pools of one group of layers: P_A (n x d_in/l) and P_B (n x d_out/l), n = e · L · l."""

    def __init__(self, n: int, d_in: int, d_out: int, shards: int, init: str, dtype, device) -> None:
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        a = torch.empty(n, d_in // shards).uniform_(-bound, bound)
        b = (torch.empty(n, d_out // shards).uniform_(-bound, bound) if init == "random"
             else torch.zeros(n, d_out // shards))
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))


class ShardPools(nn.Module):
    """Every pool of one MoS adapter, and the index matrix drawn for each layer at build time."""

    def __init__(self, pools: dict[str, ShardPool], routes: dict[int, tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.pools = nn.ModuleDict(pools)
        self.routes = routes   # id(base layer) -> (group, index A, index B), read once by each adapter

    def to_peft(self) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{g}.lora_{f}": getattr(p, f"lora_{f}") for g, p in self.pools.items() for f in "AB"}

    def from_peft(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        return take_shared(tensors, self.to_peft(), " (MoS's shard pools)")


def route(generator: torch.Generator, layer: int, r: int, e: int, p: int, n_layers: int, shards: int,
          dissociate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The shard indices of one layer: (r - p) · l public ones drawn without repetition, then its p · l
    private ones; independent draws for A and B unless `dissociate` is off."""
    public = (e - p) * n_layers * shards
    private = public + torch.arange(layer * p * shards, (layer + 1) * p * shards)
    draws = []
    for _ in range(2 if dissociate else 1):
        chosen = torch.randperm(public, generator=generator)[: (r - p) * shards]
        draws.append(torch.cat([chosen, private]).long())
    return draws[0], draws[-1]


@register
class MosAdapter(Adapter):
    """MoS: y = W x + b + s B A x, A's rows and B's columns concatenated from routed pool shards."""

    method = "mos"
    paper = ("Wang, Chen, Chen, Dong, Xue, Jiang, Kong, Wu 2024, MoS: Unleashing Parameter Efficiency of "
             "Low-Rank Adaptation with Mixture of Shards (arXiv 2410.00938)")
    serving_form = "low-rank"
    peft_type = "MOS"  # not in PEFT: a distinct type so PEFT refuses the file instead of misreading it
    kinds = (LINEAR, GPT2_CONV1D)
    # equivalent_rank / private_rank None: max(1, r // 4) and min(1, e - 1)
    option_defaults: dict[str, object] = {"shards": 2, "equivalent_rank": None, "private_rank": None,
                                          "dissociate": True, "seed": 0}

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config, shared: ShardPools | None = None) -> None:
        super().__init__(spec, r, alpha, config, shared)
        o = self.options(config)
        check_init(config, ("kaiming", "random"))
        check_uniform_rank(config, r)
        if shared is None or id(spec.base) not in shared.routes:
            raise ValueError("MoS needs the shard pools (build_shared)")
        self.group, index_a, index_b = shared.routes[id(spec.base)]
        self.shards = o["shards"]
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.scale = config.scale(r, alpha)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        device = spec.base.weight.device
        self.register_buffer("mos_index_A", index_a.clone().to(device))
        self.register_buffer("mos_index_B", index_b.clone().to(device))

    @classmethod
    def options(cls, config) -> dict:
        o = check_options(config, cls.option_defaults)
        int_option(o, "shards")
        int_option(o, "seed", minimum=0)
        bool_option(o, "dissociate")
        if o["equivalent_rank"] is None:
            o["equivalent_rank"] = max(1, config.r // 4)
        e = int_option(o, "equivalent_rank")
        if o["private_rank"] is None:
            o["private_rank"] = min(1, e - 1)
        p = int_option(o, "private_rank", minimum=0)
        if p > e:
            raise ValueError(f"option private_rank ({p}) cannot exceed equivalent_rank ({e})")
        if p > config.r:
            raise ValueError(f"option private_rank ({p}) cannot exceed the rank r ({config.r})")
        if p == e and config.r != e:
            raise ValueError(f"private_rank = equivalent_rank = {e} leaves no public shards, so r must be {e} "
                             f"(got r={config.r}); lower private_rank")
        return o

    @classmethod
    def build_shared(cls, config, specs: dict[str, LayerSpec]) -> ShardPools:
        o = cls.options(config)
        init = check_init(config, ("kaiming", "random"))
        r, e, p, shards = config.r, o["equivalent_rank"], o["private_rank"], o["shards"]
        generator = torch.Generator(device="cpu").manual_seed(o["seed"])
        pools, routes = {}, {}
        for group, members in group_layers(specs, "name").items():
            first, n_layers = members[0], len(members)
            for d in (first.in_features, first.out_features):
                if d % shards:
                    raise ValueError(f"MoS cuts each rank vector into shards={shards} shards, which must divide "
                                     f"every adapted layer's dimensions; {group} has {d}")
            if (r - p) > (e - p) * n_layers:
                raise ValueError(
                    f"MoS group {group!r} has {n_layers} layer(s): its public pool holds (equivalent_rank - "
                    f"private_rank) x layers = {(e - p) * n_layers} rank vectors, fewer than the r - private_rank = "
                    f"{r - p} each layer draws; raise equivalent_rank or lower r")
            pools[group] = ShardPool(e * n_layers * shards, first.in_features, first.out_features, shards, init,
                                     config.torch_dtype, first.base.weight.device)
            for layer, spec in enumerate(members):
                index_a, index_b = route(generator, layer, r, e, p, n_layers, shards, o["dissociate"])
                routes[id(spec.base)] = (group, index_a, index_b)
        return ShardPools(pools, routes)

    # --- the math ---
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r x d_in): row j is shards index_A[j·l : (j+1)·l] of P_A; B (d_out x r) likewise by columns."""
        pool = self.shared.pools[self.group]
        a = pool.lora_A[self.mos_index_A].reshape(self.r, self.in_features)
        b = pool.lora_B[self.mos_index_B].reshape(self.r, self.out_features).t()
        return a, b

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        a, b = self.factors()
        x = x.to(a.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return (((x @ a.t()) @ b.t()) * self.scale).to(base_out.dtype)

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.factors()
        return a.detach().float(), b.detach().float() * self.scale

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        a, b = self.factors()
        return (b.float() @ a.float()) * self.scale

    # --- files ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        return {"mos_index_A": self.mos_index_A, "mos_index_B": self.mos_index_B}

    def from_peft(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        n = self.shared.pools[self.group].lora_A.shape[0]
        for key in ("mos_index_A", "mos_index_B"):
            index = tensors.get(key)
            if index is not None and (index.is_floating_point() or index.is_complex()):
                raise ValueError(f"{where}.{key}: shard indices must be integers, got {index.dtype}")
            if index is not None and index.numel() and (index.min() < 0 or index.max() >= n):
                raise ValueError(f"{where}.{key}: shard indices outside the pool of {n} shards")
        super().from_peft(tensors, where)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, group={self.group}, shards={self.shards}"
