"""`attach` and `AdapterModel`: named adapters on any PyTorch model, several at once."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from loraplex.core.adapter import Adapter, LayerSpec, is_causal_lm
from loraplex.core.config import LoraConfig
from loraplex.core.layers import AdaptedLayer, MixedBatchPlan, SavedModule, SharedState
from loraplex.core.targeting import TargetError, find_targets, scan


class AdapterModel(nn.Module):
    """A model with named adapters. Attribute access falls through to the wrapped model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training   # the wrapper reports the mode of the model it wraps
        self.configs: dict[str, LoraConfig] = {}
        self._shared = SharedState()
        self._bias_params: dict[str, list[str]] = {}   # adapter -> base bias paths it trains
        self.shared_tensors = nn.ModuleDict()           # adapter -> tensors shared by all its layers
        self.shared_tensors.training = model.training

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # --- adapters ---
    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    @property
    def active(self) -> list[tuple[str, float]]:
        return list(self._shared.active)

    def add_adapter(self, name: str, config: LoraConfig, *, calibration_data: Iterable | None = None,
                    targets: list[str] | None = None) -> None:
        """Attach a new adapter named `name` (not activated unless it is the first one)."""
        self._check_new_name(name)
        self._refuse_if_merged(f"add adapter {name!r}")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a loraplex.LoraConfig, got {type(config).__name__}")
        built, saved, shared = self._build(name, config, targets)
        first = not self.configs   # the first adapter is activated, after its calibration
        self._install(name, config, built, saved, shared, activate=first and calibration_data is None)
        if calibration_data is not None:
            from loraplex.methods import get

            init = getattr(get(config.method), "calibrate", None)
            if init is None:
                raise ValueError(f"method {config.method!r} takes no calibration data")
            init(self, name, calibration_data)
            if first:
                self.set_active(name)

    def _refuse_if_merged(self, what: str) -> None:
        """New adapters initialise from the base weights (DoRA's magnitude, SVD-based inits), which hold
        other adapters' deltas while merged; refuse rather than build on the wrong weights."""
        merged = sorted({n for layer in self.adapted_layers().values() for n, _ in layer.merged})
        if merged:
            raise RuntimeError(f"cannot {what} while adapter(s) {', '.join(merged)} are merged; call unmerge() first")

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            raise ValueError(f"adapter name must be a non-empty string without '.' or '/', got {name!r}")
        if name in self.configs:
            raise ValueError(f"an adapter named {name!r} exists already; delete it first or pick another name "
                             f"(existing: {', '.join(self.configs)})")

    def _build(self, name: str, config: LoraConfig,
               targets: list[str] | None) -> tuple[dict[str, Adapter], list[str], nn.Module | None]:
        """Create the adapter modules without touching the model (so a failure changes nothing).

        Returns the adapters by layer path, the paths of the `modules_to_save`, and the module of
        tensors shared across layers (None for most methods).
        """
        from loraplex.methods import get

        method = get(config.method)
        modules, wrappers = scan(self.model)
        paths = find_targets(self.model, config.targets, config.exclude, modules) if targets is None else targets
        saved_paths = _saved_paths(modules, config.modules_to_save)
        self._check_adapted_vs_saved(name, paths, saved_paths, wrappers)
        specs, causal_lm = {}, is_causal_lm(self.model)
        for path in paths:
            if path not in modules:
                raise TargetError(f"module {path!r} does not exist in {type(self.model).__name__}")
            if any(path == s or path.startswith(s + ".") for s in saved_paths):
                continue  # trained in full: neither it nor its children get low-rank adapters
            try:
                specs[path] = LayerSpec.of(modules[path])
                specs[path].causal_lm = causal_lm
            except (TypeError, ValueError) as err:
                raise TargetError(f"{path}: {err}") from None
        shared = method.build_shared(config, specs)
        extra = {} if shared is None else {"shared": shared}
        built = {}
        for path, spec in specs.items():
            r, alpha = config.rank_and_alpha(path)
            try:
                built[path] = method(spec, r, alpha, config, **extra)
            except (TypeError, ValueError) as err:
                raise TargetError(f"{path}: {err}") from None
        return built, saved_paths, shared

    def _check_adapted_vs_saved(self, name: str, targets: list[str], saved: list[str],
                                wrappers: dict[str, nn.Module]) -> None:
        """A module is either adapted (low rank) or trained in full (`modules_to_save`), never both.

        Wrapping one kind of wrapper inside the other would copy other adapters into the full copy
        and put their tensors under paths PEFT does not know; refuse it before touching anything.
        """
        for path in targets:
            module = wrappers.get(path)
            if isinstance(module, SavedModule) and not any(path == s for s in saved):
                raise TargetError(f"{path} is trained in full for adapter(s) {', '.join(module.modules_to_save)} "
                                  f"(modules_to_save), so adapter {name!r} cannot also adapt it; exclude it")
        for s in saved:
            adapted = [p for p, m in wrappers.items() if isinstance(m, AdaptedLayer) and (p == s or p.startswith(s + "."))]
            if adapted:
                owners = sorted({n for p in adapted for n in wrappers[p].adapters})
                raise TargetError(f"modules_to_save {s!r} of adapter {name!r} holds layer(s) adapted by "
                                  f"{', '.join(owners)} ({', '.join(adapted[:3])}); a module cannot be both adapted "
                                  "and trained in full")

    def _install(self, name: str, config: LoraConfig, built: dict[str, Adapter], saved: list[str],
                 shared: nn.Module | None = None, activate: bool = False) -> None:
        """Put built adapters into the model; `activate`: make `name` the only active adapter (the
        caller has refused merged models, so this is what `set_active(name)` would do)."""
        # New modules start in the mode of the model they join: an adapter added to a model in eval
        # mode must not run dropout (nn.Module starts in training mode).
        mode = self.model.training
        if shared is not None:
            self.shared_tensors[name] = shared.train(mode)
            self.shared_tensors.training = mode
        modules, wrappers = scan(self.model)
        for path, adapter in built.items():
            layer = wrappers.get(path)
            if not isinstance(layer, AdaptedLayer):
                layer = AdaptedLayer(modules[path], self._shared)
                layer.training = layer.adapters.training = mode   # flags only: the base keeps its own mode
                _set_submodule(self.model, path, layer)
            # straight into the ModuleDict (the name was checked by _check_new_name; add_module's checks
            # cost more than the rest of installing a layer's adapter)
            layer.adapters._modules[name] = adapter.train(mode)
            adapter.on_install(layer.spec)
        for path in saved:
            module = wrappers.get(path)
            if not isinstance(module, SavedModule):
                module = SavedModule(modules[path], self._shared)
                module.training = module.modules_to_save.training = mode
                _set_submodule(self.model, path, module)
            module.add(name)
            module.modules_to_save[name].train(mode)
        self._bias_params[name] = self._bias_paths(config, list(built), saved, modules)
        self.configs[name] = config
        if activate:
            self._shared.active = [(name, 1.0)]
        self._update_trainable(freeze_base=True)  # the base stays frozen; only active adapters train

    def _bias_paths(self, config: LoraConfig, adapted: list[str], saved: list[str],
                    modules: dict[str, nn.Module]) -> list[str]:
        """Paths of the modules (as the user knows them) whose bias this adapter trains.

        Module paths, not parameter names: wrapping and unwrapping layers for other adapters moves a
        bias between `x.bias` and `x.base_layer.bias`, so the parameter is looked up when needed.
        "lora_only" means the biases of the layers this adapter adapts, not those of other adapters.
        """
        if config.bias == "none":
            return []
        paths = adapted if config.bias == "lora_only" else [
            p for p in modules if not any(p == s or p.startswith(s + ".") for s in saved)]
        return [p for p in paths if isinstance(getattr(modules[p], "bias", None), nn.Parameter)]

    def bias_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The base biases adapter `name` trains, keyed by their current parameter names (PEFT's)."""
        if not self._bias_params.get(name):
            return {}
        modules, wrappers = scan(self.model)
        out = {}
        for path in self._bias_params.get(name, []):
            wrapper = wrappers.get(path)
            inner = ("base_layer." if isinstance(wrapper, AdaptedLayer)
                     else "original_module." if isinstance(wrapper, SavedModule) else "")
            out[f"{path}.{inner}bias"] = modules[path].bias
        return out

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter everywhere; layers left with none are unwrapped (memory really freed)."""
        self._require(name)
        for p in self.bias_parameters(name).values():  # frozen again unless an active adapter trains them
            p.requires_grad_(False)
        for path, module in list(self._wrappers()):
            if isinstance(module, AdaptedLayer) and name in module.adapters:
                if any(n == name for n, _ in module.merged):
                    raise RuntimeError(f"adapter {name!r} is merged; call unmerge() before deleting it")
                module.adapters[name].on_delete(module.spec)
                del module.adapters[name]
                module._stack_cache = None
                module._factor_cache.pop(name, None)
                if not module.adapters:
                    _set_submodule(self.model, path, module.base_layer)
            elif isinstance(module, SavedModule) and name in module.modules_to_save:
                del module.modules_to_save[name]
                if not module.modules_to_save:
                    _set_submodule(self.model, path, module.original_module)
        del self.configs[name]
        if name in self.shared_tensors:
            del self.shared_tensors[name]
        self._bias_params.pop(name, None)
        self._shared.active = [(n, w) for n, w in self._shared.active if n != name]
        self._update_trainable()

    def set_active(self, names: str | Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Activate one adapter, or several whose deltas add up (optionally weighted)."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._require(n)
        if weights is None:
            weights = [1.0] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} weights for {len(names)} adapters")
        if any(w != 1.0 for w in weights) and any(self.configs[n].modules_to_save for n in names):
            raise ValueError("weighted combinations cannot include adapters with modules_to_save")
        active = [(n, float(w)) for n, w in zip(names, weights)]
        if active != self._shared.active and any(layer.merged for layer in self.adapted_layers().values()):
            # Merged adapters would stay in the weights and add to the new ones (PEFT unmerges too).
            warnings.warn("switching adapters unmerged the merged ones; call merge() again to fold in the new "
                          "active adapters", stacklevel=2)
            self.unmerge()
        self._shared.active = active
        self._update_trainable()

    def _update_trainable(self, freeze_base: bool = False) -> None:
        """Parameters of the active adapters train; everything else is frozen.

        `freeze_base`: first freeze every parameter of the base model.
        """
        active = {n for n, _ in self._shared.active}
        modules, wrappers = scan(self.model)
        if freeze_base:
            for path, module in [("", self.model), *modules.items()]:
                # a wrapped layer's whole subtree; any other module's own parameters (its children follow)
                params = module.parameters() if path in wrappers else module._parameters.values()
                for p in params:
                    if p is not None:
                        p.requires_grad_(False)
        for module in wrappers.values():
            if isinstance(module, SavedModule):   # its copies train below, the original stays frozen
                for p in module.original_module.parameters():
                    p.requires_grad_(False)
        for module in wrappers.values():
            children = module.adapters if isinstance(module, AdaptedLayer) else module.modules_to_save
            for n, child in children.items():
                on = n in active
                for p in (child.parameters() if child._modules else child._parameters.values()):
                    if p is not None:
                        p.requires_grad_(on)
        for n, shared in self.shared_tensors.items():
            for p in shared.parameters():
                p.requires_grad_(n in active)
        # bias_parameters walks the whole model: only ask for adapters that train biases at all
        with_bias = [n for n, paths in self._bias_params.items() if paths]
        for n in with_bias:
            for p in self.bias_parameters(n).values():
                p.requires_grad_(False)
        for n in with_bias:
            if n in active:
                for p in self.bias_parameters(n).values():
                    p.requires_grad_(True)

    def _require(self, name: str) -> None:
        if name not in self.configs:
            raise KeyError(f"no adapter named {name!r}; adapters: {', '.join(self.configs) or '(none)'}")

    def _wrappers(self) -> Iterator[tuple[str, nn.Module]]:
        yield from scan(self.model)[1].items()

    def adapted_layers(self, name: str | None = None) -> dict[str, AdaptedLayer]:
        return {p: m for p, m in self._wrappers() if isinstance(m, AdaptedLayer)
                and (name is None or name in m.adapters)}

    # --- switching off ---
    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the bare base model inside this block (merged adapters are unmerged meanwhile)."""
        merged = {p: list(m.merged) for p, m in self.adapted_layers().items() if m.merged}
        for p in merged:
            self.model.get_submodule(p).unmerge_all()
        previous, self._shared.disabled = self._shared.disabled, True
        try:
            yield
        finally:
            self._shared.disabled = previous
            for p, entries in merged.items():
                self.model.get_submodule(p).merge_many(entries)

    # --- merging ---
    def merge(self) -> None:
        """Fold the active adapters (with their weights) into the base weights."""
        for name, _ in self._shared.active:
            if not all(type(a).mergeable for a in self._adapters(name)):
                raise TypeError(f"adapter {name!r} ({self.configs[name].method}) is not mergeable")
        with torch.no_grad():
            for layer in self.adapted_layers().values():
                done = {n for n, _ in layer.merged}
                layer.merge_many([(name, weight) for name, weight in self._shared.active
                                  if name in layer.adapters and name not in done])

    def unmerge(self) -> None:
        with torch.no_grad():
            for layer in self.adapted_layers().values():
                layer.unmerge_all()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain model (this wrapper is then empty)."""
        self.merge()
        active = [n for n, _ in self._shared.active]
        for path, module in list(self._wrappers()):
            if isinstance(module, AdaptedLayer):
                _set_submodule(self.model, path, module.base_layer)
            else:
                keep = next((module.modules_to_save[n] for n in active if n in module.modules_to_save),
                            module.original_module)
                _set_submodule(self.model, path, keep)
        model = self.model
        for p in model.parameters():
            p.requires_grad_(False)
        self.configs.clear()
        self._bias_params.clear()
        self._shared.active = []
        return model

    def _adapters(self, name: str) -> list[Adapter]:
        return [layer.adapters[name] for layer in self.adapted_layers(name).values()]

    # --- parameters ---
    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        own = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        shared = {f"shared_tensors.{n}": p for n, p in self.shared_tensors.named_parameters() if p.requires_grad}
        return own | shared

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train: those of the active adapters (plus trained biases)."""
        return list(self.named_trainable_parameters().values())

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # --- running ---
    @contextlib.contextmanager
    def _plan(self, adapter_ids: Sequence[str | None] | None) -> Iterator[None]:
        if adapter_ids is None:
            yield
            return
        unknown = sorted({a for a in adapter_ids if a is not None and a not in self.configs})
        if unknown:
            raise KeyError(f"adapter_ids name unknown adapters {unknown}; adapters: {', '.join(self.configs)}")
        device = next(self.model.parameters()).device
        self._shared.plan = MixedBatchPlan(adapter_ids, device)
        try:
            yield
        finally:
            self._shared.plan = None

    def forward(self, *args, adapter_ids: Sequence[str | None] | None = None, **kwargs):
        """Run the model; `adapter_ids` picks an adapter (or None for the bare base) per batch row."""
        with self._plan(adapter_ids):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_ids: Sequence[str | None] | None = None, **kwargs):
        with self._plan(adapter_ids):
            return self.model.generate(*args, **kwargs)

    # --- files ---
    def save(self, path, name: str | None = None, *, as_lora: bool = False) -> None:
        """Save in PEFT's format: one adapter to `path`, or all (`default` at `path`, others in subfolders).

        `as_lora=True` converts each adapter to a plain LoRA for the unmodified base (PiSSA-style methods).
        """
        from loraplex.core.io import save_adapter

        if name is not None:
            self._require(name)
            save_adapter(self, name, path, as_lora)
            return
        if not self.configs:
            raise ValueError("there is no adapter to save")
        import os

        for n in self.configs:
            root = n == "default" or len(self.configs) == 1
            save_adapter(self, n, path if root else os.path.join(path, n), as_lora)


def attach(model: nn.Module, config: LoraConfig | None = None, name: str = "default", *,
           calibration_data: Iterable | None = None) -> AdapterModel:
    """Wrap `model` in place with an adapter called `name`; the base parameters are frozen."""
    if isinstance(model, AdapterModel):
        model.add_adapter(name, config or LoraConfig(), calibration_data=calibration_data)
        return model
    wrapped = AdapterModel(model)
    wrapped.add_adapter(name, config or LoraConfig(), calibration_data=calibration_data)
    return wrapped


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root
    *parents, leaf = path.split(".")
    for part in parents:   # through _modules: get_submodule's attribute lookups cost ~10x more
        parent = parent._modules[part]
    setattr(parent, leaf, module)


def _saved_paths(modules: dict[str, nn.Module], names: list[str]) -> list[str]:
    if not names:
        return []
    paths = [p for p in modules if any(p == n or p.endswith("." + n) for n in names)]
    missing = [n for n in names if not any(p == n or p.endswith("." + n) for p in paths)]
    if missing:
        raise TargetError(f"modules_to_save names unknown modules {missing}")
    # keep outermost matches only
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
