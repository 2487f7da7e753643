"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.<suffix>` with the adapter name stripped, exactly as PEFT
writes them, so adapters move both ways. Fields PEFT does not know live under the `"loraplex"` key,
which PEFT ignores. Writes are atomic; loading validates everything before the model is touched and
never unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from loraplex.core.config import ConfigError, LoraConfig
from loraplex.core.layers import SavedModule
from loraplex.core.targeting import TargetError, peft_target_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")
_UNSUPPORTED_PEFT = {"layer_replication": None, "lora_bias": False, "trainable_token_indices": None,
                     "target_parameters": None, "alora_invocation_tokens": None, "use_qalora": False,
                     "layers_to_transform": None, "megatron_config": None}


class AdapterFileError(ValueError):
    """An adapter file is missing, malformed, or does not fit the model; the message names file and key."""


# --- atomic writes ---
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with _suppress():
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors_bytes({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                             metadata=metadata or {"format": "pt"})


# --- saving ---
def adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` under PEFT's on-disk keys."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in model.adapted_layers(name).items():
        for suffix, tensor in layer.adapters[name].to_peft().items():
            out[f"{PREFIX}{path}.{suffix}"] = tensor
    for path, module in model.model.named_modules():
        if isinstance(module, SavedModule) and name in module.modules_to_save:
            for key, tensor in module.modules_to_save[name].state_dict().items():
                out[f"{PREFIX}{path}.{key}"] = tensor
    params = dict(model.model.named_parameters())
    for path in model._bias_params.get(name, []):
        out[f"{PREFIX}{path}"] = params[path]
    return out


def peft_config_dict(model, name: str) -> dict[str, Any]:
    config: LoraConfig = model.configs[name]
    layers = model.adapted_layers(name)
    kinds = {layer.spec.kind for layer in layers.values()}
    base_config = getattr(model.model, "config", None)
    is_causal_lm = callable(getattr(model.model, "generate", None)) and hasattr(model.model, "get_output_embeddings")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if is_causal_lm and base_config is not None else None,
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": peft_target_modules(model.model, list(layers)),
        "exclude_modules": None,
        "fan_in_fan_out": "gpt2-conv1d" in kinds,
        "bias": config.bias,
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "modules_to_save": config.modules_to_save or None,
        "init_lora_weights": {"kaiming": True, "gaussian": "gaussian", "random": False}.get(config.init, True),
        "rank_pattern": _full_pattern(layers, name, config, "r"),
        "alpha_pattern": _full_pattern(layers, name, config, "alpha"),
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": False,
        "loraplex": {"config": config.to_dict(), "format": 1},
    }


def _full_pattern(layers, name: str, config: LoraConfig, field: str) -> dict[str, Any]:
    """Per-layer ranks/alphas that differ from the config's defaults, keyed by full module path."""
    default = config.r if field == "r" else config.alpha
    return {path: getattr(layer.adapters[name], field) for path, layer in layers.items()
            if getattr(layer.adapters[name], field) != default}


def save_adapter(model, name: str, path: str | Path) -> None:
    """Write one adapter to folder `path`. Both files are fully written before either is replaced."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AdapterFileError(f"{folder} exists and is not a folder")
    weights = tensors_to_bytes(adapter_state(model, name))
    config = json.dumps(peft_config_dict(model, name), indent=2, sort_keys=True).encode()
    atomic_write_bytes(folder / WEIGHTS_NAME, weights)
    atomic_write_bytes(folder / CONFIG_NAME, config)


# --- loading ---
def config_from_peft(data: dict[str, Any], where: str) -> LoraConfig:
    """Our `LoraConfig` from a PEFT `adapter_config.json` dict (ours first when present)."""
    ours = (data.get("loraplex") or {}).get("config")
    try:
        if ours:
            return LoraConfig(**ours)
        peft_type = data.get("peft_type")
        if peft_type != "LORA":
            raise AdapterFileError(f"{where}: peft_type {peft_type!r} is not supported; loraplex reads LORA adapters")
        for key, neutral in _UNSUPPORTED_PEFT.items():
            if data.get(key, neutral) not in (neutral, [], {}):
                raise AdapterFileError(f"{where}: PEFT option {key}={data[key]!r} is not supported by loraplex")
        init = data.get("init_lora_weights", True)
        init = {True: "kaiming", False: "random", "gaussian": "gaussian"}.get(init, "kaiming")
        targets = data.get("target_modules")
        if targets is None:
            raise AdapterFileError(f"{where}: target_modules is missing")
        return LoraConfig(
            r=int(data.get("r", 8)), alpha=float(data.get("lora_alpha", 8)),
            dropout=float(data.get("lora_dropout") or 0.0), targets=targets,
            exclude=data.get("exclude_modules"), rslora=bool(data.get("use_rslora", False)),
            dora=bool(data.get("use_dora", False)), init=init, bias=data.get("bias", "none"),
            modules_to_save=data.get("modules_to_save") or [], rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {})
    except (ConfigError, TypeError) as err:
        raise AdapterFileError(f"{where}: invalid adapter config: {err}") from None


def read_adapter_files(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor], Path]:
    """Read and check the two files; returns (config, tensors with the prefix stripped, folder)."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise AdapterFileError(f"{path}: no such adapter folder")
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not weights_file.exists():
        pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickles:
            raise AdapterFileError(
                f"{folder / pickles[0]}: pickled weights are never loaded (they can run arbitrary code). "
                f"Convert it where you trust it: `peft_model.save_pretrained(dir, safe_serialization=True)`.")
        raise AdapterFileError(f"{weights_file}: missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not config_file.exists():
        raise AdapterFileError(f"{config_file}: missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{config_file}: expected a JSON object")
    config = config_from_peft(data, str(config_file))
    try:
        raw = load_file(weights_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{weights_file}: not a readable safetensors file ({err}); "
                               "it may be truncated or in another format") from None
    tensors = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
    return config, tensors, folder


def load(model: nn.Module, path: str | Path, name: str | None = None):
    """Load a PEFT-format adapter onto `model` (a plain model or an `AdapterModel`) and activate it.

    Everything is validated first: on any error the model is left exactly as it was.
    """
    from loraplex.core.model import AdapterModel

    config, tensors, folder = read_adapter_files(path)
    wrapped = model if isinstance(model, AdapterModel) else AdapterModel(model)
    if name is None:
        name = "default" if "default" not in wrapped.configs else folder.name
    wrapped._check_new_name(name)
    weights_file = folder / WEIGHTS_NAME
    ranks = {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    ranks |= {k[: -len(".lora_embedding_A")]: v.shape[0] for k, v in tensors.items()
              if k.endswith(".lora_embedding_A")}
    pattern = dict(config.rank_pattern)
    for path_, r in ranks.items():
        if config.rank_and_alpha(path_)[0] != r:
            pattern[_escape(path_)] = r
    if pattern != config.rank_pattern:
        config = config.replace(rank_pattern=pattern)
    try:
        built, saved = wrapped._build(name, config, None)
    except TargetError as err:
        raise AdapterFileError(f"{folder / CONFIG_NAME}: {err} (was the adapter made for another base model?)") from None
    used: set[str] = set()
    for layer_path, adapter in built.items():
        own = {s for s in adapter.to_peft()}
        found = {s: tensors[f"{layer_path}.{s}"] for s in own if f"{layer_path}.{s}" in tensors}
        try:
            adapter.from_peft(found, f"{weights_file}: {PREFIX}{layer_path}")
        except (KeyError, ValueError) as err:
            raise AdapterFileError(str(err).strip('"')) from None
        used |= {f"{layer_path}.{s}" for s in found}
    saved_state = _check_saved_modules(wrapped, saved, tensors, weights_file, used)
    bias_state = {k: v for k, v in tensors.items() if k not in used and k.endswith("bias")}
    params = dict(wrapped.model.named_parameters())
    for key, value in bias_state.items():
        target = params.get(key) or params.get(key.replace(".bias", ".base_layer.bias"))
        if target is None or target.shape != value.shape:
            raise AdapterFileError(f"{weights_file}: key {PREFIX}{key} does not fit the model")
        used.add(key)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise AdapterFileError(f"{weights_file}: unexpected key(s) {', '.join(PREFIX + k for k in unexpected[:5])}"
                               f"{' …' if len(unexpected) > 5 else ''}: they match no targeted module "
                               "(was the adapter made for another base model?)")
    # Everything fits: now change the model.
    wrapped._install(name, config, built, saved)
    with torch.no_grad():
        for path_, state in saved_state.items():
            wrapped.model.get_submodule(path_).modules_to_save[name].load_state_dict(state)
        params = dict(wrapped.model.named_parameters())
        for key, value in bias_state.items():
            target = params.get(key) or params.get(key.replace(".bias", ".base_layer.bias"))
            target.copy_(value)
    wrapped.set_active(name)
    return wrapped


def _escape(path: str) -> str:
    import re

    return re.escape(path)


def _check_saved_modules(wrapped, saved: list[str], tensors, weights_file, used: set[str]):
    from loraplex.core.targeting import candidate_modules

    modules = candidate_modules(wrapped.model)
    out = {}
    for path in saved:
        expected = modules[path].state_dict()
        state = {}
        for key, ref in expected.items():
            full = f"{path}.{key}"
            if full not in tensors:
                raise AdapterFileError(f"{weights_file}: missing key {PREFIX}{full} (modules_to_save)")
            if tensors[full].shape != ref.shape:
                raise AdapterFileError(f"{weights_file}: {PREFIX}{full} has shape {tuple(tensors[full].shape)}, "
                                       f"the model needs {tuple(ref.shape)}")
            state[key] = tensors[full]
            used.add(full)
        out[path] = state
    return out
