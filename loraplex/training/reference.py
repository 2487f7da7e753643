"""The reference model of RLHF-style training, without a second copy of the weights.

Hydra-RLHF (Santacroce, Lu, Yu, Li, Shen 2023, "Efficient RLHF: Reducing the Memory Usage of PPO"):
when the policy is the base model plus a LoRA adapter, the frozen reference policy π_ref of PPO / DPO
is the same model with the adapter switched off, so it costs no memory. For a completion y of a
prompt x, the per-token log-probabilities are
    log π(y_t | x, y_<t)  (adapters on)      and      log π_ref(y_t | x, y_<t)  (adapters off),
and e.g. DPO's implicit reward is β (Σ_t log π - Σ_t log π_ref).

`reference()` is the context manager (the model with its adapters off, merged ones unmerged meanwhile);
`token_logprobs(model, batch)` gives per-token log-probabilities of the labelled positions of a batch;
`reference_logprobs(model, batch)` is the same under `reference()` and without gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def reference(model) -> Iterator[None]:
    """The base model inside this block: every adapter of `model` (an `AdapterModel`) switched off."""
    if not hasattr(model, "disabled"):
        raise TypeError(f"reference() needs a model with adapters (loraplex.attach / loraplex.load), got "
                        f"{type(model).__name__}")
    with model.disabled():
        yield


def token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label_t | tokens_<t) (batch x seq-1) and the mask of labelled positions.

    `batch` holds `input_ids`, `attention_mask` and `labels` (-100 where not scored), as the training
    batches do; unscored positions get log-probability 0.
    """
    for key in ("input_ids", "attention_mask", "labels"):
        if key not in batch:
            raise KeyError(f"the batch needs {key!r} (input_ids, attention_mask, labels with -100 where not scored)")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = torch.gather(F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


@torch.no_grad()
def reference_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` of the reference model (adapters off), without gradients."""
    with reference(model):
        return token_logprobs(model, batch)


def sequence_logprobs(model, batch: dict[str, torch.Tensor], *, reference_model: bool = False) -> torch.Tensor:
    """Σ_t log p(y_t | ...) per sequence over the labelled positions (the policy, or the reference)."""
    logp, _ = reference_logprobs(model, batch) if reference_model else token_logprobs(model, batch)
    return logp.sum(dim=1)
