"""Training data: built-in synthetic tasks, user data files, tokenization and batching."""

from loraplex.data.files import DataError, load_data, load_examples, split_examples
from loraplex.data.tasks import (
    DEFAULT_TASK,
    TASKS,
    Example,
    Task,
    exact_match,
    get_task,
    is_held_out,
    task_split,
)
from loraplex.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    collate,
    encode,
    encode_all,
    length_bucketed_batches,
    prompt_ids,
    render_prompt,
)

__all__ = [
    "DEFAULT_TASK",
    "IGNORE_INDEX",
    "TASKS",
    "DataError",
    "Encoded",
    "Example",
    "Task",
    "collate",
    "encode",
    "encode_all",
    "exact_match",
    "get_task",
    "is_held_out",
    "length_bucketed_batches",
    "load_data",
    "load_examples",
    "prompt_ids",
    "render_prompt",
    "split_examples",
    "task_split",
]
