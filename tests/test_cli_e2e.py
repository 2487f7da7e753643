"""End to end on the real embedded SmolLM2, through the `loraplex` command (slow; CI runs them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "loraplex.cli.main"]
SHORT = ["--steps", "2", "--batch-size", "4", "--train-samples", "16", "--eval-samples", "4",
         "--eval-batch-size", "4"]


def run(*args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "TQDM_MININTERVAL": "5"})
    if check and result.returncode != 0:
        raise AssertionError(f"loraplex {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run"
    run("train", *SHORT, "--output", str(out))
    return out


def test_train_writes_adapter_log_plot_and_report(trained):
    report = json.loads((trained / "report.json").read_text())
    for key in ("metric", "base_score", "adapter_score", "train_seconds", "steps", "trainable_parameters"):
        assert key in report, key
    assert report["steps"] == 2 and report["trainable_parameters"] > 0
    assert (trained / "loss.png").stat().st_size > 1000
    assert (trained / "report.md").read_text().startswith("# loraplex training report")
    assert len((trained / "train_log.jsonl").read_text().splitlines()) == 2
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16


def test_eval_generate_merge_inspect(trained, tmp_path):
    adapter = str(trained / "adapter")
    scored = json.loads(run("eval", "--adapter", adapter, "--n", "4", "--batch-size", "4").stdout)
    assert 0 <= scored["exact_match"] <= 100 and scored["n"] == 4
    out = run("generate", "--adapter", adapter, "--prompt", "Rewrite this date in ISO 8601 format (YYYY-MM-DD): "
              "May 3, 2001", "--max-new-tokens", "12", "--json").stdout
    assert json.loads(out.splitlines()[0])["completion"].strip()
    merged = tmp_path / "merged"
    run("merge", "--adapter", adapter, "--output", str(merged))
    assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))
    # the merged folder is a model in its own right: same greedy answer as base + adapter
    again = run("generate", "--model", str(merged), "--prompt", "Rewrite this date in ISO 8601 format "
                "(YYYY-MM-DD): May 3, 2001", "--max-new-tokens", "12", "--json").stdout
    assert json.loads(again.splitlines()[0])["completion"] == json.loads(out.splitlines()[0])["completion"]
    png = tmp_path / "spectra.png"
    table = run("inspect", adapter, "--plot", str(png)).stdout
    assert "q_proj" in table and png.stat().st_size > 1000


def test_sigterm_checkpoints_and_resume_finishes(tmp_path):
    out = tmp_path / "killed"
    args = [*CLI, "train", "--steps", "6", "--batch-size", "2", "--train-samples", "12", "--eval-samples", "2",
            "--eval-batch-size", "2", "--checkpoint-every", "1", "--no-base-eval", "--output", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint" / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err
    assert not (out / "report.json").exists()
    step = json.loads((out / "checkpoint" / "state.json").read_text())["progress"]["step"]
    assert 1 <= step < 6
    run("train", "--steps", "6", "--batch-size", "2", "--train-samples", "12", "--eval-samples", "2",
        "--eval-batch-size", "2", "--checkpoint-every", "1", "--no-base-eval", "--output", str(out), "--resume")
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 6


def test_bad_inputs_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    result = run("train", *SHORT, "--data", str(bad), "--output", str(tmp_path / "o"), check=False)
    assert result.returncode == 2 and "line 2" in result.stderr and "Traceback" not in result.stderr
    result = run("train", *SHORT, "--model", "/nonexistent/model", "--output", str(tmp_path / "o2"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = run("eval", "--adapter", str(tmp_path), check=False)
    assert result.returncode == 2 and "adapter" in result.stderr.lower()
