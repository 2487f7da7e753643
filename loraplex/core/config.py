"""`LoraConfig`: what to attach, where, and how. Validated on construction."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

INITS = ("kaiming", "gaussian", "random", "zeros")
BIASES = ("none", "all", "lora_only")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A configuration value is not allowed; the message says what is."""


@dataclass
class LoraConfig:
    """Configuration of one adapter.

    r, alpha:   rank and scale numerator; the delta is scaled by `alpha / r`
                (or `alpha / sqrt(r)` with `rslora=True`).
    dropout:    dropout on the adapter's input, 0 <= dropout < 1.
    targets:    which modules to adapt: "all-linear" (every linear layer but the output head),
                a regex (full match on the module path), a list of module names or name suffixes,
                or module classes; lists may mix names and classes.
    exclude:    module names/suffixes (or a regex) never adapted.
    method:     adapter family, a name from `loraplex.methods.available()`.
    rslora:     rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023).
    dora:       weight-decomposed magnitude/direction (Liu et al. 2024).
    init:       "kaiming" (A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0, PEFT's default),
                "gaussian" (A ~ N(0, 1/r), B = 0), "random" (A and B both non-zero: the adapter is
                not the identity; for tests), "zeros". Methods may accept more names.
    bias:       "none", "all" (train every bias) or "lora_only" (biases of adapted layers).
    modules_to_save: modules trained in full (a copy per adapter), e.g. a classifier head.
    dtype:      adapter parameter dtype ("float32" keeps adapters in fp32 on a bf16 base).
    rank_pattern / alpha_pattern: per-module overrides, regex keys matched against the module path
                suffix, as in PEFT.
    options:    method-specific settings (stored in the saved config under our own key).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Any = "all-linear"
    exclude: Any = None
    method: str = "lora"
    rslora: bool = False
    dora: bool = False
    init: Any = "kaiming"
    bias: str = "none"
    modules_to_save: list[str] = field(default_factory=list)
    dtype: str = "float32"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from loraplex.methods import available  # late import: methods import the core

        if self.init is True:
            self.init = "kaiming"
        elif self.init is False:
            self.init = "random"
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = list(self.modules_to_save or [])
        _check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0,
               f"r must be a positive integer, got {self.r!r}")
        _check(isinstance(self.alpha, (int, float)) and self.alpha > 0 and math.isfinite(self.alpha),
               f"alpha must be a positive number, got {self.alpha!r}")
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
               f"dropout must satisfy 0 <= dropout < 1, got {self.dropout!r}")
        _check(self.method in available(),
               f"unknown method {self.method!r}; available: {', '.join(sorted(available()))}")
        _check(self.bias in BIASES, f"bias must be one of {BIASES}, got {self.bias!r}")
        _check(self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        _check(isinstance(self.init, str), f"init must be a string, got {self.init!r}")
        if self.method == "lora":
            _check(self.init in INITS, f"init must be one of {INITS} for method 'lora', got {self.init!r}")
        _check(self.targets is not None and self.targets != [] and self.targets != "",
               "targets must name at least one module: 'all-linear', a regex, names, or classes")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            _compile(self.targets, "targets")
        if isinstance(self.exclude, str):
            _compile(self.exclude, "exclude")
        for key, value in self.rank_pattern.items():
            _compile(key, "rank_pattern")
            _check(isinstance(value, int) and value > 0, f"rank_pattern[{key!r}] must be a positive int")
        for key, value in self.alpha_pattern.items():
            _compile(key, "alpha_pattern")
            _check(isinstance(value, (int, float)) and value > 0, f"alpha_pattern[{key!r}] must be > 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """Rank and alpha for one module, after `rank_pattern` / `alpha_pattern` (first match wins)."""
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def replace(self, **changes: Any) -> LoraConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["targets"] = _targets_to_json(self.targets)
        data["exclude"] = _targets_to_json(self.exclude)
        return data


def _pattern_value(pattern: dict, module_name: str, default):
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?({key})", module_name):
            return value
    return default


def _targets_to_json(targets: Any) -> Any:
    if isinstance(targets, type):
        return targets.__name__
    if isinstance(targets, (list, tuple, set)):
        return [t.__name__ if isinstance(t, type) else t for t in targets]
    return targets


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{what}: {pattern!r} is not a valid regular expression ({err})") from None
