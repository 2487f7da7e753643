"""Multi-adapter serving: one base model, many LoRA/DoRA adapters, batches that mix them.

`Engine` (continuous batching, grouped low-rank path, adapter paging) and, with the `serve` extra,
`create_app` / `serve` (an OpenAI-compatible HTTP server; `loraplex serve` on the command line).
"""

from loraplex.serving.adapters import AdapterNotFound, AdapterPool, HostAdapter, read_adapter
from loraplex.serving.engine import (
    Completion,
    Engine,
    InvalidRequest,
    QueueFull,
    RequestHandle,
    SamplingParams,
)
from loraplex.serving.layers import LoraWeights, ServingModule, StepPlan

__all__ = [
    "AdapterNotFound",
    "AdapterPool",
    "Completion",
    "Engine",
    "HostAdapter",
    "InvalidRequest",
    "LoraWeights",
    "QueueFull",
    "RequestHandle",
    "SamplingParams",
    "ServingModule",
    "StepPlan",
    "read_adapter",
]
