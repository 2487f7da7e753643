"""Held-out exact match of served adapters: every task's examples go through the engine in one mixed run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loraplex.data import Example, exact_match
from loraplex.data.tokenize import prompt_ids
from loraplex.serving.engine import Engine, SamplingParams


def exact_match_served(engine: Engine, tokenizer, jobs: Mapping[str, tuple[str | None, Sequence[Example]]]) -> dict:
    """jobs: label -> (adapter name or None, examples). Returns label -> exact match in percent.

    Greedy, `max_tokens` = the longest reference answer + 4 tokens (what `exact_match_score` uses); the
    requests of all labels are submitted together, so the batches mix adapters as in serving.
    """
    prompts, adapters, refs, labels = [], [], [], []
    longest = 1
    for label, (adapter, examples) in jobs.items():
        if not examples:
            raise ValueError(f"{label}: no examples to score")
        for ex in examples:
            prompts.append(prompt_ids(tokenizer, ex))
            adapters.append(adapter)
            refs.append(ex.completion)
            labels.append(label)
            longest = max(longest, len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]))
    outs = engine.generate(prompts, adapters, SamplingParams(max_tokens=longest + 4), timeout=None)
    hits: dict[str, list[bool]] = {label: [] for label in jobs}
    for label, ref, out in zip(labels, refs, outs):
        if out.error is not None:
            raise RuntimeError(f"{label}: serving failed: {out.error}")
        hits[label].append(exact_match(out.text, ref))
    return {label: 100.0 * sum(h) / len(h) for label, h in hits.items()}
