"""KD-LoRA: the LoRA student is distilled from a teacher while it learns the task.

Kaushal, Vaidhya, Rish 2024, "KD-LoRA: A Hybrid Approach to Efficient Fine-Tuning with LoRA and
Knowledge Distillation" (arXiv 2410.20777): the loss mixes the task loss with a distillation term, at
the supervised (completion) positions i:
    L = (1 - w) · CE(z_i^S, y_i) + w · τ² · KL( softmax(z_i^T / τ) ‖ softmax(z_i^S / τ) )
averaged over those positions (z^S the student's logits, z^T the teacher's, τ the temperature; the τ²
keeps the gradient scale of the soft term independent of τ, as in Hinton et al. 2015).
The teacher is `teacher`:
  * "base": the student's own base model with its adapters switched off (no second copy of the
    weights: `AdapterModel.disabled()`), i.e. distillation towards the pre-trained behaviour;
  * a local model folder (or any spec `loraplex.models.load_model` accepts): another model with the
    same vocabulary (e.g. a larger fine-tuned model of the same family), loaded once, frozen.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.training.recipes import Recipe, model_aux_loss, register
from loraplex.training.recipes._factors import number


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      weight: float, temperature: float) -> torch.Tensor:
    """Σ over rows of (1-w) CE + w τ² KL(p_T ‖ p_S) (a sum: the caller divides by the token count)."""
    s, t = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(s, targets, reduction="sum")
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return (1 - weight) * ce + weight * temperature**2 * kl


@register
class KDLoRA(Recipe):
    """KD-LoRA (Kaushal et al. 2024): task loss + τ²·KL to a teacher (the base model, or a local model)."""

    name = "kd-lora"
    options = {"teacher": "base", "weight": 0.5, "temperature": 2.0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.weight = number(self.name, self.opts, "weight", low=0, high=1)
        self.temperature = number(self.name, self.opts, "temperature", low=0, low_open=True)
        teacher = self.opts["teacher"]
        if not isinstance(teacher, str) or not teacher:
            raise ValueError(f"recipe 'kd-lora': option teacher must be 'base' or a model folder, got {teacher!r}")
        self.teacher_spec = teacher
        self.teacher_model: nn.Module | None = None  # a model given in Python (tests, notebooks) wins

    def setup(self, model, cfg) -> None:
        if self.teacher_model is None and self.teacher_spec != "base":
            from loraplex.models import load_model

            self.teacher_model = load_model(self.teacher_spec).model
        if self.teacher_model is not None:
            self.teacher_model.eval()
            for p in self.teacher_model.parameters():
                p.requires_grad_(False)
            ours = model.model.get_output_embeddings().weight.shape[0]
            theirs = self.teacher_model.get_output_embeddings().weight.shape[0]
            if ours != theirs:
                raise ValueError(f"recipe 'kd-lora': the teacher has {theirs} output tokens but the student has "
                                 f"{ours}; the teacher must share the student's tokenizer")

    def _teacher_hidden(self, model, batch) -> tuple[torch.Tensor, nn.Module]:
        """The teacher's last hidden states and output head, without gradients."""
        teacher = self.teacher_model
        context = contextlib.nullcontext()
        if teacher is None:  # the base model: the student with its adapters off
            teacher, context = model.model, model.disabled()
        body = getattr(teacher, teacher.base_model_prefix)
        with torch.no_grad(), context:
            hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden, teacher.get_output_embeddings()

    def loss(self, model, batch: dict[str, torch.Tensor], step: int, chunk: int = 1024) -> tuple[torch.Tensor, int]:
        hf = model.model
        body, head = getattr(hf, hf.base_model_prefix), hf.get_output_embeddings()
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        teacher_hidden, teacher_head = self._teacher_hidden(model, batch)
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        states, t_states, targets = hidden[:, :-1][mask], teacher_hidden[:, :-1][mask], targets[mask]
        n = targets.numel()
        if n == 0:
            raise ValueError("a batch has no supervised tokens (every completion is empty or truncated away)")
        total = hidden.new_zeros((), dtype=torch.float32)
        for i in range(0, n, chunk):  # chunks bound the (tokens x vocab) logits held at once
            s_logits = head(states[i:i + chunk])
            with torch.no_grad():
                t_logits = teacher_head(t_states[i:i + chunk])
            if t_logits.shape[-1] != s_logits.shape[-1]:
                raise ValueError(f"recipe 'kd-lora': the teacher has {t_logits.shape[-1]} output tokens but the student "
                                 f"has {s_logits.shape[-1]}; the teacher must share the student's tokenizer")
            total = total + distillation_loss(s_logits, t_logits, targets[i:i + chunk], self.weight, self.temperature)
        loss = total / n
        aux = model_aux_loss(model)
        return (loss + aux if aux is not None else loss), n
