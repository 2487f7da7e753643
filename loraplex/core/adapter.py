"""The contract between the core and a method: one `Adapter` per (adapted layer, adapter name).

A method subclasses `Adapter`, implements `delta` (the change of the layer's output) and, when the
method is mergeable, `delta_weight` (the change of the base weight). The core does the rest:
targeting, multi-adapter bookkeeping, mixed batches, merging, saving and loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

LINEAR, GPT2_CONV1D, EMBEDDING, CONV = "linear", "gpt2-conv1d", "embedding", "conv"


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a base layer we know how to adapt, or None."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return CONV
    # transformers' GPT-2 Conv1D: a linear layer whose weight is stored (in, out).
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return GPT2_CONV1D
    return None


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only language model: a Hugging Face model that can generate and has no encoder."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return (callable(can_generate) and bool(can_generate())
            and not getattr(config, "is_encoder_decoder", False))


@dataclass
class LayerSpec:
    """What an adapter needs to know about the base layer it is attached to."""

    kind: str
    in_features: int
    out_features: int
    base: nn.Module
    # the layer sits in a causal (decoder-only) language model: set once per build by the core, from the
    # whole model (`is_causal_lm`), for methods whose layout depends on it (Conv-LoRA's token grid)
    causal_lm: bool = False

    @classmethod
    def of(cls, module: nn.Module) -> LayerSpec:
        kind = layer_kind(module)
        if kind == LINEAR:
            return cls(kind, module.in_features, module.out_features, module)
        if kind == GPT2_CONV1D:
            d_in, d_out = module.weight.shape
            return cls(kind, d_in, d_out, module)
        if kind == EMBEDDING:
            return cls(kind, module.num_embeddings, module.embedding_dim, module)
        if kind == CONV:
            if module.groups != 1:
                raise ValueError(f"grouped convolutions (groups={module.groups}) are not supported")
            return cls(kind, module.in_channels, module.out_channels, module)
        raise TypeError(f"cannot adapt a {type(module).__name__}")

    @property
    def weight(self) -> torch.Tensor:
        """The base weight in (out, in, ...) layout (a view: in-place edits reach the base layer).

        For an embedding this is (num_embeddings, dim), its storage layout.
        """
        w = self.base.weight
        return w.t() if self.kind == GPT2_CONV1D else w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)


class Adapter(nn.Module):
    """One adapter on one layer. Subclasses state their paper and equation in their docstring."""

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = (LINEAR, GPT2_CONV1D)
    # each token's output depends on that token alone (False: the adapter mixes neighbouring tokens, so the
    # training loop keeps the padded (batch, length) layout instead of running the real tokens as one row)
    token_wise: ClassVar[bool] = True

    peft_type: ClassVar[str] = "LORA"   # PEFT's name for the method, for files PEFT can read

    def __init__(self, spec: LayerSpec, r: int, alpha: float, config, shared: nn.Module | None = None) -> None:
        super().__init__()
        if spec.kind not in self.kinds:
            raise ValueError(
                f"method {self.method!r} cannot adapt a {type(spec.base).__name__} layer; "
                f"it supports: {', '.join(self.kinds)}")
        # plain values straight into __dict__ (what nn.Module.__setattr__ ends up doing for them, minus its
        # checks: hundreds of adapters are built per attach); the shared module sits in a tuple so that it
        # is not registered once per layer
        self.__dict__.update(r=r, alpha=alpha, _shared_ref=(shared,))

    @property
    def shared(self) -> nn.Module | None:
        """The module holding tensors shared by every layer of this adapter (see `build_shared`)."""
        return self._shared_ref[0]

    # --- hooks a method may implement (all optional) ---
    @classmethod
    def build_shared(cls, config, specs: dict[str, LayerSpec]) -> nn.Module | None:
        """Tensors shared across layers (e.g. VeRA's frozen random pair), stored once per adapter.

        The returned module lives on the `AdapterModel` (`shared_tensors[name]`); its parameters train
        with the adapter, its buffers stay frozen. Its `to_peft()` / `from_peft(tensors)` give and take
        tensors under their exact on-disk keys.
        """
        return None

    # `calibrate(model: AdapterModel, name: str, batches: Iterable) -> None`, a classmethod: data- or
    # gradient-driven initialisation, run by `add_adapter(..., calibration_data=...)`.

    @classmethod
    def peft_config_fields(cls, config) -> dict:
        """Extra `adapter_config.json` fields PEFT needs for this method."""
        return {}

    @classmethod
    def config_from_peft_fields(cls, data: dict) -> dict:
        """`LoraConfig` keyword arguments from a PEFT config of this method's `peft_type`."""
        raise ValueError(f"reading PEFT {cls.peft_type} configs is not supported for {cls.method!r}")

    def as_lora(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with B @ A equal to this adapter's change of the ORIGINAL base weight (scale folded in).

        Used to save any low-rank-reducible adapter as a plain LoRA that loads on the unmodified base.
        """
        raise TypeError(f"method {self.method!r} cannot be expressed as a plain LoRA")

    def serving_factors(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) with `delta(x, ·) == x Aᵀ Bᵀ` in eval mode, relative to the layer's CURRENT base (scale
        folded into B), or None when the method has no such form. Mixed batches serve rows with it.

        The default is `as_lora`, which is the same thing for every method that leaves the base weight
        alone; methods that rewrite it (PiSSA's residual) override this.
        """
        if getattr(self, "serving_form", "") not in ("low-rank", "low-rank after conversion"):
            return None
        try:
            return self.as_lora(spec)
        except TypeError:
            return None

    def on_install(self, spec: LayerSpec) -> None:
        """Called once the adapter is attached (build never touches the model; this may, e.g. to
        replace the base weight by a residual as PiSSA does). `on_delete` must undo it."""

    def on_delete(self, spec: LayerSpec) -> None:
        """Undo what the adapter did to the base layer (e.g. a rewritten weight) when it is removed."""

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
        """Change of the layer's output for input `x` (`base_out` is the bare base layer's output)."""
        raise NotImplementedError

    def delta_weight(self, spec: LayerSpec) -> torch.Tensor:
        """Change of the base weight, in `spec.weight`'s layout, float32."""
        raise TypeError(f"method {self.method!r} is not mergeable: its update is not a weight delta")

    def merge(self, spec: LayerSpec, weight: float, base_weight: torch.Tensor | None = None) -> None:
        """Fold `weight` times this adapter into `spec.weight`.

        `base_weight` (float32) is the unmerged base weight when other adapters are merged into
        `spec.weight` already; an update that depends on the base weight must use it (None: spec.weight
        is the unmerged base). Every adapter's update is defined on the bare base, as in `forward`.
        """
        w = spec.weight
        w.data += (weight * self.delta_weight(spec)).to(w.dtype)

    def unmerge(self, spec: LayerSpec, weight: float) -> None:
        w = spec.weight
        w.data -= (weight * self.delta_weight(spec)).to(w.dtype)

    def fused_forward(self, x: torch.Tensor, spec: LayerSpec, weight: float) -> torch.Tensor | None:
        """Optional fast path computing base + weight * delta in one go; None when not applicable."""
        return None

    # --- files (PEFT's key suffixes) ---
    def to_peft(self) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed by the suffix after the layer path (e.g. "lora_A.weight")."""
        raise NotImplementedError

    def from_peft(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy saved tensors in; raise `KeyError`/`ValueError` naming `where` and the key on mismatch."""
        own = self.to_peft()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise KeyError(f"{where}: missing key(s) {', '.join(missing)}")
        unexpected = sorted(set(tensors) - set(own))
        if unexpected:
            raise KeyError(f"{where}: unexpected key(s) {', '.join(unexpected)}")
        for key, target in own.items():
            source = tensors[key]
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(f"{where}.{key}: saved shape {tuple(source.shape)} does not fit the model, "
                                 f"which needs {tuple(target.shape)}")
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(tensors[key])
