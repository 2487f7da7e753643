"""Which modules of a model an adapter attaches to."""

from __future__ import annotations

import difflib
import re
from typing import Any

from torch import nn

from loraplex.core.adapter import GPT2_CONV1D, LINEAR, layer_kind
from loraplex.core.layers import AdaptedLayer, SavedModule


class TargetError(ValueError):
    """The targets match nothing, or match something we cannot adapt."""


def scan(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """One walk of `model`: (every module path -> the module as the user knows it, path -> our wrapper).

    The user's module is the base layer for wrapped layers. Wrappers are not descended into (their
    adapters can outnumber the model's own modules), which keeps this cheap enough to run on every
    add / load / delete. The order is `named_modules`' (depth first), each module once.
    """
    modules: dict[str, nn.Module] = {}
    wrappers: dict[str, nn.Module] = {}
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, AdaptedLayer):
            modules[path], wrappers[path] = module._modules["base_layer"], module
            continue
        if isinstance(module, SavedModule):
            modules[path], wrappers[path] = module._modules["original_module"], module
            continue
        if path:
            modules[path] = module
        children = module._modules
        if children:
            prefix = path + "." if path else ""
            stack.extend([(prefix + n, m) for n, m in reversed(children.items()) if m is not None])
    return modules, wrappers


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module path -> the module as the user knows it (the base layer for wrapped layers)."""
    return scan(model)[0]


def _matches_name(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _matches(path: str, module: nn.Module, spec: Any) -> bool:
    if isinstance(spec, str):
        return bool(re.fullmatch(spec, path))
    if isinstance(spec, type):
        return isinstance(module, spec)
    return any(isinstance(module, t) if isinstance(t, type) else _matches_name(path, t) for t in spec)


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head.base_layer if isinstance(head, AdaptedLayer) else head


def find_targets(model: nn.Module, targets: Any, exclude: Any = None,
                 modules: dict[str, nn.Module] | None = None) -> list[str]:
    """Paths of the modules `targets` selects, minus `exclude`; a clear error when none match.

    `modules`: `candidate_modules(model)` when the caller has it already.
    """
    modules = candidate_modules(model) if modules is None else modules
    if targets == "all-linear":
        head = output_head(model)
        chosen = [p for p, m in modules.items() if layer_kind(m) in (LINEAR, GPT2_CONV1D) and m is not head]
    else:
        chosen = [p for p, m in modules.items() if _matches(p, m, targets)]
    if exclude:
        chosen = [p for p in chosen if not _matches(p, modules[p], exclude)]
    if not chosen:
        raise TargetError(f"targets {targets!r} match no module of {type(model).__name__}."
                          + _closest_hint(targets, modules))
    bad = [p for p in chosen if layer_kind(modules[p]) is None]
    if bad:
        kinds = sorted({type(modules[p]).__name__ for p in bad})
        raise TargetError(f"targets {targets!r} select modules that cannot be adapted: {bad[:5]} "
                          f"({', '.join(kinds)}). Adaptable: Linear, Embedding, Conv1d, Conv2d, GPT-2 Conv1D. "
                          "Narrow the targets (e.g. end a regex with the layer name).")
    return chosen


def _closest_hint(targets: Any, modules: dict[str, nn.Module]) -> str:
    wanted = [targets] if isinstance(targets, str) else [t for t in (targets if isinstance(targets, (list, tuple, set)) else [targets]) if isinstance(t, str)]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in modules})
    close: list[str] = []
    for w in wanted:
        close += difflib.get_close_matches(w.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.4)
        close += difflib.get_close_matches(w, list(modules), n=3, cutoff=0.5)
    adaptable = sorted({p.rsplit(".", 1)[-1] for p, m in modules.items() if layer_kind(m)})
    hint = f" Closest module names: {', '.join(dict.fromkeys(close))}." if close else ""
    if isinstance(targets, str) and any(_matches_name(p, targets) for p in modules):
        hint = (f" A string is a regular expression matched against the whole module path (as in PEFT); to "
                f"select modules by name pass a list, e.g. [{targets!r}], or a pattern such as '.*{targets}'.")
    return hint + f" Adaptable layer names in this model: {', '.join(adaptable[:20])}."


def peft_target_modules(model: nn.Module, chosen: list[str]) -> list[str]:
    """The shortest `target_modules` list that PEFT's name rule maps to exactly `chosen`.

    Leaf names when they select the same set, otherwise full paths.
    """
    leaves = sorted({p.rsplit(".", 1)[-1] for p in chosen})
    modules = candidate_modules(model)
    selected = {p for p in modules if any(_matches_name(p, leaf) for leaf in leaves)}
    return leaves if selected == set(chosen) else sorted(chosen)
