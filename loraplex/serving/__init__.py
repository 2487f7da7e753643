"""Multi-adapter serving: one base model, many LoRA/DoRA adapters, batches that mix them.

`Engine` (continuous batching, grouped low-rank path, adapter paging), `compress` (Compress then Serve:
a shared basis for many adapters, served directly), `fit_router` (MiLoRA-style prompt-level routing)
and, with the `serve` extra, `create_app` / `serve` (an OpenAI-compatible HTTP server; `loraplex serve`).
"""

from loraplex.serving.adapters import AdapterNotFound, AdapterPool, HostAdapter, read_adapter
from loraplex.serving.compress import CompressedSet, compress, read_compressed
from loraplex.serving.engine import (
    Completion,
    Engine,
    InvalidRequest,
    QueueFull,
    RequestHandle,
    SamplingParams,
)
from loraplex.serving.layers import LoraWeights, ServingModule, StepPlan
from loraplex.serving.routing import PromptRouter, fit_router

__all__ = [
    "AdapterNotFound",
    "AdapterPool",
    "Completion",
    "CompressedSet",
    "Engine",
    "HostAdapter",
    "InvalidRequest",
    "LoraWeights",
    "PromptRouter",
    "QueueFull",
    "RequestHandle",
    "SamplingParams",
    "ServingModule",
    "StepPlan",
    "compress",
    "fit_router",
    "read_adapter",
    "read_compressed",
]
