"""Recipe plumbing: names and options are checked with actionable errors, recipe state survives a
checkpoint/resume through the real loop, methods' auxiliary losses reach the training loss."""

from __future__ import annotations

import pytest
import torch
from recipe_opt_util import batch, log_rows, run, saved_adapter

from loraplex.cli.main import main
from loraplex.core.config import LoraConfig
from loraplex.core.model import attach
from loraplex.training.loop import TrainingInterrupted, completion_loss
from loraplex.training.recipes import Recipe, available, make_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

OURS = ("lora-plus", "allora", "lora-fa", "b-only", "lora-sp", "aflora", "lora-dropout", "gs-lora", "bilora",
        "kd-lora")


def test_every_recipe_is_registered_and_listed(capsys):
    names = available()
    assert set(OURS) <= set(names)
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in OURS:
        assert name in out
    assert "lr_ratio=16.0" in out  # options and their defaults are listed


def test_unknown_recipe_and_option_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="unknown recipe 'lora-pluss'; available: .*lora-plus"):
        make_recipe("lora-pluss")
    with pytest.raises(ValueError, match="unknown option\\(s\\) ratio; allowed: lr_ratio=16.0, embedding_lr"):
        make_recipe("lora-plus", {"ratio": 2})
    with pytest.raises(ValueError, match="unknown option\\(s\\) p; allowed: none"):
        make_recipe("lora-fa", {"p": 1})
    with pytest.raises(ValueError, match="proximal must be true or false"):
        make_recipe("gs-lora", {"proximal": "yes"})


def test_recipes_on_a_model_without_lora_factors_say_why():
    torch.manual_seed(0)
    from tiny import tiny_loaded

    model = attach(tiny_loaded().model, LoraConfig(r=2, method="vera"))
    for name in ("lora-fa", "gs-lora", "lora-sp"):
        with pytest.raises(ValueError, match="needs adapters with low-rank factors lora_A / lora_B.*vera"):
            make_recipe(name).setup(model, None)


@pytest.mark.parametrize("recipe, options", [
    ("aflora", {"delta_t": 1, "warmup_fraction": 0.25, "final_fraction": 0.25}),
    ("lora-sp", {"resample_every": 1}),
    ("lora-dropout", {"p": 0.3}),
    ("b-only", {}),
    ("gs-lora", {"weight": 0.5}),
])
def test_recipe_state_survives_checkpoint_and_resume(tmp_path, recipe, options):
    kwargs = dict(recipe=recipe, recipe_options=options, steps=4, checkpoint_every=1)
    run(tmp_path, "full", **kwargs)
    with pytest.raises(TrainingInterrupted):
        run(tmp_path, "cut", stop_after=2, **kwargs)
    run(tmp_path, "cut", resume=True, **kwargs)
    a, b = saved_adapter(tmp_path, "full"), saved_adapter(tmp_path, "cut")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]  # noqa: E731
    assert strip(log_rows(tmp_path, "full")) == strip(log_rows(tmp_path, "cut"))


def test_aux_losses_of_methods_reach_the_loss():
    from tiny import tiny_loaded

    from loraplex.methods.goat import GoatAdapter

    torch.manual_seed(0)
    model = attach(tiny_loaded().model, LoraConfig(r=4, method="goat", options={"experts": 4, "top_k": 2,
                                                                                "aux_loss_coef": 0.5}))
    model.train()
    data = batch()
    loss, n = Recipe().loss(model, data, 0)
    task, n_ref = completion_loss(model.model, data)  # the same forward again: same router decisions
    aux = GoatAdapter.aux_loss(model, "default")
    assert isinstance(aux, torch.Tensor) and aux.item() > 0 and n == n_ref
    torch.testing.assert_close(loss, task + aux)
    recipe = make_recipe("gs-lora", {"weight": 0.0, "proximal": False})  # an overriding loss keeps the term
    torch.testing.assert_close(recipe.loss(model, data, 0)[0], task + aux)


def test_cli_passes_recipe_options(capsys):
    import yaml

    assert main(["train", "--recipe", "lora-plus", "--recipe-option", "lr_ratio=4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["recipe"] == "lora-plus" and printed["recipe_options"] == {"lr_ratio": 4}
