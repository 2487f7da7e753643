"""Multi-adapter generation engine: continuous batching over one shared base model.

How a step works (`Engine.step`, always on one thread):

1. Pool upkeep: adapters unloaded by an admin and no longer used by a running request are removed
   from the model (their memory is freed); expired or cancelled requests finish.
2. Admission: waiting requests (FIFO) whose adapters are in host memory are admitted while the batch
   has room. Their adapters are activated (installed on the compute device) if needed, evicting
   least-recently-used adapters no running request uses, at most `max_active` at once. A request
   whose adapter is not in memory yet triggers a read on the background loader thread and waits;
   the batch in flight keeps decoding meanwhile.
3. Prefill: the admitted prompts run together in one forward pass (left-padded, rows grouped by
   adapter, a fresh KV cache) and sample their first tokens.
4. Join: the prefilled requests join the running batch. Rows are ordered by adapter (a row's
   `Terms`: none, one adapter, or a weighted mix), so every adapter's rows form one contiguous slice;
   caches are right-aligned (left-padded) to a common length. The `StepPlan` of slices is built here,
   once, and every adapted layer reads it (`ServingModule`).
5. Decode: one forward pass for the whole batch, one token per row, with per-row positions and an
   attention mask over the padding. Each row samples with its own temperature / top_p / seeded
   generator, checks EOS, stop strings and max tokens, and streams its new text.

Compressed adapter sets (`compress.py`, Compress then Serve) are installed once and stay resident:
their members need no paging, and their rows sit together in the batch (one segment per set).

Every response equals the same request served alone (greedy), up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import logging
import math
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraplex.core.adapter import layer_kind
from loraplex.core.io import CONFIG_NAME, AdapterFileError
from loraplex.serving import kv
from loraplex.serving.adapters import (
    AdapterNotFound,
    AdapterPool,
    HostAdapter,
    base_modules,
    release_freed_host_memory,
)
from loraplex.serving.compress import CompressedSet, is_compressed, read_compressed
from loraplex.serving.layers import PlanContext, ServingModule, StepPlan, Terms
from loraplex.serving.routing import PromptRouter, prompt_features

ROUTE_PREFIX = "route:"

log = logging.getLogger("loraplex.serving")


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; retry later (HTTP 429)."""


class InvalidRequest(ValueError):
    """The request cannot be served as given (HTTP 400); the message says why."""


@dataclass
class SamplingParams:
    """max_tokens new tokens at most; temperature 0 = greedy; top_p nucleus; seed for reproducible
    sampling (a request's draws do not depend on the other rows of its batch); stop strings end the
    text before them."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False        # keep going past EOS (benchmarks: exactly max_tokens tokens)

    def check(self, limit: int) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens > limit:
            raise InvalidRequest(f"max_tokens={self.max_tokens} is above this server's limit of {limit}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 100:
            raise InvalidRequest(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequest(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest("stop must be a non-empty string or a list of them")
        if len(self.stop) > 16:
            raise InvalidRequest("at most 16 stop strings")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop", "length", "timeout", "cancelled" or "error"
    prompt_tokens: int
    error: str | None = None
    error_type: str | None = None   # "invalid_adapter", "adapter_unloaded", "timeout", "internal"
    routed: str | dict[str, float] | None = None   # what a "route:<router>" request was served with

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    """A submitted request: its streamed text so far, and its `Completion` once done (`wait`)."""

    def __init__(self, prompt_ids: list[int], terms: Terms, params: SamplingParams, deadline: float | None,
                 listener: Callable[[str, Any], None] | None) -> None:
        self.id = "req-" + uuid.uuid4().hex[:20]
        self.prompt_ids = prompt_ids
        self.terms = terms
        self.group = ""                 # the compressed set of a single-member request: its rows sit together
        self.routed: str | dict[str, float] | None = None
        self.params = params
        self.deadline = deadline
        self.created = time.time()
        self.token_ids: list[int] = []
        self.text = ""                  # text streamed so far
        self.completion: Completion | None = None
        self._listener = listener
        self._done = threading.Event()
        self._cancelled = False

    @property
    def adapter(self) -> str | dict[str, float] | None:
        if not self.terms:
            return None
        if len(self.terms) == 1 and self.terms[0][1] == 1.0:
            return self.terms[0][0]
        return dict(self.terms)

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); finishes with reason "cancelled"."""
        self._cancelled = True

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} is not done after {timeout} s")
        assert self.completion is not None
        return self.completion

    def _emit(self, kind: str, payload: Any) -> None:
        if self._listener is not None:
            try:
                self._listener(kind, payload)
            except Exception:  # noqa: BLE001 - a broken listener must not stop the engine
                log.exception("request listener failed")


@dataclass
class _Seq:
    """Engine-side state of one request."""

    handle: RequestHandle
    order: int
    generator: torch.Generator | None = None
    cache_row: int = 0              # row in the prefill's KV cache, until it joins the batch
    n_real: int = 0                 # tokens in the KV cache
    last: int = -1                  # last sampled token, not yet in the cache
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    admitted: bool = False          # holds references on its adapters until released
    released: bool = False
    waiting_since: float = 0.0


@dataclass
class _Active:
    host: HostAdapter
    nbytes: int
    modules: list[str]


class ServedModel:
    """The base model with `ServingModule`s installed where active adapters need them."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.ctx = PlanContext()
        self.modules = base_modules(model)          # the original modules, by path
        self.wrappers: dict[str, ServingModule] = {}

    def install(self, adapter: HostAdapter) -> _Active:
        nbytes = 0
        touched = []
        for path, lw in adapter.layers.items():
            moved = lw.to(self.device)
            nbytes += sum(t.numel() * t.element_size() for t in moved.tensors())
            self._wrapper(path).add_lora(adapter.name, moved)
            touched.append(path)
        for path, module in adapter.saved.items():
            if self.device.type != "cpu":      # keep the host copy on the host
                module = copy.deepcopy(module).to(self.device)
            nbytes += sum(t.numel() * t.element_size() for t in module.state_dict().values())
            self._wrapper(path).saved[adapter.name] = module
            touched.append(path)
        return _Active(adapter, nbytes, touched)

    def uninstall(self, name: str, active: _Active) -> None:
        for path in active.modules:
            wrapper = self.wrappers.get(path)
            if wrapper is None:
                continue
            wrapper.remove_lora(name)
            wrapper.saved.pop(name, None)
            self._drop_if_empty(path, wrapper)

    def install_set(self, cset: CompressedSet) -> int:
        nbytes = 0
        for path, basis in cset.layers.items():
            moved = basis.to(self.device)
            nbytes += sum(t.numel() * t.element_size() for t in moved.tensors())
            self._wrapper(path).shared[cset.name] = moved
        return nbytes

    def uninstall_set(self, cset: CompressedSet) -> None:
        for path in cset.layers:
            wrapper = self.wrappers.get(path)
            if wrapper is not None:
                wrapper.shared.pop(cset.name, None)
                self._drop_if_empty(path, wrapper)

    def _drop_if_empty(self, path: str, wrapper: ServingModule) -> None:
        if wrapper.empty:   # no adapter left here: put the bare module back
            _set_submodule(self.model, path, wrapper.base_layer)
            del self.wrappers[path]

    def _wrapper(self, path: str) -> ServingModule:
        wrapper = self.wrappers.get(path)
        if wrapper is None:
            base = self.modules[path]
            wrapper = ServingModule(base, layer_kind(base) or "module", self.ctx)
            _set_submodule(self.model, path, wrapper)
            self.wrappers[path] = wrapper
        return wrapper


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


class Engine:
    """Continuous-batching generation over one base model and many adapters.

    model:       a Hugging Face causal LM of the LLaMA family (Llama, Mistral, Qwen2, SmolLM, ...),
                 unwrapped (not an `AdapterModel`); the engine wraps layers as adapters need them.
    tokenizer:   its tokenizer (decoding, EOS, chat template for the server).
    max_active:  adapters installed on the compute device at once (a request mixing k adapters needs k).
    max_cached:  adapters kept in host memory (least recently used evicted), >= max_active.
    max_batch:   rows decoded together; max_queue: waiting requests before `submit` raises `QueueFull`.
    max_prompt_tokens / max_new_tokens: per-request limits (default: the model's context length).
    prefill_per_step / max_prefill_tokens: new requests prefilled per step, together, and their padded
                 prompt tokens (bound the pause they cause to running rows).
    load_lookahead: adapter reads queued on the loader thread at once (reading ahead of the queue
                 further than the host cache holds would only evict what is about to be used).
    fairness_s:  a request that waited this long for an adapter slot stops later requests from being
                 admitted until it fits.
    """

    # When rows finish, the others move up in place, keeping the cache's columns; once the longest
    # remaining row needs this many columns fewer, the cache is rebuilt without them.
    trim_slack = 32

    def __init__(self, model: nn.Module, tokenizer: Any, *, model_name: str = "base", max_active: int = 8,
                 max_cached: int = 64, max_batch: int = 32, max_queue: int = 256,
                 max_prompt_tokens: int | None = None, max_new_tokens: int | None = None,
                 prefill_per_step: int = 8, max_prefill_tokens: int = 4096, load_lookahead: int = 4,
                 fairness_s: float = 2.0, device: str | torch.device | None = None) -> None:
        from loraplex.core.model import AdapterModel

        if isinstance(model, AdapterModel):
            raise TypeError("pass the bare base model; the engine installs adapters itself")
        if max_active < 1 or max_cached < max_active:
            raise ValueError(f"need 1 <= max_active <= max_cached, got max_active={max_active}, "
                             f"max_cached={max_cached}")
        if max_batch < 1 or max_queue < 1 or prefill_per_step < 1:
            raise ValueError("max_batch, max_queue and prefill_per_step must be positive")
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        model.to(self.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.dtype = param.dtype
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.served = ServedModel(model, self.device)
        self.max_active, self.max_batch, self.max_queue = max_active, max_batch, max_queue
        self.prefill_per_step, self.fairness_s = prefill_per_step, fairness_s
        self.max_prefill_tokens, self.load_lookahead = max_prefill_tokens, max(1, load_lookahead)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if isinstance(pad, int) else 0
        config = getattr(model, "config", None)
        self.context_length = int(getattr(config, "max_position_embeddings", None) or 4096)
        self.max_prompt_tokens = min(max_prompt_tokens or self.context_length, self.context_length)
        self.max_new_tokens = max_new_tokens or self.context_length
        self.num_layers = int(config.num_hidden_layers)
        self.eos_ids = _eos_ids(model, tokenizer)
        accepted = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in accepted else "past_key_values"   # transformers 5 renamed it
        self._last_logits_only = "logits_to_keep" in accepted
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if self._last_logits_only and isinstance(head, nn.Linear):
            # The model slices the last position out of (batch, length, d): a strided (batch, 1, d) input
            # makes matmul expand the (d, vocab) weight into one product per row (1.3 s for a 128-row
            # prefill on SmolLM2, 0.2 s for the same rows made contiguous first).
            head.register_forward_pre_hook(_contiguous_input)

        self._cond = threading.Condition()
        self.pool = AdapterPool(self.served.modules, self.dtype, max_cached=max_cached, on_change=self._wake)
        self._waiting: deque[_Seq] = deque()
        self._order = itertools.count()
        self._installs = itertools.count()
        self._installed_at: dict[str, int] = {}     # adapter -> when it was installed (its stack slot order)
        self._active: OrderedDict[str, _Active] = OrderedDict()   # LRU: least recently used first
        self._refs: Counter[str] = Counter()
        # compressed sets: name -> set; member adapter -> (set, index); sets installed / being removed
        self._sets: dict[str, CompressedSet] = {}
        self._members: dict[str, tuple[str, int]] = {}
        self._installed: dict[str, int] = {}          # set name -> bytes on the device
        self._leaving: set[str] = set()
        self._sets_lock = threading.Lock()
        self._routers: dict[str, PromptRouter] = {}
        self._deactivated = threading.Condition()
        self.rows: list[_Seq] = []
        self._prefilling: list[_Seq] = []
        self.cache = None
        self.length = 0
        self.plan: StepPlan | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self.counters: Counter[str] = Counter()
        self.step_seconds = 0.0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, path: str | Path, *, preload: bool = True) -> dict:
        """Register an adapter folder; with `preload` it is read and checked now (raises `AdapterFileError`)."""
        if name == self.model_name:
            raise ValueError(f"adapter name {name!r} is the base model's name")
        if name in self._active:
            raise ValueError(f"adapter {name!r} is still in use by running requests; retry shortly")
        if is_compressed(path):
            return self.add_compressed(path, name)
        if name in self._members or name in self._sets:
            raise ValueError(f"an adapter or compressed set named {name!r} is loaded already; unload it first")
        self.pool.register(name, path)
        if not preload:
            return {"name": name, "path": str(path)}
        try:
            adapter = self.pool.load_now(name)
        except Exception:
            self.pool.unregister(name)
            raise
        return {"name": name, **adapter.describe()}

    def add_adapter_dir(self, folder: str | Path) -> list[str]:
        """Register every adapter folder (holding an adapter_config.json) directly under `folder`, lazily."""
        root = Path(folder)
        if not root.is_dir():
            raise AdapterFileError(f"{root}: no such folder")
        names = []
        for sub in sorted(root.iterdir()):
            if sub.is_dir() and is_compressed(sub):
                names += self.add_compressed(sub, sub.name)["adapters"]
            elif sub.is_dir() and (sub / CONFIG_NAME).exists():
                self.add_adapter(sub.name, sub, preload=False)
                names.append(sub.name)
        return names

    def add_compressed(self, path: str | Path, name: str | None = None) -> dict:
        """Serve a compressed adapter set (`loraplex compress`): every member under its own name, resident.

        The set is read and checked here; it is installed on the engine thread before the next admission.
        """
        cset = read_compressed(path, self.served.modules, self.dtype, name)
        with self._sets_lock:
            taken = [n for n in [cset.name, *cset.adapters] if n in self._sets or n in self._members
                     or self.pool.is_registered(n) or n == self.model_name]
            if taken:
                raise ValueError(f"name(s) {taken} of compressed set {cset.name!r} are taken by the base model or "
                                 "loaded adapters; unload them first")
            self._sets[cset.name] = cset
            for i, member in enumerate(cset.adapters):
                self._members[member] = (cset.name, i)
        self._wake()
        return {"name": cset.name, "path": str(cset.path), "method": "compressed", "adapters": cset.adapters,
                "rank": max(b.rank for b in cset.layers.values()), "layers": len(cset.layers), "bytes": cset.nbytes}

    def _live_member(self, name: str) -> bool:
        entry = self._members.get(name)
        return entry is not None and entry[0] not in self._leaving

    # ------------------------------------------------------------------ routers
    def add_router(self, name: str, router: PromptRouter | str | Path) -> dict:
        """Serve requests naming "route:<name>": the router picks their adapter(s) from the prompt, once."""
        if not isinstance(router, PromptRouter):
            router = PromptRouter.load(router)
        if not name or any(c in name for c in "/\\ \n"):
            raise ValueError(f"router name must be a non-empty word, got {name!r}")
        if name in self._routers:
            raise ValueError(f"a router named {name!r} is loaded already")
        dim = self._embedding().weight.shape[1]
        if router.dim != dim:
            raise ValueError(f"router {name!r} reads {router.dim}-dim prompt features; this base model's embeddings "
                             f"have {dim} (fitted on another base model?)")
        unknown = [a for a in router.adapters if not (self.pool.is_registered(a) or self._live_member(a))]
        if unknown:
            raise ValueError(f"router {name!r} chooses among adapters {unknown} that are not loaded; load them first")
        self._routers[name] = router
        return {"name": ROUTE_PREFIX + name, "kind": router.kind, "adapters": router.adapters, "top_k": router.top_k}

    def remove_router(self, name: str) -> None:
        if self._routers.pop(name.removeprefix(ROUTE_PREFIX), None) is None:
            raise AdapterNotFound(f"no router named {name!r}")

    def router_names(self) -> list[str]:
        return [ROUTE_PREFIX + n for n in self._routers]

    def route(self, prompt_ids: Sequence[int], router: str) -> str | dict[str, float]:
        """The adapter (or weighted mix) router `router` ("route:<name>" or "<name>") picks for a prompt."""
        name = router.removeprefix(ROUTE_PREFIX)
        if name not in self._routers:
            raise AdapterNotFound(f"no router named {name!r}; routers: {', '.join(self.router_names()) or 'none'}")
        return self._routers[name].route(prompt_features(self._embedding(), [prompt_ids])[0])

    def _embedding(self) -> nn.Embedding:
        emb = self.served.model.get_input_embeddings()
        return getattr(emb, "base_layer", emb)      # the bare table, even while an adapter wraps it

    def adapter_names(self) -> list[str]:
        """Every adapter a request may name: registered ones and members of compressed sets."""
        return self.pool.names() + [m for m in list(self._members) if self._live_member(m)]

    def remove_adapter(self, name: str, *, wait: float | None = None) -> None:
        """Unregister; the adapter leaves the device (memory freed) once no running request uses it.

        `wait`: seconds to wait for that (it happens on the engine's next step). A compressed set is
        removed by its set name, all members together.
        """
        if name in self._sets and name not in self._leaving:
            self._leaving.add(name)
            self._wake()
            self._wait_gone(lambda: name in self._sets, wait)
            return
        if name in self._members:
            raise ValueError(f"{name!r} is a member of compressed set {self._members[name][0]!r}; unload the set")
        self.pool.unregister(name)
        if name not in self._active:
            release_freed_host_memory()     # it was only in the host tier: freed right here
        self._wait_gone(lambda: name in self._active, wait)

    def _wait_gone(self, present: Callable[[], bool], wait: float | None) -> None:
        if wait is None:
            return
        end = time.monotonic() + wait
        with self._deactivated:
            while present() and time.monotonic() < end:
                if self._thread is None:   # nobody else steps the engine: do the upkeep here
                    with torch.inference_mode():
                        self._upkeep()
                    if present():
                        return             # still used by requests that only `step()` can finish
                    continue
                self._deactivated.wait(0.05)

    def adapters(self) -> list[dict]:
        active, cached = set(self._active), set(self.pool.cached_names())
        loading = set(self.pool.loading_names())
        out = []
        for name in self.pool.names():
            try:
                path = str(self.pool.path(name))
            except AdapterNotFound:          # unloaded meanwhile
                continue
            state = ("active" if name in active else "cached" if name in cached
                     else "loading" if name in loading else "failed" if self.pool.failure(name) else "registered")
            out.append({"name": name, "path": path, "state": state,
                        "error": self.pool.failure(name)})
        for member, (set_name, _) in list(self._members.items()):
            cset = self._sets.get(set_name)
            if cset is not None and set_name not in self._leaving:
                out.append({"name": member, "path": str(cset.path), "state": "compressed", "set": set_name,
                            "error": None})
        return out

    def memory(self) -> dict:
        """Bytes held by adapters: in host memory, and installed on the compute device."""
        out = {"host_bytes": self.pool.host_bytes(),
               "device_bytes": sum(a.nbytes for a in list(self._active.values())),
               # the layers' stacked factors: the device copy of active plain LoRA adapters plus free slots
               "stack_bytes": sum(w.stack_bytes for w in list(self.served.wrappers.values())),
               "active": len(self._active), "cached": len(self.pool.cached_names()),
               "compressed_bytes": sum(self._installed.values()),
               "compressed_adapters": sum(len(self._sets[n].adapters) for n in list(self._installed))}
        if self.device.type == "cuda":
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return out

    # ------------------------------------------------------------------ requests
    def resolve(self, adapter: None | str | Mapping[str, float]) -> Terms:
        """A request's adapter choice as sorted `Terms`; raises `AdapterNotFound` / `InvalidRequest`."""
        if adapter is None or adapter == "" or adapter == self.model_name:
            return ()
        if isinstance(adapter, str):
            if not self.pool.is_registered(adapter) and not self._live_member(adapter):
                names = [self.model_name, *self.adapter_names()]
                shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
                raise AdapterNotFound(f"no adapter or model named {adapter!r}; available: {shown}")
            return ((adapter, 1.0),)
        if not isinstance(adapter, Mapping) or not adapter:
            raise InvalidRequest("adapters must be a name, or a non-empty mapping of adapter name to weight")
        terms = []
        for name, weight in adapter.items():
            if not isinstance(name, str) or not (self.pool.is_registered(name) or self._live_member(name)):
                raise AdapterNotFound(f"no adapter named {name!r}; available: {', '.join(self.adapter_names()[:20])}")
            if not _is_number(weight):
                raise InvalidRequest(f"adapter weight for {name!r} must be a finite number, got {weight!r}")
            if weight != 0:
                terms.append((name, float(weight)))
        if len([n for n, _ in terms if n not in self._members]) > self.max_active:
            raise InvalidRequest(f"a request may mix at most max_active={self.max_active} adapters")
        return tuple(sorted(terms))

    def submit(self, prompt_ids: Sequence[int], adapter: None | str | Mapping[str, float] = None,
               params: SamplingParams | None = None, *, timeout: float | None = None,
               listener: Callable[[str, Any], None] | None = None) -> RequestHandle:
        """Queue a request. `listener(kind, payload)` is called on the engine thread with
        ("delta", text) as text is produced and ("done", Completion) at the end."""
        params = params or SamplingParams()
        params.check(self.max_new_tokens)
        ids = list(prompt_ids)
        if not ids:
            raise InvalidRequest("the prompt is empty")
        vocab = self._vocab_size()
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(f"the prompt is {len(ids)} tokens; this server's limit is {self.max_prompt_tokens}")
        if len(ids) + params.max_tokens > self.context_length:
            raise InvalidRequest(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                 f"model's context length of {self.context_length}")
        routed = None
        if isinstance(adapter, str) and adapter.startswith(ROUTE_PREFIX):
            adapter = routed = self.route(ids, adapter)     # chosen once, from the prompt, for every token
        terms = self.resolve(adapter)
        deadline = None if timeout is None else time.monotonic() + timeout
        handle = RequestHandle(ids, terms, params, deadline, listener)
        handle.routed = routed
        if len(terms) == 1 and terms[0][1] == 1.0 and terms[0][0] in self._members:
            handle.group = "~" + self._members[terms[0][0]][0]     # after plain rows ("" sorts first)
        seq = _Seq(handle, next(self._order), waiting_since=time.monotonic())
        if params.temperature > 0:
            seq.generator = torch.Generator(device="cpu")
            seq.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self._waiting.append(seq)
            self.counters["submitted"] += 1
            self._cond.notify_all()
        for name, _ in terms:            # start reading from disk now if the loader is not busy
            if name not in self._members and name not in self._active and self.pool.get_cached(name) is None:
                self._maybe_load(name)
        return handle

    def _maybe_load(self, name: str) -> None:
        if len(self.pool.loading_names()) < self.load_lookahead:
            self.pool.request_load(name)

    def generate(self, prompts: Sequence[Sequence[int]], adapters: Sequence | None = None,
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 timeout: float | None = 600) -> list[Completion]:
        """Serve a list of requests to completion (steps the engine here unless it runs a thread)."""
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        handles = [self.submit(p, a, copy.copy(sp) if sp else None) for p, a, sp in zip(prompts, adapters, plist)]
        end = time.monotonic() + (timeout or 1e9)
        while not all(h.done() for h in handles):
            if time.monotonic() > end:
                raise TimeoutError("generate did not finish in time")
            if self._thread is None:
                if not self.step():
                    with self._cond:
                        self._cond.wait(0.01)
            else:
                time.sleep(0.005)
        return [h.wait() for h in handles]

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.pool.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while not self._stop:
            try:
                busy = self.step()
            except Exception as err:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("engine step failed")
                self.last_error = f"{type(err).__name__}: {err}"
                self._fail_all(f"internal error: {self.last_error}")
                busy = False
            if not busy:
                with self._cond:
                    if not self._waiting or self._stop:
                        self._cond.wait(0.05)
                    else:
                        self._cond.wait(0.005)   # waiting on an adapter read

    def step(self) -> bool:
        """One scheduling iteration; True when it did model work."""
        start = time.perf_counter()
        with torch.inference_mode():
            self._upkeep()
            admitted = self._admit()
            if admitted:
                self._prefilling = admitted      # failed together with the batch if the step fails
                cache = self._prefill(admitted)
                self._prefilling = []
                joining = []
                for seq in admitted:
                    if seq.finished:
                        self._release(seq)
                    else:
                        joining.append(seq)
                if joining:
                    self._join(joining, cache)
            if self.rows:
                self._decode()
        worked = bool(admitted or self.rows)
        if worked:
            self.step_seconds += time.perf_counter() - start
            self.counters["steps"] += 1
        return worked

    def queue_length(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ scheduling
    def _upkeep(self) -> None:
        now = time.monotonic()
        for seq in list(self.rows):
            h = seq.handle
            if h._cancelled:
                self._finish(seq, "cancelled")
            elif h.deadline is not None and now > h.deadline:
                self._finish(seq, "timeout", "the request timed out")
        if any(s.finished for s in self.rows):
            self._compact()
        with self._cond:
            dropped = [s for s in self._waiting if s.handle._cancelled
                       or (s.handle.deadline is not None and now > s.handle.deadline)]
            for s in dropped:
                self._waiting.remove(s)
        for s in dropped:
            if s.handle._cancelled:
                self._finish(s, "cancelled")
            else:
                self._finish(s, "timeout", "the request timed out while waiting in the queue")
        gone = [n for n in self._active if self._refs[n] == 0 and not self.pool.is_registered(n)]
        for name in gone:
            self._deactivate(name)
        with self._sets_lock:
            pending = [c for n, c in self._sets.items() if n not in self._installed and n not in self._leaving]
        for cset in pending:
            self._installed[cset.name] = self.served.install_set(cset)
        for set_name in list(self._leaving):
            cset = self._sets[set_name]
            if any(self._refs[m] for m in cset.adapters):
                continue                    # still used by running requests
            if set_name in self._installed:
                self.served.uninstall_set(cset)
                del self._installed[set_name]
            with self._sets_lock:
                for m in cset.adapters:
                    self._members.pop(m, None)
                del self._sets[set_name]
                self._leaving.discard(set_name)
            gone.append(set_name)
            with self._deactivated:
                self._deactivated.notify_all()
        if gone:
            release_freed_host_memory()

    def _admit(self) -> list[_Seq]:
        room = min(self.max_batch - len(self.rows), self.prefill_per_step)
        if room <= 0:
            return []
        with self._cond:
            candidates = list(self._waiting)
        admitted: list[_Seq] = []
        longest = 0
        now = time.monotonic()
        for i, seq in enumerate(candidates):
            if len(admitted) >= room:
                break
            plen = len(seq.handle.prompt_ids)
            if admitted and (len(admitted) + 1) * max(longest, plen) > self.max_prefill_tokens:
                continue
            names = [n for n, _ in seq.handle.terms]
            state, message = self._readiness(seq)
            if state in ("invalid_adapter", "adapter_unloaded"):
                self._remove_waiting(seq)
                self._finish(seq, "error", message, error_type=state)
                continue
            if state == "wait":
                continue
            if not self._activate(names):
                if i == 0 and now - seq.waiting_since > self.fairness_s:
                    break      # the oldest request waits for a slot: let the batch drain for it
                continue
            for n in names:
                self._refs[n] += 1
                if n in self._active:
                    self._active.move_to_end(n)
            seq.admitted = True
            self._remove_waiting(seq)
            admitted.append(seq)
            longest = max(longest, plen)
        if admitted:
            self.pool.set_pinned(set(self._active))
        return admitted

    def _remove_waiting(self, seq: _Seq) -> None:
        with self._cond, contextlib.suppress(ValueError):
            self._waiting.remove(seq)

    def _readiness(self, seq: _Seq) -> tuple[str, str | None]:
        terms = seq.handle.terms
        hosts = []
        for name, _ in terms:
            if name in self._members:
                set_name = self._members[name][0]
                if set_name in self._leaving:
                    return "adapter_unloaded", f"compressed set {set_name!r} (adapter {name!r}) was unloaded"
                if set_name not in self._installed:
                    return "wait", None
                continue
            if name in self._active and self.pool.is_registered(name):
                hosts.append(self._active[name].host)
                continue
            if not self.pool.is_registered(name):
                return "adapter_unloaded", f"adapter {name!r} was unloaded"
            host = self.pool.get_cached(name)
            if host is not None:
                hosts.append(host)
                continue
            failure = self.pool.failure(name)
            if failure is not None:
                return "invalid_adapter", f"adapter {name!r} cannot be loaded: {failure}"
            self._maybe_load(name)
            return "wait", None
        if any(h.saved for h in hosts) and (len(terms) > 1 or terms[0][1] != 1.0):
            return "invalid_adapter", ("adapters with modules_to_save (full per-adapter copies of a module) "
                                       "cannot be mixed or weighted")
        return "ready", None

    def _activate(self, names: list[str]) -> bool:
        missing = [n for n in names if n not in self._active and n not in self._members]
        if not missing:
            return True
        free = self.max_active - len(self._active)
        evictable = [n for n in self._active if self._refs[n] == 0 and n not in names]
        if len(missing) > free + len(evictable):
            return False
        for victim in evictable[: max(0, len(missing) - free)]:
            self._deactivate(victim)
            self.counters["adapter_evictions"] += 1
        for name in missing:
            host = self.pool.get_cached(name)
            if host is None:       # evicted from the host tier meanwhile: read it again
                self._maybe_load(name)
                return False
            self._active[name] = self.served.install(host)
            self._installed_at[name] = next(self._installs)
            self.counters["adapter_activations"] += 1
        return True

    def _deactivate(self, name: str) -> None:
        active = self._active.pop(name)
        self._installed_at.pop(name, None)
        self.served.uninstall(name, active)
        self.pool.set_pinned(set(self._active))
        with self._deactivated:
            self._deactivated.notify_all()

    def _release(self, seq: _Seq) -> None:
        if seq.admitted and not seq.released:
            seq.released = True
            for name, _ in seq.handle.terms:
                self._refs[name] -= 1

    # ------------------------------------------------------------------ model work
    def _forward(self, plan: StepPlan, **kwargs):
        self.served.ctx.plan = plan
        try:
            cache = kwargs.pop("cache")
            return self.served.model(**kwargs, **{self._cache_kwarg: cache}, use_cache=True)
        finally:
            self.served.ctx.plan = None

    def _prefill(self, seqs: list[_Seq]):
        """Run the new prompts together (left-padded, rows grouped by adapter); sample their first tokens.

        Returns the prefill's KV cache, whose rows `_join` copies into the running batch.
        """
        seqs.sort(key=self._row_key)
        lengths = [len(s.handle.prompt_ids) for s in seqs]
        width = max(lengths)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - lengths[i]:] = torch.tensor(s.handle.prompt_ids)
        n = torch.tensor(lengths)
        positions = (torch.arange(width)[None, :] - (width - n)[:, None]).clamp_min(0)
        mask = None
        if min(lengths) != width:
            mask = (torch.arange(width)[None, :] >= (width - n)[:, None]).long().to(self.device)
        cache = kv.new_cache(self.num_layers)
        extra = {"logits_to_keep": 1} if self._last_logits_only else {}
        out = self._forward(self._plan(seqs), input_ids=ids.to(self.device),
                            position_ids=positions.to(self.device), attention_mask=mask, cache=cache, **extra)
        logits = out.logits[:, -1].float()
        greedy = logits.argmax(-1).tolist()
        self.counters["prompt_tokens"] += sum(lengths)
        self.counters["prefills"] += len(seqs)
        for i, s in enumerate(seqs):
            s.n_real, s.cache_row = lengths[i], i
            self._take(s, greedy[i] if s.handle.params.temperature <= 0 else self._sample(s, logits[i]))
        return cache

    def _join(self, joining: list[_Seq], prefill_cache) -> None:
        rows = self.rows + joining
        rows.sort(key=self._row_key)
        length = max([self.length if self.rows else 0] + [s.n_real for s in joining])
        old_index = {id(s): i for i, s in enumerate(self.rows)}
        parts = [(self.cache, old_index[id(s)]) if id(s) in old_index else (prefill_cache, s.cache_row)
                 for s in rows]
        self.cache = kv.assemble(parts, length, headroom=32)
        self.rows, self.length = rows, length
        self.plan = self._plan(rows)

    def _decode(self) -> None:
        rows, length = self.rows, self.length
        ids = torch.tensor([[s.last] for s in rows], device=self.device)
        n_real = torch.tensor([s.n_real for s in rows], device=self.device)
        positions = n_real[:, None]
        mask = torch.arange(length + 1, device=self.device)[None, :] >= (length - n_real)[:, None]
        out = self._forward(self.plan, input_ids=ids, position_ids=positions, attention_mask=mask.long(),
                            cache=self.cache)
        self.length += 1
        logits = out.logits[:, -1].float()
        greedy = logits.argmax(-1).tolist()
        for i, seq in enumerate(rows):
            seq.n_real += 1
            token = greedy[i] if seq.handle.params.temperature <= 0 else self._sample(seq, logits[i])
            self._take(seq, token)
        if any(s.finished for s in rows):
            self._compact()

    def _compact(self) -> None:
        """Drop finished rows from the batch (and the padding columns no kept row needs)."""
        for s in self.rows:
            if s.finished:
                self._release(s)
        keep = [i for i, s in enumerate(self.rows) if not s.finished]
        if not keep:
            self.rows, self.cache, self.length, self.plan = [], None, 0, None
            return
        length = max(self.rows[i].n_real for i in keep)
        if self.length - length <= self.trim_slack:       # move the rows up in place; columns stay
            kv.drop_rows(self.cache, keep)
        else:                                             # the longest rows left: drop their columns too
            self.cache = kv.assemble([(self.cache, i) for i in keep], length, headroom=32)
            self.length = length
        self.rows = [self.rows[i] for i in keep]
        self.plan = self._plan(self.rows)

    def _row_key(self, seq: _Seq) -> tuple:
        """Rows sort by adapter, in the order adapters were installed: that is their slot order in the
        layers' stacks (`RankStack`) unless slots were reused, so each stack reads its rows in place."""
        h = seq.handle
        return (h.group, tuple(self._installed_at.get(n, -1) for n, _ in h.terms), h.terms, seq.order)

    def _plan(self, rows: list[_Seq]) -> StepPlan:
        return StepPlan([s.handle.terms for s in rows], self._members, self.device)

    def _sample(self, seq: _Seq, logits: torch.Tensor) -> int:
        p = seq.handle.params
        if p.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < p.top_p      # always keeps the most likely token
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=seq.generator))

    # ------------------------------------------------------------------ tokens, text, finishing
    def _take(self, seq: _Seq, token: int) -> None:
        h = seq.handle
        self.counters["generated_tokens"] += 1
        if token in self.eos_ids and not h.params.ignore_eos:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        seq.last = token
        h.token_ids = seq.tokens
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        cut = _find_stop(text, h.params.stop)
        if cut is not None:
            self._finish(seq, "stop", final_text=text[:cut])
            return
        if len(seq.tokens) >= h.params.max_tokens:
            self._finish(seq, "length", final_text=text)
            return
        hold = _held_back(text, h.params.stop)
        self._emit_text(seq, text[: len(text) - hold])

    def _emit_text(self, seq: _Seq, text: str) -> None:
        h = seq.handle
        if len(text) > len(h.text) and text.startswith(h.text):
            delta = text[len(h.text):]
            h.text = text
            h._emit("delta", delta)

    def _finish(self, seq: _Seq, reason: str, error: str | None = None, final_text: str | None = None,
                error_type: str | None = None) -> None:
        """End a request. Text held back while streaming (a possible stop-string start) is sent now,
        unless the request ended abnormally (timeout, cancelled, error: the text so far stands)."""
        if seq.finished:
            return
        seq.finished = True
        h = seq.handle
        if final_text is None and reason in ("length", "stop"):
            final_text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if final_text is not None:
            self._emit_text(seq, final_text)
        if error is not None and error_type is None:
            error_type = "timeout" if reason == "timeout" else "internal"
        h.completion = Completion(h.id, h.text, list(seq.tokens), reason, len(h.prompt_ids), error, error_type,
                                  h.routed)
        self.counters[f"finished_{reason}"] += 1
        h._emit("done", h.completion)
        h._done.set()

    def _fail_all(self, message: str) -> None:
        for seq in self.rows + self._prefilling:
            self._finish(seq, "error", message)
            self._release(seq)
        self.rows, self._prefilling, self.cache, self.length, self.plan = [], [], None, 0, None
        self.served.ctx.plan = None

    def _vocab_size(self) -> int:
        return int(self._embedding().weight.shape[0])

    def stats(self) -> dict:
        return {"running": len(self.rows), "waiting": len(self._waiting), "active_adapters": len(self._active),
                "registered_adapters": len(self.pool.names()), "counters": dict(self.counters),
                "step_seconds": self.step_seconds, "adapter_loads": self.pool.loads,
                "adapter_load_failures": self.pool.load_failures, **self.memory()}


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.add(tok_eos)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


def _find_stop(text: str, stops: Iterable[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` not to stream yet: a possible start of a stop string, or an
    incomplete multi-byte character."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold
