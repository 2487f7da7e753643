"""Examples -> token sequences with a supervised completion, length-bucketed batches, padding."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from loraplex.data.files import DataError
from loraplex.data.tasks import Example, _derived_seed

IGNORE_INDEX = -100
BUCKET_BATCHES = 50  # batches per chunk that is sorted by length


@dataclass
class Encoded:
    """One training sequence: tokens [prompt_len:] are the supervised completion (incl. EOS)."""

    input_ids: list[int]
    prompt_len: int


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, example: Example, use_chat_template: bool = True) -> str:
    """The text the model sees before its answer.

    With a chat template: the user prompt (or all messages but the last) rendered with the generation
    prompt appended. Without one (or with `use_chat_template=False`): `prompt + "\\n"`.
    """
    if use_chat_template and _has_chat_template(tokenizer):
        if example.messages is not None:
            messages = example.messages[:-1]
        else:
            messages = [{"role": "user", "content": example.prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return example.prompt + "\n"


def prompt_ids(tokenizer: Any, example: Example, use_chat_template: bool = True) -> list[int]:
    """Token ids of `render_prompt`; what to feed `generate` at evaluation time.

    A rendered chat template already holds its special tokens, so none are added; plain prompts get
    the tokenizer's usual special tokens (e.g. BOS).
    """
    text = render_prompt(tokenizer, example, use_chat_template)
    templated = use_chat_template and _has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def encode(tokenizer: Any, example: Example, max_length: int, use_chat_template: bool = True,
           truncate: bool = False) -> Encoded:
    """Prompt tokens followed by the completion's tokens and EOS.

    A sequence longer than `max_length` raises `DataError`, unless `truncate=True`: then the prompt
    keeps its tail and the completion is kept whole when it fits (it is cut only when it alone leaves
    no room for one prompt token).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token first")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt = prompt_ids(tokenizer, example, use_chat_template)
    completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"]) + [eos]
    total = len(prompt) + len(completion)
    if total > max_length:
        if not truncate:
            raise DataError(f"an example is {total} tokens long ({len(prompt)} prompt + {len(completion)} "
                            f"completion), more than max_length={max_length}; raise --max-length, use "
                            "shorter data, or pass truncate=True")
        completion = completion[: max_length - 1]
        prompt = prompt[len(prompt) - (max_length - len(completion)):]
    return Encoded(input_ids=prompt + completion, prompt_len=len(prompt))


def encode_all(tokenizer: Any, examples: list[Example], max_length: int, use_chat_template: bool = True,
               truncate: bool = False) -> list[Encoded]:
    """`encode` every example; a too-long one raises `DataError` naming its index and the count."""
    encoded: list[Encoded] = []
    too_long: list[int] = []
    first_error = ""
    for i, example in enumerate(examples):
        try:
            encoded.append(encode(tokenizer, example, max_length, use_chat_template, truncate))
        except DataError as e:
            too_long.append(i)
            first_error = first_error or f"example {i}: {e}"
    if too_long:
        shown = ", ".join(map(str, too_long[:20])) + (", ..." if len(too_long) > 20 else "")
        raise DataError(f"{len(too_long)} of {len(examples)} examples exceed max_length={max_length} "
                        f"(indices {shown}); {first_error}")
    return encoded


def length_bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of indices into `lengths` for one epoch, each index exactly once.

    Indices are shuffled (deterministic in seed and epoch), sorted by length within chunks of
    `BUCKET_BATCHES` batches so that a batch holds similar lengths (less padding), and the batch order
    is shuffled again. Only the last batch of the last chunk can be smaller than `batch_size`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(_derived_seed("loraplex.data.batches", seed, epoch))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * BUCKET_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches.extend(part[j:j + batch_size] for j in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask and labels, each (B, T) int64.

    labels equal input_ids on completion positions and are -100 on prompt and padding positions;
    they are not shifted (the trainer shifts).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        length = len(e.input_ids)
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[row, :length] = ids
        attention_mask[row, :length] = 1
        labels[row, e.prompt_len:length] = ids[e.prompt_len:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
