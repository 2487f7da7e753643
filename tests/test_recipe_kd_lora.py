"""KD-LoRA: (1-w)·CE + w·τ²·KL(teacher ‖ student) at supervised positions; the teacher is the base
model (adapters off, no copy) or another local model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from recipe_opt_util import adapted, batch, loaded, run

from loraplex.training.loop import TrainConfig, completion_loss
from loraplex.training.recipes import make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(student, teacher, data, w, tau):
    """The paper's loss from full logits (independent of the recipe's chunked head)."""
    s = student(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    labels = data["labels"][:, 1:]
    mask = labels != -100
    s, t, y = s[mask].double(), t[mask].double(), labels[mask]
    ce = F.cross_entropy(s, y)
    kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True, reduction="batchmean")
    return (1 - w) * ce + w * tau**2 * kl


def test_base_teacher_loss_matches_the_formula_without_a_copy():
    recipe = make_recipe("kd-lora", {"weight": 0.7, "temperature": 3.0})
    model = adapted(init="random")
    base = copy.deepcopy(model.model)
    with torch.no_grad():  # the reference teacher: a deep copy of the base with the adapter removed
        teacher = base
        for layer in list(model.adapted_layers()):
            parent, _, leaf = layer.rpartition(".")
            setattr(teacher.get_submodule(parent), leaf, teacher.get_submodule(layer).base_layer)
    params_before = {p.data_ptr() for p in model.parameters()}
    recipe.setup(model, TrainConfig())
    assert recipe.teacher_model is None and {p.data_ptr() for p in model.parameters()} == params_before
    data = batch()
    loss, n = recipe.loss(model, data, 0, chunk=5)  # a chunk size that splits rows
    ref = reference(model, teacher, data, 0.7, 3.0)
    assert n == int((data["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_weight_zero_is_the_task_loss():
    recipe = make_recipe("kd-lora", {"weight": 0.0})
    model = adapted(init="random")
    recipe.setup(model, TrainConfig())
    data = batch()
    loss, _ = recipe.loss(model, data, 0)
    torch.testing.assert_close(loss, completion_loss(model.model, data)[0])


def test_teacher_from_a_local_folder(tmp_path):
    teacher_src = loaded()
    with torch.no_grad():
        for p in teacher_src.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "teacher"
    teacher_src.model.save_pretrained(folder)
    teacher_src.tokenizer.save_pretrained(folder)
    recipe = make_recipe("kd-lora", {"teacher": str(folder), "weight": 1.0, "temperature": 1.0})
    model = adapted(init="random")
    recipe.setup(model, TrainConfig())
    data = batch()
    loss, _ = recipe.loss(model, data, 0)
    torch.testing.assert_close(loss.double(), reference(model, teacher_src.model, data, 1.0, 1.0),
                               rtol=1e-5, atol=1e-6)
    report = run(tmp_path, recipe="kd-lora", recipe_options={"teacher": str(folder)})
    assert report["final_loss"] is not None


def test_vocabulary_mismatch_is_refused():
    from tiny import tiny_llama

    recipe = make_recipe("kd-lora")
    recipe.teacher_model = tiny_llama(vocab_size=200)
    with pytest.raises(ValueError, match="share the student's tokenizer"):
        recipe.setup(adapted(), TrainConfig())
    with pytest.raises(ValueError, match="weight must be a number in"):
        make_recipe("kd-lora", {"weight": 2})
