"""Greedy generation, exact match and perplexity for a model with or without adapters."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from loraplex.data import Example, exact_match
from loraplex.data.tokenize import prompt_ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` for generation."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             batch_size: int = 32, adapter_ids: Sequence[str | None] | None = None, temperature: float = 0.0,
             progress: bool = False) -> list[str]:
    """Generate a completion for each prompt (token ids), in left-padded batches; greedy by default."""
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    results: dict[int, str] = {}
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc="generate", disable=not progress, leave=False):
        enc = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, do_sample=temperature > 0)
        if temperature > 0:
            kwargs["temperature"] = temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if adapter_ids is not None:
            kwargs["adapter_ids"] = [adapter_ids[i] for i in chunk]
        out = model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        for i, text in zip(chunk, tokenizer.batch_decode(new, skip_special_tokens=True)):
            results[i] = text
    return [results[i] for i in range(len(prompts))]


def exact_match_score(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 32,
                      adapter_ids: Sequence[str | None] | None = None, progress: bool = False) -> dict:
    """Percentage of examples whose greedy completion equals the reference (first line, stripped)."""
    if not examples:
        raise ValueError("there are no examples to score (is the held-out split empty? give more data)")
    prompts = [prompt_ids(tokenizer, ex) for ex in examples]
    longest = max(len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) for ex in examples)
    predictions = generate(model, tokenizer, prompts, max_new_tokens=longest + 4, batch_size=batch_size,
                           adapter_ids=adapter_ids, progress=progress)
    hits = [exact_match(p, ex.completion) for p, ex in zip(predictions, examples)]
    return {"exact_match": 100.0 * sum(hits) / len(hits), "n": len(hits),
            "samples": [{"prompt": ex.prompt, "reference": ex.completion, "prediction": p}
                        for ex, p in list(zip(examples, predictions))[:5]]}


@torch.no_grad()
def perplexity(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 16, max_length: int = 512) -> float:
    """Perplexity of the completions given their prompts."""
    from loraplex.data.tokenize import collate, encode_all

    model.eval()
    encoded = encode_all(tokenizer, list(examples), max_length)
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i:i + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                 ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((labels != -100).sum())
    return math.exp(total / max(count, 1))
