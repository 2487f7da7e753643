"""Chain of LoRA (Xia, Qin, Hazan 2024, "Chain of LoRA: Efficient Fine-tuning of Language Models via
Residual Learning", arXiv 2401.04151): residual learning by restarts.

Every `every` steps the adapter is merged into the base and a fresh one starts:
    W ← W + s B_k A_k,    A ← kaiming draw, B ← 0, optimizer state of A and B cleared,
so after n restarts the model computes (W0 + Σ_k s B_k A_k) x + s B A x. Each merged pair is kept
(as A_k and s·B_k, float32), so
  * a checkpoint can restore the merged base on resume (the deltas are re-added in the same order,
    giving bit-identical weights), and
  * the saved result is ONE plain LoRA for the ORIGINAL base: the chain's factors concatenated,
        A = [A_1; …; A_n; A],   B = [s B_1, …, s B_n, s B],   B A = Σ_k s B_k A_k + s B A,
    of rank (n+1)·r (alpha = rank, so its scale is 1); `finalize` puts the original base weights back
    (bit-exact: a CPU copy of each adapted weight is taken before the first merge, the one memory cost
    of the recipe) and installs that adapter.
The parameter objects never change during training (the optimizer holds them); only their values are
reset in place.
"""

from __future__ import annotations

from typing import Any

import torch

from loraplex.training.recipes import Recipe, register
from loraplex.training.recipes._lowrank import (
    adapters,
    clear_state,
    kaiming_rows,
    replace_with_plain_lora,
    trained_adapter,
)


@register
class ChainOfLora(Recipe):
    """Chain of LoRA (Xia et al. 2024): merge into the base every K steps, restart; saved as one adapter."""

    name = "chain-of-lora"
    options = {"every": 20}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        every = self.opts["every"]
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"recipe {self.name!r}: option every must be a positive integer (steps between "
                             f"restarts), got {every!r}")
        self.every = every
        self.momentum = 1.0   # fraction of the adapter unloaded at each restart (PeriodicLoRA may lower it)
        self.chain: list[dict[str, list[torch.Tensor]]] = []  # per restart: path -> [A_k, μ s B_k]
        self.finalized = False
        self.originals: dict[str, torch.Tensor] = {}   # adapted base weights before the first merge (CPU)
        self.model = None
        self.adapter_name = "default"

    def setup(self, model, cfg) -> None:
        self.model, self.adapter_name = model, trained_adapter(model)
        for path, adapter in adapters(model, self.adapter_name, "lora").items():
            if adapter.use_dora:
                raise ValueError(f"{path}: recipe {self.name!r} merges additive updates; DoRA is not one "
                                 "(drop dora=True)")

    # --- restarts ---
    def after_step(self, model, optimizer, step: int) -> dict[str, Any] | None:
        if (step + 1) % self.every != 0:
            return None
        self.restart(model, optimizer)
        return {"restarts": len(self.chain)}

    def restart(self, model, optimizer) -> None:
        """Unload the adapter into the base (all of it, or the momentum fraction μ) and restart it."""
        layers = model.adapted_layers(self.adapter_name)
        self._keep_originals(layers)
        link: dict[str, list[torch.Tensor]] = {}
        mu = self.momentum
        with torch.no_grad():
            for path, layer in layers.items():
                adapter = layer.adapters[self.adapter_name]
                a = adapter.lora_A.detach().float().clone()
                b = adapter.lora_B.detach().float() * (mu * adapter.scale)
                _add_delta(layer.spec.weight, b, a)
                link[path] = [a, b]
                if mu == 1.0:  # a fresh adapter and a fresh optimizer state for it
                    adapter.lora_A.copy_(kaiming_rows(*adapter.lora_A.shape, adapter.lora_A))
                    adapter.lora_B.zero_()
                    clear_state(optimizer, (adapter.lora_A, adapter.lora_B))
                else:  # momentum unloading: keep (1 - μ) of the update in the adapter
                    adapter.lora_B.mul_(1.0 - mu)
        self.chain.append(link)

    # --- the result ---
    def finalize(self, model) -> None:
        if self.finalized:
            return
        layers = model.adapted_layers(self.adapter_name)
        factors = {}
        with torch.no_grad():
            for path, original in self.originals.items():  # the original base weights back
                layers[path].spec.weight.copy_(original)
            for path, layer in layers.items():
                adapter = layer.adapters[self.adapter_name]
                a_now, b_now = adapter.as_lora(layer.spec)
                a_parts = [link[path][0] for link in self.chain] + [a_now]
                b_parts = [link[path][1] for link in self.chain] + [b_now]
                factors[path] = (torch.cat(a_parts, 0), torch.cat(b_parts, 1))
        replace_with_plain_lora(model, self.adapter_name, factors)
        self.chain, self.finalized, self.originals = [], True, {}

    def _keep_originals(self, layers) -> None:
        if not self.originals:
            self.originals = {p: layer.spec.weight.detach().to("cpu", copy=True) for p, layer in layers.items()}

    # --- checkpoints ---
    def state_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "finalized": self.finalized}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the chain and put its deltas back into the (freshly loaded, original) base weights."""
        chain = state.get("chain", [])
        if chain and self.model is None:
            raise RuntimeError(f"recipe {self.name!r}: call setup(model, cfg) before load_state_dict")
        self.finalized = bool(state.get("finalized", False))
        self.chain = []
        if chain:
            layers = self.model.adapted_layers(self.adapter_name)
            missing = sorted({p for link in chain for p in link} - set(layers))
            if missing:
                raise ValueError(f"recipe {self.name!r}: the checkpoint's chain names layers the adapter does not "
                                 f"have ({', '.join(missing[:3])}); was it written by another run?")
            # on the weights' device, so the deltas are computed where they were the first time
            self.chain = [{p: [t.float().to(layers[p].spec.weight.device) for t in pair] for p, pair in link.items()}
                          for link in chain]
            self._keep_originals(layers)   # the freshly loaded base is the original one
            with torch.no_grad():
                for link in self.chain:
                    for path, (a, b) in link.items():
                        _add_delta(layers[path].spec.weight, b, a)


def _add_delta(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> None:
    """weight += b a, computed in float32 the same way every time (bit-identical on resume)."""
    weight.add_((b @ a).to(weight.dtype))
