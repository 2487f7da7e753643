"""Base models: the built-in SmolLM2 (GGUF) and MiniLM encoder, local directories, GGUF files, Hub ids."""

from loraplex.models.loading import (
    DEFAULT_MODEL,
    ENCODER_MODEL,
    LoadedModel,
    ModelLoadError,
    ModelLocation,
    default_cache_dir,
    encoder_path_of_embedded_model,
    gguf_cache_path,
    gguf_path_of_embedded_model,
    load_model,
    resolve_model_path,
)

__all__ = [
    "DEFAULT_MODEL",
    "ENCODER_MODEL",
    "LoadedModel",
    "ModelLoadError",
    "ModelLocation",
    "default_cache_dir",
    "encoder_path_of_embedded_model",
    "gguf_cache_path",
    "gguf_path_of_embedded_model",
    "load_model",
    "resolve_model_path",
]
