"""Every registered method trains through `loraplex train --method NAME` on the embedded SmolLM2 (slow).

The command line is parsed exactly as `loraplex train` parses it (`build_parser` + `build_train_config`);
the model is loaded once and each method trains on a fresh deep copy (`train(cfg, loaded=...)`), which
is what `cmd_train` runs after loading. Each run must write a report with a finite loss and an adapter
that loads back onto an untouched copy of the base with the trained model's outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from loraplex.methods import available

pytestmark = pytest.mark.slow

FLAGS = ["--steps", "1", "--batch-size", "2", "--train-samples", "8", "--eval-samples", "2", "--eval-batch-size",
         "2", "--no-base-eval", "--checkpoint-every", "0", "--targets", "q_proj,v_proj"]


@pytest.fixture(scope="module")
def smollm2():
    from loraplex.models import load_model

    return load_model(None)


def cli_config(method: str, output) -> object:
    from loraplex.cli.main import build_parser, build_train_config

    args = build_parser().parse_args(["train", "--method", method, *FLAGS, "--output", str(output)])
    return build_train_config(args)


@pytest.mark.parametrize("method", sorted(available()))
def test_method_trains_through_loraplex_train(smollm2, method, tmp_path):
    from loraplex.core.io import load
    from loraplex.training.loop import train

    cfg = cli_config(method, tmp_path / "run")
    assert cfg.method == method and cfg.steps == 1 and not cfg.base_eval
    model = copy.deepcopy(smollm2.model)
    run = dataclasses.replace(smollm2, model=model)
    report = train(cfg, loaded=run)
    assert report["method"] == method and report["steps"] == 1
    assert math.isfinite(report["final_loss"]) and report["final_loss"] > 0
    assert report["trainable_parameters"] > 0 and 0 <= report["adapter_score"] <= 100
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["final_loss"] == report["final_loss"]
    # the saved adapter loads back on an untouched base with the trained model's outputs
    ids = smollm2.tokenizer(["What is 2 + 2?"], return_tensors="pt")["input_ids"]
    model.eval()
    fresh = load(copy.deepcopy(smollm2.model), tmp_path / "run" / "adapter").eval()
    assert fresh.configs["default"].method == method
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
