"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.<suffix>` with the adapter name stripped, exactly as PEFT
writes them, so adapters move both ways. Fields PEFT does not know live under the `"loraplex"` key,
which PEFT ignores. Writes are atomic; loading validates everything before the model is touched and
never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from loraplex.core.config import ConfigError, LoraConfig
from loraplex.core.layers import SavedModule
from loraplex.core.targeting import TargetError, candidate_modules, peft_target_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SAVE_ID = "save_id"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")
_UNSUPPORTED_PEFT = {"layer_replication": None, "lora_bias": False, "trainable_token_indices": None,
                     "target_parameters": None, "alora_invocation_tokens": None, "use_qalora": False,
                     "layers_to_transform": None, "megatron_config": None}


class AdapterFileError(ValueError):
    """An adapter file is missing, malformed, or does not fit the model; the message names file and key."""


# --- atomic writes ---
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    atomic_write_files({Path(path): data})


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Replace several files in one folder together.

    Every file is first written in full to a temp file next to it and fsynced; only then are they
    renamed into place (in the order given). If a write fails nothing is replaced; if a rename fails
    the files already replaced are put back from hard links taken beforehand. A process killed between
    two renames leaves those links behind, so a reader can still find the old set (see
    `_weights_of_save`); the next successful write to the folder removes such leftovers.
    """
    staged: list[tuple[str, Path]] = []
    backups: dict[Path, str] = {}
    done: list[Path] = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            staged.append((_write_temp(path, data), path))
        for _, path in staged:
            if path.exists():
                backup = _temp_name(path, ".bak")
                with _suppress():
                    os.link(path, backup)
                    backups[path] = backup
        for tmp, path in staged:
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for path in reversed(done):  # roll back the renames already made
            with _suppress():
                if path in backups:
                    os.replace(backups.pop(path), path)
                else:
                    os.unlink(path)
        raise
    finally:
        for leftover in [tmp for tmp, _ in staged] + list(backups.values()):
            with _suppress():
                os.unlink(leftover)
    for folder in {path.parent for path in files}:
        _fsync_dir(folder)
        # only now: a killed writer's backups may be what makes the old files loadable (`_weights_of_save`)
        _remove_stale_temps(folder)


def _temp_name(path: Path, suffix: str) -> str:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.unlink(name)
    return name


def _write_temp(path: Path, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _plain_file_mode())  # mkstemp's 0600 would make saved adapters private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    return tmp


def _plain_file_mode() -> int:
    """0666 less the umask (read from /proc: `os.umask` would change it for every thread meanwhile)."""
    umask = 0o022
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    return 0o666 & ~umask


_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[^.]+\.(tmp|bak)$")


def _remove_stale_temps(folder: Path) -> None:
    """Delete temp files of ours whose writing process has died (killed mid-write)."""
    with _suppress():
        for entry in os.scandir(folder):
            match = _TEMP_RE.match(entry.name)
            if match and not _pid_alive(int(match.group(1))):
                with _suppress():
                    os.unlink(entry.path)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


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
def adapter_state(model, name: str, as_lora: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` under PEFT's on-disk keys (as plain LoRA factors with `as_lora`)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in model.adapted_layers(name).items():
        adapter = layer.adapters[name]
        if as_lora:
            a, b = adapter.as_lora(layer.spec)
            out[f"{PREFIX}{path}.lora_A.weight"], out[f"{PREFIX}{path}.lora_B.weight"] = a, b
            continue
        for suffix, tensor in adapter.to_peft().items():
            out[f"{PREFIX}{path}.{suffix}"] = tensor
    if name in model.shared_tensors and not as_lora:
        out.update(model.shared_tensors[name].to_peft())
    for path, module in model.model.named_modules():
        if isinstance(module, SavedModule) and name in module.modules_to_save:
            for key, tensor in module.modules_to_save[name].state_dict().items():
                out[f"{PREFIX}{path}.{key}"] = tensor
    for key, tensor in model.bias_parameters(name).items():
        out[f"{PREFIX}{key}"] = tensor
    return out


def peft_config_dict(model, name: str, as_lora: bool = False) -> dict[str, Any]:
    from loraplex.methods import get

    config: LoraConfig = model.configs[name]
    layers = model.adapted_layers(name)
    base_config = getattr(model.model, "config", None)
    is_causal_lm = callable(getattr(model.model, "generate", None)) and hasattr(model.model, "get_output_embeddings")
    common = {
        "task_type": "CAUSAL_LM" if is_causal_lm and base_config is not None else None,
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "target_modules": peft_target_modules(model.model, list(layers)),
        "modules_to_save": config.modules_to_save or None,
    }
    if as_lora:  # every layer's factors carry their scale: alpha = r per layer gives scale 1
        ranks = {path: layer.adapters[name].as_lora(layer.spec)[0].shape[0] for path, layer in layers.items()}
        r0 = max(set(ranks.values()), key=list(ranks.values()).count)
        pattern = {_escape(p): r for p, r in ranks.items() if r != r0}
        config = LoraConfig(r=r0, alpha=float(r0), targets=common["target_modules"], rank_pattern=pattern,
                            alpha_pattern={k: float(v) for k, v in pattern.items()},
                            modules_to_save=config.modules_to_save, bias=config.bias)
    method = get(config.method)
    if method.peft_type != "LORA":
        return {"peft_type": method.peft_type, **common, **method.peft_config_fields(config),
                "loraplex": {"config": config.to_dict(), "format": 1}}
    kinds = {layer.spec.kind for layer in layers.values()}
    return {
        "peft_type": "LORA",
        **common,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "exclude_modules": None,
        "fan_in_fan_out": "gpt2-conv1d" in kinds,
        "bias": config.bias,
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "init_lora_weights": {"kaiming": True, "gaussian": "gaussian", "random": False}.get(config.init, True),
        **method.peft_config_fields(config),   # e.g. PiSSA / OLoRA: the init PEFT re-runs on load
        "rank_pattern": config.rank_pattern if as_lora else _full_pattern(layers, name, config, "r"),
        "alpha_pattern": config.alpha_pattern if as_lora else _full_pattern(layers, name, config, "alpha"),
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


def save_adapter(model, name: str, path: str | Path, as_lora: bool = False) -> None:
    """Write one adapter to folder `path`. Both files are fully written before either is replaced.

    `as_lora=True` writes any low-rank-reducible adapter as a plain LoRA for the unmodified base.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise AdapterFileError(f"{folder} exists and is not a folder")
    # One id in both files: a pair from two different saves is detected when loading.
    save_id = uuid.uuid4().hex
    weights = tensors_to_bytes(adapter_state(model, name, as_lora), {"format": "pt", SAVE_ID: save_id})
    config_data = peft_config_dict(model, name, as_lora)
    config_data.setdefault("loraplex", {})[SAVE_ID] = save_id
    config = json.dumps(config_data, indent=2, sort_keys=True).encode()
    atomic_write_files({folder / WEIGHTS_NAME: weights, folder / CONFIG_NAME: config})


# --- loading ---
def config_from_peft(data: dict[str, Any], where: str) -> LoraConfig:
    """Our `LoraConfig` from a PEFT `adapter_config.json` dict (ours first when present)."""
    try:
        ours = (data.get("loraplex") or {}).get("config")
        if ours:
            ours = dict(ours)
            # The layers actually adapted, by name: the original `targets` may have been classes
            # (saved by class name only) or a rule that now selects other layers.
            if data.get("target_modules"):
                ours["targets"], ours["exclude"] = data["target_modules"], None
            # PEFT's per-layer fields are what PEFT applies: honour them ahead of ours (first match wins),
            # so a writer that records per-layer ranks there only (dynamic-rank recipes) loads right.
            for key, field in (("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern")):
                if isinstance(data.get(key), dict) and data[key]:
                    ours[field] = {**data[key], **{k: v for k, v in (ours.get(field) or {}).items()
                                                  if k not in data[key]}}
            return LoraConfig(**ours)
        peft_type = data.get("peft_type")
        if peft_type != "LORA":
            from loraplex.methods import available

            readers = [cls for cls in available().values() if cls.peft_type == peft_type]
            if not readers:
                known = sorted({cls.peft_type for cls in available().values()})
                raise AdapterFileError(f"{where}: peft_type {peft_type!r} is not supported; loraplex reads {known}")
            return LoraConfig(method=readers[0].method, **readers[0].config_from_peft_fields(data))
        for key, neutral in _UNSUPPORTED_PEFT.items():
            if data.get(key, neutral) not in (neutral, [], {}):
                raise AdapterFileError(f"{where}: PEFT option {key}={data[key]!r} is not supported by loraplex")
        method, init, options = _method_of_peft_init(data.get("init_lora_weights", True), where)
        targets = data.get("target_modules")
        if targets is None:
            raise AdapterFileError(f"{where}: target_modules is missing")
        return LoraConfig(
            method=method, options=options,
            r=int(data.get("r", 8)), alpha=float(data.get("lora_alpha", 8)),
            dropout=float(data.get("lora_dropout") or 0.0), targets=targets,
            exclude=data.get("exclude_modules"), rslora=bool(data.get("use_rslora", False)),
            dora=bool(data.get("use_dora", False)), init=init, bias=data.get("bias", "none"),
            modules_to_save=data.get("modules_to_save") or [], rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {})
    except AdapterFileError:
        raise
    except (ConfigError, TypeError, ValueError, AttributeError) as err:
        raise AdapterFileError(f"{where}: invalid adapter config: {err}") from None


# PEFT's `init_lora_weights` values whose init rewrites the base weight from data or quantisation PEFT
# re-runs on load: the saved factors alone do not say what the base became.
_UNREPRODUCIBLE_INITS = {"corda": "CorDA (needs the calibration covariances)",
                         "loftq": "LoftQ (quantises the base weight)"}


def _method_of_peft_init(init: Any, where: str) -> tuple[str, str, dict[str, Any]]:
    """(method, init, options) for a PEFT LoRA file, by the `init_lora_weights` PEFT re-runs on load.

    PiSSA and OLoRA rewrite the base weight (W - s B0 A0) deterministically from W: they load as those
    methods, which rebuild the same residual. EVA, LoRA-GA (PEFT falls back to a plain init when it
    loads one: the gradients are gone), "orthogonal", "mica" and "gaussian" leave the base alone: the
    saved factors are the whole adapter, a plain LoRA.
    """
    if init is True or init in ("gaussian", "eva", "lora_ga", "orthogonal", "mica"):
        return "lora", "gaussian" if init == "gaussian" else "kaiming", {}
    if init is False:
        return "lora", "random", {}
    if isinstance(init, str) and init.startswith("pissa"):
        niter = init[len("pissa_niter_"):] if init.startswith("pissa_niter_") else None
        if init != "pissa" and (niter is None or not niter.isdigit()):
            raise AdapterFileError(f"{where}: init_lora_weights={init!r} is not 'pissa' or 'pissa_niter_<k>'")
        return "pissa", "kaiming", {} if niter is None else {"niter": int(niter)}
    if isinstance(init, str) and init.lower() == "olora":
        return "olora", "kaiming", {}
    name = init.split("_")[0].lower() if isinstance(init, str) else None
    if name in _UNREPRODUCIBLE_INITS:
        raise AdapterFileError(f"{where}: init_lora_weights={init!r}: {_UNREPRODUCIBLE_INITS[name]} rewrites the base "
                               "weight when PEFT loads the file, which loraplex cannot reproduce. Convert it to a "
                               "plain LoRA in PEFT: `model.save_pretrained(dir, "
                               "path_initial_model_for_weight_conversion=initial_dir)`.")
    raise AdapterFileError(f"{where}: init_lora_weights={init!r} is not supported; loraplex reads True, False, "
                           "'gaussian', 'pissa', 'pissa_niter_<k>', 'olora', 'eva', 'lora_ga', 'orthogonal', 'mica'")


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
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise AdapterFileError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{config_file}: expected a JSON object")
    config = config_from_peft(data, str(config_file))
    try:
        raw, metadata = _read_safetensors(weights_file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{weights_file}: not a readable safetensors file ({err}); "
                               "it may be truncated or in another format") from None
    ours = data.get("loraplex")
    config_id = ours.get(SAVE_ID) if isinstance(ours, dict) else None
    if config_id and metadata.get(SAVE_ID) and metadata[SAVE_ID] != config_id:
        raw = _weights_of_save(folder, config_id)
        if raw is None:
            raise AdapterFileError(f"{weights_file}: written by another save than {config_file} (an interrupted "
                                   "save, or files of two adapters mixed); save the adapter again")
    tensors = _Stripped({(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()})
    tensors.prefixed = {k[len(PREFIX):] for k in raw if k.startswith(PREFIX)}
    return config, tensors, folder


# safetensors dtype -> torch dtype; numpy slices its buffer ~3x faster than torch (bf16 has no numpy type)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                 "U8": "u1", "BOOL": "?"}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file: one read, the tensors are views of that buffer.

    The format is an 8-byte little-endian header size, a JSON header (name -> dtype, shape,
    data_offsets) and the raw data. Reading it in one go and viewing it costs a third of
    `safetensors.torch.load_file`'s per-tensor reads and copies (the tensors are copied into the
    adapter right after). Anything malformed raises ValueError.
    """
    with open(path, "rb") as f:
        buffer = torch.empty(os.fstat(f.fileno()).st_size, dtype=torch.uint8)   # not zero-filled
        if f.readinto(memoryview(buffer.numpy())) != len(buffer):
            raise ValueError("the file changed while it was read")
    data = buffer.numpy()
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (header_size,) = struct.unpack("<Q", data[:8].tobytes())
    if header_size > len(data) - 8:
        raise ValueError(f"header size {header_size} exceeds the file ({len(data)} bytes)")
    header = json.loads(data[8:8 + header_size].tobytes())
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + header_size
    tensors = {}
    for key, entry in header.items():
        try:
            name = entry["dtype"]
            dtype = _SAFETENSORS_DTYPES[name]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (start + int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {key!r}: unreadable header entry {entry!r} (dtypes read: "
                             f"{', '.join(_SAFETENSORS_DTYPES)})") from None
        if min(shape, default=0) < 0 or not start <= begin <= end <= len(data) \
                or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {key!r}: offsets {begin - start}..{end - start} do not hold shape {shape} "
                             f"of {name} inside the file (truncated?)")
        raw = data[begin:end]
        if begin % dtype.itemsize:
            raw = raw.copy()   # an unaligned tensor: a copy of its own
        if name in _NUMPY_DTYPES:
            tensors[key] = torch.from_numpy(raw.view(_NUMPY_DTYPES[name]).reshape(shape))
        else:
            tensors[key] = torch.from_numpy(raw).view(dtype).view(shape)
    return tensors, metadata


def _weights_of_save(folder: Path, save_id: str) -> dict[str, torch.Tensor] | None:
    """The weights that go with a config whose save was killed between its two renames.

    `atomic_write_files` hard-links the old files before replacing them (weights first, config
    last); a writer killed in between leaves new weights, the old config and the old weights' link.
    """
    for entry in sorted(folder.glob(f".{WEIGHTS_NAME}.*.bak")):
        try:
            with safe_open(entry, "pt") as f:
                if (f.metadata() or {}).get(SAVE_ID) == save_id:
                    return load_file(entry)
        except (SafetensorError, OSError, ValueError, RuntimeError):
            continue
    return None


class _Stripped(dict):
    """Tensors keyed without PEFT's `base_model.model.` prefix; `prefixed` lists keys that had it."""

    prefixed: set[str]


def load(model: nn.Module, path: str | Path, name: str | None = None):
    """Load a PEFT-format adapter onto `model` (a plain model or an `AdapterModel`) and activate it.

    Everything is validated first: on any error the model is left exactly as it was.
    """
    from loraplex.core.model import AdapterModel

    config, tensors, folder = read_adapter_files(path)
    prefixed = set(tensors.prefixed)
    wrapped = model if isinstance(model, AdapterModel) else AdapterModel(model)
    if name is None:
        name = "default" if "default" not in wrapped.configs else folder.name
    wrapped._check_new_name(name)
    wrapped._refuse_if_merged(f"load adapter {name!r}")
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
    from loraplex.methods.lora import values_from_file

    try:
        with values_from_file():  # every factor is copied from the file below: no random init
            built, saved, shared = wrapped._build(name, config, None)
    except TargetError as err:
        raise AdapterFileError(f"{folder / CONFIG_NAME}: {err} (was the adapter made for another base model?)") from None
    used: set[str] = set()
    for layer_path, adapter in built.items():
        own = {s for s in adapter.to_peft()}
        found = {s: tensors[f"{layer_path}.{s}"] for s in own if f"{layer_path}.{s}" in tensors}
        try:
            adapter.from_peft(found, f"{weights_file}: {PREFIX}{layer_path}")
        except (KeyError, ValueError) as err:
            raise AdapterFileError(str(err.args[0] if err.args else err)) from None
        used |= {f"{layer_path}.{s}" for s in found}
    if shared is not None:
        raw = {(PREFIX + k if k in prefixed else k): v for k, v in tensors.items()}
        try:
            taken = shared.from_peft(raw)
        except (KeyError, ValueError) as err:
            raise AdapterFileError(f"{weights_file}: {str(err).strip(chr(34))}") from None
        used |= {k[len(PREFIX):] if k[len(PREFIX):] in prefixed else k for k in taken}
    saved_state = _check_saved_modules(wrapped, saved, tensors, weights_file, used)
    bias_state = {}
    modules = None  # walking the model is slow: only for files that carry base biases
    for key in sorted(set(tensors) - used):
        if key != "bias" and not key.endswith(".bias"):
            continue
        if modules is None:
            modules = candidate_modules(wrapped.model)
        target = _bias_target(modules, key)
        if target is None or target.shape != tensors[key].shape:
            raise AdapterFileError(f"{weights_file}: key {PREFIX}{key} does not fit the model"
                                   + ("" if target is None else f" (saved shape {tuple(tensors[key].shape)}, "
                                      f"the model needs {tuple(target.shape)})"))
        bias_state[key] = (target, tensors[key])
        used.add(key)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise AdapterFileError(f"{weights_file}: unexpected key(s) {', '.join(PREFIX + k for k in unexpected[:5])}"
                               f"{' …' if len(unexpected) > 5 else ''}: they match no targeted module "
                               "(was the adapter made for another base model?)")
    # Everything fits: now change the model.
    wrapped._install(name, config, built, saved, shared, activate=True)
    with torch.no_grad():
        for path_, state in saved_state.items():
            wrapped.model.get_submodule(path_).modules_to_save[name].load_state_dict(state)
        for target, value in bias_state.values():
            target.copy_(value)
    return wrapped


def _bias_target(modules: dict[str, nn.Module], key: str) -> nn.Parameter | None:
    """The base bias a saved key names: `x.bias`, or PEFT's `x.base_layer.bias` / `x.original_module.bias`."""
    path = key[: -len(".bias")] if key != "bias" else ""
    for inner in (".base_layer", ".original_module"):
        if path.endswith(inner):
            path = path[: -len(inner)]
            break
    bias = getattr(modules.get(path), "bias", None)
    return bias if isinstance(bias, nn.Parameter) else None


def _escape(path: str) -> str:
    import re

    return re.escape(path)


def _check_saved_modules(wrapped, saved: list[str], tensors, weights_file, used: set[str]):
    if not saved:
        return {}
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
