"""The training loop: loss, schedule, checkpoints and resume, output-folder errors, CLI config."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from tiny import tiny_loaded

from loraplex.cli.main import main
from loraplex.core.config import LoraConfig
from loraplex.core.model import attach
from loraplex.data import DataError, collate, encode, task_split
from loraplex.training import unpadded
from loraplex.training.checkpoint import _join_state, _split_state
from loraplex.training.loop import TrainConfig, TrainingInterrupted, completion_loss, lr_lambda, train


def small_config(tmp_path, name="run", **overrides) -> TrainConfig:
    values = dict(data="dates", steps=6, batch_size=4, train_samples=24, eval_samples=4, max_length=512,
                  r=4, alpha=8, lr=1e-2, warmup_steps=1, checkpoint_every=2, output=str(tmp_path / name),
                  base_eval=False, eval_batch_size=4)
    values.update(overrides)
    return TrainConfig(**values)


def test_completion_loss_equals_full_forward_on_supervised_tokens():
    loaded = tiny_loaded()
    examples = task_split("dates", "train", 3)
    batch = collate([encode(loaded.tokenizer, ex, 512) for ex in examples], loaded.tokenizer.pad_token_id)
    loss, n = completion_loss(loaded.model, batch, chunk=7)  # a chunk size that splits rows
    logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert n == int((labels != -100).sum())
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def test_unpadded_forward_gives_the_padded_loss_and_gradients():
    """Real tokens as one row (attention per sequence) = the padded batch, loss and every gradient."""
    loaded = tiny_loaded()
    batch = collate([encode(loaded.tokenizer, ex, 512) for ex in task_split("dates", "train", 4)],
                    loaded.tokenizer.pad_token_id)
    assert not batch["attention_mask"].all()                    # rows of different lengths: padding to skip
    wrapped = attach(loaded.model, LoraConfig(r=4, init="random", targets="all-linear"))
    params = wrapped.trainable_parameters()

    def loss_and_grads():
        for p in params:
            p.grad = None
        loss, _ = completion_loss(loaded.model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    layout = unpadded.Layout(batch["attention_mask"])
    assert unpadded.usable(loaded.model, batch["attention_mask"])
    assert unpadded.hidden_states(loaded.model, loaded.model.model, batch)[0].shape[0] == layout.index.numel()
    loss, grads = loss_and_grads()
    setattr(loaded.model, unpadded._UNSUPPORTED, True)          # the padded forward
    ref_loss, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    # left padding, or an adapter that mixes neighbouring tokens: the padded forward
    assert not unpadded.usable(tiny_loaded().model, batch["attention_mask"].flip(1))
    conv = tiny_loaded()
    attach(conv.model, LoraConfig(method="conv-lora", r=4, targets=["q_proj"]))
    assert not unpadded.usable(conv.model, batch["attention_mask"])


def test_lr_schedule_warms_up_then_decays():
    fn = lr_lambda("cosine", warmup=4, total=20)
    values = [fn(s) for s in range(20)]
    assert values[:4] == sorted(values[:4]) and values[3] < 1
    assert values[4] == pytest.approx(1.0)
    assert values[4:] == sorted(values[4:], reverse=True) and values[-1] < 0.05
    assert lr_lambda("linear", 0, 10)(10) == pytest.approx(0.0)
    assert lr_lambda("constant", 2, 10)(9) == 1.0


def test_checkpoint_state_round_trips_nested_structures():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
             "param_groups": [{"lr": 0.1, "params": [0, 1], "betas": (0.9, 0.99)}], "tuple": (1, "a", None)}
    tensors: dict = {}
    restored = _join_state(json.loads(json.dumps(_split_state(state, "x", tensors))), tensors)
    assert restored["param_groups"][0]["betas"] == (0.9, 0.99)
    assert restored["tuple"] == (1, "a", None)
    assert list(restored["state"]) == [0]
    assert torch.equal(restored["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    base = tiny_loaded()
    cfg = dict(dropout=0.1)  # dropout consumes RNG: resume must restore it
    full = train(small_config(tmp_path, "full", **cfg), loaded=copy.deepcopy(base))
    assert full["steps"] == 6
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(small_config(tmp_path, "cut", **cfg), loaded=copy.deepcopy(base), stop_after=3)
    assert not (tmp_path / "cut" / "report.json").exists()  # no partial results passed off as final
    train(small_config(tmp_path, "cut", resume=True, **cfg), loaded=copy.deepcopy(base))
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    log_rows = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_rows] == list(range(1, 7))


def test_training_lowers_the_loss_and_writes_every_output(tmp_path):
    report = train(small_config(tmp_path, steps=8, base_eval=True), loaded=tiny_loaded())
    out = tmp_path / "run"
    for name in ("report.json", "report.md", "train_log.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    saved = json.loads((out / "report.json").read_text())
    for key in ("metric", "base_score", "adapter_score", "train_seconds", "steps", "trainable_parameters"):
        assert key in saved
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert report["trainable_parameters"] > 0


def test_output_folder_errors(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="cannot write to output folder"):
        train(small_config(tmp_path, "afile/sub"), loaded=tiny_loaded())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(small_config(tmp_path, "fresh", resume=True), loaded=tiny_loaded())
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "report.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(small_config(tmp_path, "done"), loaded=tiny_loaded())


def test_too_long_sequences_are_refused(tmp_path):
    with pytest.raises(DataError, match="max-length|max_length"):
        train(small_config(tmp_path, max_length=20), loaded=tiny_loaded())


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="exp")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_cli_config_file_and_overrides(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"steps": 11, "lr": 0.001, "data": "sort"}))
    assert main(["train", "--config", str(config), "--steps", "7", "--method-option", "foo=3",
                 "--targets", "q_proj,v_proj", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["steps"] == 7 and printed["lr"] == 0.001 and printed["data"] == "sort"
    assert printed["method_options"] == {"foo": 3} and printed["targets"] == ["q_proj", "v_proj"]
    config.write_text(yaml.safe_dump({"stepz": 3}))
    with pytest.raises(SystemExit, match="unknown option"):
        main(["train", "--config", str(config), "--print-config"])


@pytest.mark.parametrize("command", ["train", "eval", "generate", "chat", "merge", "inspect", "tasks", "methods"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: loraplex " + command in capsys.readouterr().out


def test_tasks_command_lists_samples(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "dates" in out and "completion" in out


def test_full_disk_at_the_end_is_a_clear_error_and_resume_finishes(tmp_path, monkeypatch):
    import errno

    import loraplex.core.io as io

    real_write = io._write_temp
    out = tmp_path / "run"

    def full_disk(path, data):
        if path.name in ("report.json", "report.md"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(io, "_write_temp", full_disk)
    with pytest.raises(OSError, match="No space left on device.*--resume"):
        train(small_config(tmp_path), loaded=tiny_loaded())
    assert not (out / "report.json").exists() and not (out / "report.md").exists()
    monkeypatch.setattr(io, "_write_temp", real_write)
    report = train(small_config(tmp_path, resume=True), loaded=tiny_loaded())
    assert report["steps"] == 6 and (out / "report.json").exists()
