"""Adapters for serving: read and check PEFT folders against the base, and page them.

Three tiers, as in vLLM's two-level LRU:

* registered: a name and a folder on disk (nothing read yet for lazily registered ones);
* cached:     read, checked and converted (`HostAdapter`: per-layer Aᵀ and s·Bᵀ, DoRA ratios) in host
              memory, at most `max_cached`, least recently used evicted first;
* active:     installed in the model's `ServingModule`s on the compute device, at most `max_active`.
              Activation and eviction happen on the engine thread between steps (see `Engine`);
              an adapter used by a running request is never evicted.

Reading from disk happens on a background thread (`request_load`), so a request naming an adapter
that is not in memory yet waits in the queue while the batch in flight keeps decoding.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loraplex.core.adapter import EMBEDDING, GPT2_CONV1D, LINEAR, LayerSpec, layer_kind
from loraplex.core.io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterFileError, read_adapter_files
from loraplex.serving.layers import LoraWeights

log = logging.getLogger("loraplex.serving")

SERVED_KINDS = (LINEAR, GPT2_CONV1D, EMBEDDING)
_SUFFIXES = {
    "lora_A.weight": "A", "lora_B.weight": "B",
    "lora_embedding_A": "A", "lora_embedding_B": "B",
    "lora_magnitude_vector": "m", "lora_magnitude_vector.weight": "m",
}


class AdapterNotFound(KeyError):
    """No adapter of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class HostAdapter:
    """An adapter read, checked and converted for the grouped path, in host memory."""

    name: str
    path: Path
    method: str
    dora: bool
    layers: dict[str, LoraWeights]
    saved: dict[str, nn.Module] = field(default_factory=dict)   # modules_to_save: the adapter's own copies

    @property
    def ranks(self) -> list[int]:
        return sorted({lw.rank for lw in self.layers.values()})

    def tensors(self) -> list[torch.Tensor]:
        out = [t for lw in self.layers.values() for t in lw.tensors()]
        return out + [t for module in self.saved.values() for t in module.state_dict().values()]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def describe(self) -> dict:
        return {"path": str(self.path), "method": "dora" if self.dora else self.method, "ranks": self.ranks,
                "layers": len(self.layers), "modules_to_save": sorted(self.saved), "bytes": self.nbytes}


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module path of the (unwrapped) base model -> module."""
    return {path: m for path, m in model.named_modules() if path}


def read_adapter(path: str | Path, name: str, modules: dict[str, nn.Module], dtype: torch.dtype) -> HostAdapter:
    """Read a PEFT-format LoRA/rsLoRA/DoRA folder and check it against the base modules.

    Raises `AdapterFileError` naming the file and key: pickled or unreadable weights, another method,
    modules the base lacks, shapes that do not fit, or an adapter that matches no module at all.
    """
    config, tensors, folder = read_adapter_files(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if config.method != "lora":
        raise AdapterFileError(f"{config_file}: method {config.method!r} cannot be served; the server serves "
                               "LoRA, rsLoRA and DoRA adapters (save others with as_lora=True)")
    if config.bias != "none":
        raise AdapterFileError(f"{config_file}: bias={config.bias!r} (trained base biases) cannot be served; "
                               "only adapters with bias='none' can share one base")
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for suffix, role in _SUFFIXES.items():
            if key.endswith("." + suffix):
                per_layer.setdefault(key[: -len(suffix) - 1], {})[role] = tensor
                break
        else:
            rest[key] = tensor

    saved_paths = _saved_paths(modules, config.modules_to_save, config_file)
    saved: dict[str, nn.Module] = {}
    for spath in saved_paths:
        module = modules[spath]
        if any(True for _ in module.children()):
            raise AdapterFileError(f"{config_file}: modules_to_save {spath!r} is not a leaf module; the server "
                                   "serves per-adapter copies of leaf modules (a head, an embedding) only")
        state = {}
        for key, ref in module.state_dict().items():
            full = f"{spath}.{key}"
            if full not in rest:
                raise AdapterFileError(f"{weights_file}: missing key {PREFIX}{full} (modules_to_save)")
            if tuple(rest[full].shape) != tuple(ref.shape):
                raise AdapterFileError(f"{weights_file}: {PREFIX}{full} has shape {tuple(rest[full].shape)}, "
                                       f"the base model needs {tuple(ref.shape)} (made for another base model?)")
            state[key] = rest.pop(full).to(ref.dtype).contiguous()
        saved[spath] = _leaf_copy(module, state)
    if rest:
        keys = sorted(rest)
        raise AdapterFileError(f"{weights_file}: unexpected key(s) {', '.join(PREFIX + k for k in keys[:5])}"
                               f"{' …' if len(keys) > 5 else ''}: not LoRA factors of any module (was the adapter "
                               "made for another base model?)")

    layers: dict[str, LoraWeights] = {}
    missing = sorted(p for p in per_layer if p not in modules)
    if missing and len(missing) == len(per_layer) and not saved:
        raise AdapterFileError(
            f"{weights_file}: the adapter matches no module of the base model (it names e.g. {missing[0]!r}; "
            f"was it made for another base model?)")
    if missing:
        raise AdapterFileError(f"{weights_file}: key {PREFIX}{missing[0]}.* names a module the base model does not "
                               "have (was the adapter made for another base model?)")
    for lpath, parts in per_layer.items():
        where = f"{weights_file}: {PREFIX}{lpath}"
        module = modules[lpath]
        kind = layer_kind(module)
        if kind not in SERVED_KINDS:
            raise AdapterFileError(f"{where}: a {type(module).__name__} layer cannot be served "
                                   f"(served: Linear, GPT-2 Conv1D, Embedding)")
        if "A" not in parts or "B" not in parts:
            raise AdapterFileError(f"{where}: needs both the A and the B factor")
        if any(p in saved_paths for p in (lpath,)):
            raise AdapterFileError(f"{where}: module is both LoRA-adapted and in modules_to_save")
        layers[lpath] = _layer_weights(parts, LayerSpec.of(module), config, lpath, where, dtype)
    if not layers and not saved:
        raise AdapterFileError(f"{weights_file}: the adapter holds no LoRA factors and no modules_to_save, so it "
                               "matches no module of the base model")
    return HostAdapter(name, folder, config.method, bool(config.dora), layers, saved)


def _leaf_copy(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of a leaf module holding `state` instead of the base's tensors (which are not copied)."""
    clone = copy.copy(module)
    clone._parameters = {k: None if p is None else nn.Parameter(state[k], requires_grad=False)
                         for k, p in module._parameters.items()}
    clone._buffers = {k: None if b is None else state.get(k, b) for k, b in module._buffers.items()}
    clone._forward_hooks, clone._forward_pre_hooks = OrderedDict(), OrderedDict()
    return clone.eval()


def _saved_paths(modules: dict[str, nn.Module], names: list[str], where: Path) -> list[str]:
    out = []
    for n in names:
        found = [p for p in modules if p == n or p.endswith("." + n)]
        if not found:
            raise AdapterFileError(f"{where}: modules_to_save names {n!r}, which the base model does not have")
        out += [p for p in found if not any(p.startswith(q + ".") for q in found)]
    return sorted(set(out))


def _layer_weights(parts: dict[str, torch.Tensor], spec: LayerSpec, config, path: str, where: str,
                   dtype: torch.dtype) -> LoraWeights:
    a, b = parts["A"], parts["B"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterFileError(f"{where}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a LoRA pair")
    r = a.shape[0]
    d_in, d_out = spec.in_features, spec.out_features
    if spec.kind == EMBEDDING:
        ok = a.shape[1] == d_in and b.shape[0] == d_out
    else:
        ok = tuple(a.shape) == (r, d_in) and tuple(b.shape) == (d_out, r)
    if not ok:
        raise AdapterFileError(f"{where}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the base layer "
                               f"({d_in} -> {d_out}); was the adapter made for another base model?")
    _, alpha = config.rank_and_alpha(path)
    scale = config.scale(r, alpha)
    a64, b64 = a.double(), b.double() * scale
    ratio = None
    if config.dora:
        if "m" not in parts:
            raise AdapterFileError(f"{where}: DoRA adapter without lora_magnitude_vector")
        m = parts["m"].reshape(-1)
        if m.shape[0] != d_out:
            raise AdapterFileError(f"{where}: lora_magnitude_vector has {m.shape[0]} entries, the layer {d_out}")
        ratio = (m.double() / _row_norms(spec.weight.detach(), a64, b64)).to(dtype)
    elif "m" in parts:
        raise AdapterFileError(f"{where}: lora_magnitude_vector in an adapter whose config has use_dora=false")
    return LoraWeights(spec.kind, a64.t().to(dtype).contiguous(), b64.t().to(dtype).contiguous(), ratio)


def _row_norms(w: torch.Tensor, a: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """‖W + sBA‖ per output row without forming sBA:  ‖W_j‖² + 2 (W Aᵀ)_j·(sB)_j + (sB)_j (A Aᵀ) (sB)_jᵀ."""
    w = w.double()
    sq = (w * w).sum(1) + 2 * ((w @ a.t()) * sb).sum(1) + ((sb @ (a @ a.t())) * sb).sum(1)
    return sq.clamp_min(0).sqrt()


class AdapterPool:
    """Registered adapters, the host-memory LRU cache and the background loader.

    Thread-safe. The device tier (`active`) is kept here but only the engine thread changes it.
    """

    def __init__(self, modules: dict[str, nn.Module], dtype: torch.dtype, *, max_cached: int = 64,
                 on_change=None) -> None:
        self.modules, self.dtype = modules, dtype
        self.max_cached = max_cached
        self._lock = threading.RLock()
        self._registered: dict[str, Path] = {}
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()
        self._loading: set[str] = set()
        self._failed: dict[str, str] = {}
        self._pinned: set[str] = set()        # active on the device: never evicted from the host tier
        self._on_change = on_change or (lambda: None)
        self._jobs: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.loads = 0
        self.load_failures = 0
        self.host_evictions = 0
        self.load_seconds = 0.0

    # --- registry ---
    def register(self, name: str, path: str | Path) -> None:
        _check_name(name)
        folder = Path(path)
        with self._lock:
            if name in self._registered:
                raise ValueError(f"an adapter named {name!r} is loaded already; unload it first")
            self._registered[name] = folder
            self._failed.pop(name, None)

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self._registered:
                raise AdapterNotFound(f"no adapter named {name!r}")
            del self._registered[name]
            self._host.pop(name, None)
            self._failed.pop(name, None)
        self._on_change()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._registered)

    def path(self, name: str) -> Path:
        with self._lock:
            if name not in self._registered:
                raise AdapterNotFound(f"no adapter named {name!r}")
            return self._registered[name]

    def is_registered(self, name: str) -> bool:
        with self._lock:
            return name in self._registered

    # --- host tier ---
    def load_now(self, name: str) -> HostAdapter:
        """Read (or return the cached) adapter in the calling thread; raises `AdapterFileError`."""
        with self._lock:
            if name in self._host:
                self._host.move_to_end(name)
                return self._host[name]
            path = self.path(name)
        start = time.perf_counter()
        try:
            adapter = read_adapter(path, name, self.modules, self.dtype)
        except AdapterFileError as err:
            with self._lock:
                self.load_failures += 1
                if self._registered.get(name) == path:
                    self._failed[name] = str(err)
            raise
        with self._lock:
            self.loads += 1
            self.load_seconds += time.perf_counter() - start
            if self._registered.get(name) == path:   # not unloaded (or replaced) meanwhile
                self._host[name] = adapter
                self._failed.pop(name, None)
                self._evict_host()
        return adapter

    def request_load(self, name: str) -> None:
        """Start reading `name` on the loader thread unless it is cached, loading or failed."""
        with self._lock:
            if name in self._host or name in self._loading or name in self._failed:
                return
            self.path(name)
            self._loading.add(name)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loader, name="loraplex-adapter-loader", daemon=True)
                self._thread.start()
        self._jobs.put(name)

    def _loader(self) -> None:
        while True:
            name = self._jobs.get()
            if name is None:
                return
            try:
                self.load_now(name)
            except (AdapterFileError, AdapterNotFound) as err:
                log.warning("adapter %r failed to load: %s", name, err)
            except Exception as err:  # noqa: BLE001 - a loader crash must not strand waiting requests
                log.exception("adapter %r failed to load", name)
                with self._lock:
                    self._failed[name] = f"{type(err).__name__}: {err}"
            finally:
                with self._lock:
                    self._loading.discard(name)
                self._on_change()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)

    def get_cached(self, name: str) -> HostAdapter | None:
        with self._lock:
            adapter = self._host.get(name)
            if adapter is not None:
                self._host.move_to_end(name)
            return adapter

    def failure(self, name: str) -> str | None:
        with self._lock:
            return self._failed.get(name)

    def retry(self, name: str) -> None:
        with self._lock:
            self._failed.pop(name, None)

    def set_pinned(self, names: set[str]) -> None:
        with self._lock:
            self._pinned = set(names)
            self._evict_host()

    def _evict_host(self) -> None:
        while len(self._host) > self.max_cached:
            victim = next((n for n in self._host if n not in self._pinned), None)
            if victim is None:
                return
            del self._host[victim]
            self.host_evictions += 1

    def cached_names(self) -> list[str]:
        with self._lock:
            return list(self._host)

    def loading_names(self) -> list[str]:
        with self._lock:
            return sorted(self._loading)

    def host_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._host.values())


def release_freed_host_memory() -> bool:
    """Hand freed heap pages back to the OS.

    Adapter tensors are many small blocks; glibc keeps such blocks after `free`, so without this the
    process RSS would not drop when adapters are unloaded (measured: 24 MiB of adapters unloaded,
    RSS unchanged; after `malloc_trim`, RSS back to where it was before loading).
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):   # not glibc
        return False


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/\\\n\r\t") or len(name) > 200:
        raise ValueError(f"adapter name must be a non-empty string without slashes or control characters, "
                         f"got {name!r}")
