"""Adapter files: round trips, several adapters in one folder, every kind of bad input (a clear
`AdapterFileError` naming the file and key, and the model left exactly as it was), and atomic saves
(a crash mid-save leaves the previous adapter loadable with its previous outputs, and no temp files)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_snapshot,
    perturb_magnitudes,
    snapshot,
    tiny_llama,
    zoo,
    zoo_ids,
)
from safetensors.torch import load_file, save_file
from torch import nn

import loraplex
from loraplex import AdapterFileError, AdapterModel, LoraConfig, attach
from loraplex.core import io as lp_io

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ALL_KINDS = ["emb", "lin", "gpt2", "conv1", "conv2"]
METHODS = {
    "lora": dict(targets=ALL_KINDS),
    "rslora": dict(targets=ALL_KINDS, rslora=True),
    "dora": dict(targets=["lin", "gpt2"], dora=True),
}


def trained_zoo(method: str, seed: int = 0, **extra) -> AdapterModel:
    """A Zoo with an adapter whose every tensor differs from its initial value (as after training)."""
    torch.manual_seed(seed)
    kwargs = {**METHODS[method], **extra}
    model = attach(zoo(), LoraConfig(r=3, alpha=5.0, init="random", **kwargs))
    perturb_magnitudes(model, seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def files_in(folder: Path) -> set[str]:
    return {p.name for p in Path(folder).iterdir()}


# =========================================================================== round trips
@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_gives_identical_outputs(tmp_path, method):
    model = trained_zoo(method, modules_to_save=["head"], bias="lora_only",
                        rank_pattern={"lin": 5}, alpha_pattern={"gpt2": 2.0})
    x = zoo_ids()
    with torch.no_grad():
        expected = model(x)
    model.save(tmp_path)
    assert files_in(tmp_path) == {CONFIG, WEIGHTS}
    loaded = loraplex.load(zoo(), tmp_path)
    assert isinstance(loaded, AdapterModel) and loaded.adapter_names == ["default"]
    assert loaded.active == [("default", 1.0)]
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    assert loaded.model.lin.adapters["default"].r == 5 and loaded.model.gpt2.adapters["default"].alpha == 2.0
    # every saved tensor came back bit for bit, under the same names
    assert {k: v for k, v in model.state_dict().items()}.keys() == loaded.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # and the trainable set is the same (biases of adapted layers, the saved head copy, the adapters)
    assert set(loaded.named_trainable_parameters()) == set(model.named_trainable_parameters())


def test_round_trip_bias_all_and_class_targets(tmp_path):
    torch.manual_seed(0)
    model = attach(zoo(), LoraConfig(r=2, init="random", targets=[nn.Linear, nn.Conv1d], bias="all"))
    with torch.no_grad():
        model.model.conv2.bias.add_(1.0)     # "all": biases of layers it does not adapt train too
        model.model.lin.base_layer.bias.sub_(1.0)
    assert set(model.adapted_layers()) == {"lin", "head", "conv1"}
    x = zoo_ids()
    with torch.no_grad():
        expected = model(x)
    model.save(tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS))
    assert {"base_model.model.conv2.bias", "base_model.model.lin.base_layer.bias",
            "base_model.model.conv1.base_layer.bias", "base_model.model.gpt2.bias"} <= keys
    assert not any("emb" in k for k in keys)
    loaded = loraplex.load(zoo(), tmp_path)
    assert set(loaded.adapted_layers()) == {"lin", "head", "conv1"}
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_files_use_peft_keys_and_config(tmp_path):
    model = trained_zoo("dora", modules_to_save=["head"], bias="lora_only")
    model.save(tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS))
    assert keys == {
        "base_model.model.lin.lora_A.weight", "base_model.model.lin.lora_B.weight",
        "base_model.model.lin.lora_magnitude_vector", "base_model.model.lin.base_layer.bias",
        "base_model.model.gpt2.lora_A.weight", "base_model.model.gpt2.lora_B.weight",
        "base_model.model.gpt2.lora_magnitude_vector", "base_model.model.gpt2.base_layer.bias",
        "base_model.model.head.weight", "base_model.model.head.bias",
    }
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True and config["r"] == 3
    assert config["lora_alpha"] == 5.0 and sorted(config["target_modules"]) == ["gpt2", "lin"]
    assert config["modules_to_save"] == ["head"] and config["bias"] == "lora_only"
    assert config["fan_in_fan_out"] is True    # GPT-2's Conv1D stores its weight (in, out)


def test_multi_adapter_save_default_at_root_others_in_subfolders(tmp_path):
    torch.manual_seed(0)
    model = attach(zoo(), LoraConfig(r=2, init="random", targets=["lin", "emb"]))
    model.add_adapter("dora", LoraConfig(r=3, init="random", dora=True, targets=["gpt2", "lin"]))
    model.add_adapter("conv", LoraConfig(r=4, init="random", rslora=True, targets=["conv1", "conv2"],
                                         modules_to_save=["head"]))
    perturb_magnitudes(model, 2)
    x = zoo_ids()
    expected = {}
    with torch.no_grad():
        for name in model.adapter_names:
            model.set_active(name)
            expected[name] = model(x)
    model.save(tmp_path)
    assert files_in(tmp_path) == {CONFIG, WEIGHTS, "dora", "conv"}
    assert files_in(tmp_path / "dora") == files_in(tmp_path / "conv") == {CONFIG, WEIGHTS}
    loaded = loraplex.load(zoo(), tmp_path)
    loraplex.load(loaded, tmp_path / "dora", name="dora")
    loraplex.load(loaded, tmp_path / "conv")   # the folder name is the default name
    assert loaded.adapter_names == ["default", "dora", "conv"]
    with torch.no_grad():
        for name, out in expected.items():
            loaded.set_active(name)
            assert torch.equal(loaded(x), out), name
        assert torch.equal(loaded(x, adapter_ids=["conv", "default", "dora", None]),
                           model(x, adapter_ids=["conv", "default", "dora", None]))
    # one named adapter goes to the folder given, whatever its name
    model.save(tmp_path / "just-dora", name="dora")
    with torch.no_grad():
        assert torch.equal(loraplex.load(zoo(), tmp_path / "just-dora")(x), expected["dora"])


def test_single_non_default_adapter_saves_at_root(tmp_path):
    model = attach(zoo(), LoraConfig(r=2, init="random", targets=["lin"]), "mine")
    model.save(tmp_path)
    assert files_in(tmp_path) == {CONFIG, WEIGHTS}


# =========================================================================== bad input
@pytest.fixture
def good_adapter(tmp_path) -> Path:
    folder = tmp_path / "good"
    trained_zoo("lora", modules_to_save=["head"]).save(folder)
    return folder


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)


def rewrite_config(folder: Path, change) -> None:
    data = json.loads((folder / CONFIG).read_text())
    change(data)
    (folder / CONFIG).write_text(json.dumps(data))


def assert_rejected(folder: Path, *mentions: str, make_base=zoo) -> AdapterFileError:
    """Loading fails with AdapterFileError mentioning `mentions`, and no model is changed in the least."""
    base = make_base()
    before = snapshot(base)
    with pytest.raises(AdapterFileError) as err:
        loraplex.load(base, folder)
    message = str(err.value)
    for mention in mentions:
        assert mention in message, f"{mention!r} not in {message!r}"
    assert_same_snapshot(before, snapshot(base))
    # An AdapterModel that has adapters already keeps them exactly as they were.
    torch.manual_seed(5)
    model = attach(make_base(), LoraConfig(r=2, init="random", targets="all-linear"), "existing")
    model.add_adapter("other", LoraConfig(r=3, init="random", targets="all-linear"))
    model.set_active(["existing", "other"], [0.5, 2.0])
    before = snapshot(model)
    configs, active = dict(model.configs), model.active
    with pytest.raises(AdapterFileError):
        loraplex.load(model, folder, name="new")
    assert_same_snapshot(before, snapshot(model))
    assert model.configs == configs and model.active == active
    return err.value


def test_wrong_shape_is_rejected(good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    rewrite_tensors(folder, lambda t: t.update({"base_model.model.lin.lora_A.weight": torch.zeros(3, 7)}))
    assert_rejected(folder, str(folder / WEIGHTS), "base_model.model.lin.lora_A.weight", "(3, 7)", "(3, 6)")


def test_wrong_rank_of_one_factor_is_rejected(good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    rewrite_tensors(folder, lambda t: t.update({"base_model.model.gpt2.lora_B.weight": torch.zeros(6, 4)}))
    assert_rejected(folder, str(folder / WEIGHTS), "base_model.model.gpt2.lora_B.weight")


def test_wrong_shape_of_saved_module_is_rejected(good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    rewrite_tensors(folder, lambda t: t.update({"base_model.model.head.weight": torch.zeros(5, 6)}))
    assert_rejected(folder, str(folder / WEIGHTS), "base_model.model.head.weight")


def test_missing_key_is_rejected(good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    rewrite_tensors(folder, lambda t: t.pop("base_model.model.conv2.lora_B.weight"))
    assert_rejected(folder, str(folder / WEIGHTS), "missing", "conv2", "lora_B.weight")


def test_missing_saved_module_key_is_rejected(good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    rewrite_tensors(folder, lambda t: t.pop("base_model.model.head.bias"))
    assert_rejected(folder, str(folder / WEIGHTS), "missing", "base_model.model.head.bias")


def test_unexpected_key_is_rejected(good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    rewrite_tensors(folder, lambda t: t.update({"base_model.model.decoder.lora_A.weight": torch.zeros(3, 6)}))
    assert_rejected(folder, str(folder / WEIGHTS), "unexpected", "base_model.model.decoder.lora_A.weight")


def test_adapter_made_for_another_base_is_rejected(tmp_path):
    # same layer names, one more layer: the extra layer's keys are unexpected
    torch.manual_seed(0)
    attach(tiny_llama(layers=3), LoraConfig(r=2, init="random", targets=["q_proj", "v_proj"])).save(tmp_path / "deep")
    assert_rejected(tmp_path / "deep", str(tmp_path / "deep" / WEIGHTS), "unexpected",
                    "base_model.model.model.layers.2.self_attn", make_base=tiny_llama)
    # same names, other width: shapes do not fit
    attach(tiny_llama(hidden=32), LoraConfig(r=2, init="random", targets=["q_proj"])).save(tmp_path / "wide")
    assert_rejected(tmp_path / "wide", str(tmp_path / "wide" / WEIGHTS), "lora_A.weight", "(2, 32)", "(2, 16)",
                    make_base=tiny_llama)


def test_config_for_another_base_model_is_rejected(good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    rewrite_config(folder, lambda c: (c.pop("loraplex"), c.update(target_modules=["q_proj", "v_proj"])))
    error = assert_rejected(folder, str(folder / CONFIG), "q_proj", "another base model")
    assert "Adaptable layer names in this model" in str(error)


def test_truncated_safetensors_is_rejected(good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    data = (folder / WEIGHTS).read_bytes()
    for cut in (len(data) - 7, len(data) // 2, 20, 3, 0):
        (folder / WEIGHTS).write_bytes(data[:cut])
        assert_rejected(folder, str(folder / WEIGHTS), "safetensors")


def test_weights_reader_matches_safetensors(tmp_path):
    """`loraplex.load` reads weight files itself (one read, views): same tensors and metadata as safetensors."""
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7, dtype=torch.bfloat16), "f16": torch.randn(2, 2).half(),
               "i8": torch.arange(5, dtype=torch.int8), "i64": torch.arange(3), "bool": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5), "empty": torch.empty(0, 4)}
    save_file(tensors, tmp_path / "w.safetensors", metadata={"k": "v"})
    read, metadata = lp_io._read_safetensors(tmp_path / "w.safetensors")
    expected = load_file(tmp_path / "w.safetensors")
    assert metadata == {"k": "v"} and set(read) == set(expected)
    for key, value in expected.items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape and torch.equal(read[key], value)


def test_weights_file_with_bad_offsets_is_rejected(good_adapter, tmp_path):
    import struct

    folder = copy_adapter(good_adapter, tmp_path / "bad")
    data = (folder / WEIGHTS).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    key = next(k for k in header if k != "__metadata__")
    begin, end = header[key]["data_offsets"]
    for offsets in ([begin, end + 4], [begin, len(data)], [end, begin]):
        bad = dict(header, **{key: dict(header[key], data_offsets=offsets)})
        text = json.dumps(bad).encode()
        text += b" " * (-len(text) % 8)
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
        assert_rejected(folder, str(folder / WEIGHTS), "safetensors")


def test_non_safetensors_file_is_rejected(good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    marker = tmp_path / "unpickled"
    for payload in (b"\x00" * 64, b'{"just": "json"}', pickle_bomb(marker)):
        (folder / WEIGHTS).write_bytes(payload)
        assert_rejected(folder, str(folder / WEIGHTS), "safetensors")
    assert not marker.exists()


def pickle_bomb(marker: Path) -> bytes:
    """A pickle (what torch.save writes) that creates `marker` when unpickled."""
    import io
    import pickle

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buffer = io.BytesIO()
    pickle.dump({"base_model.model.lin.lora_A.weight": Bomb()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("pickle_name", ["adapter_model.bin", "adapter_model.pt"])
def test_pickle_only_folder_is_never_unpickled(good_adapter, tmp_path, monkeypatch, pickle_name):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    (folder / WEIGHTS).unlink()
    marker = tmp_path / "unpickled"
    (folder / pickle_name).write_bytes(pickle_bomb(marker))

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    error = assert_rejected(folder, str(folder / pickle_name), "never loaded")
    assert "pickle" in str(error).lower()
    assert not marker.exists()


@pytest.mark.parametrize("text, mentions", [
    ('{"peft_type": "LORA", "r": 8,', ["not valid JSON"]),
    ("", ["not valid JSON"]),
    ("[1, 2, 3]", ["JSON object"]),
    ("\udcff", ["not valid JSON"]),
    ('{"peft_type": "LORA", "r": "eight", "lora_alpha": 16, "target_modules": ["lin"]}', ["invalid adapter config"]),
    ('{"peft_type": "LORA", "r": 0, "lora_alpha": 16, "target_modules": ["lin"]}', ["r must be a positive integer"]),
    ('{"peft_type": "LORA", "r": 3, "lora_alpha": 5, "lora_dropout": 2, "target_modules": ["lin"]}',
     ["dropout"]),
    ('{"peft_type": "LORA", "r": 3, "lora_alpha": 5}', ["target_modules is missing"]),
    ('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}', ["PROMPT_TUNING", "not supported"]),
    ('{"peft_type": "LORA", "r": 3, "lora_alpha": 5, "target_modules": ["lin"], "loraplex": {"config": {"r": -1}}}',
     ["r must be a positive integer"]),
    ('{"peft_type": "LORA", "r": 3, "lora_alpha": 5, "target_modules": ["lin"], "loraplex": {"config": {"rank": 2}}}',
     ["invalid adapter config"]),
    ('{"peft_type": "LORA", "r": 3, "lora_alpha": 5, "target_modules": ["lin"], "loraplex": 7}',
     ["invalid adapter config"]),
])
def test_malformed_config_is_rejected(good_adapter, tmp_path, text, mentions):
    folder = copy_adapter(good_adapter, tmp_path / "bad")
    (folder / CONFIG).write_bytes(text.encode("utf-8", "surrogateescape"))
    assert_rejected(folder, str(folder / CONFIG), *mentions)


def test_missing_files_are_rejected(good_adapter, tmp_path):
    folder = copy_adapter(good_adapter, tmp_path / "no-config")
    (folder / CONFIG).unlink()
    assert_rejected(folder, str(folder / CONFIG), "missing")
    folder = copy_adapter(good_adapter, tmp_path / "no-weights")
    (folder / WEIGHTS).unlink()
    assert_rejected(folder, str(folder / WEIGHTS), "missing")
    assert_rejected(tmp_path / "nowhere", str(tmp_path / "nowhere"), "no such adapter folder")


def test_files_from_two_saves_are_rejected(tmp_path):
    trained_zoo("lora", seed=1).save(tmp_path / "one")
    trained_zoo("lora", seed=2).save(tmp_path / "two")
    shutil.copy(tmp_path / "two" / WEIGHTS, tmp_path / "one" / WEIGHTS)
    assert_rejected(tmp_path / "one", str(tmp_path / "one" / WEIGHTS), "another save")


def test_load_errors_on_taken_name_and_bad_target(tmp_path, good_adapter):
    model = loraplex.load(zoo(), good_adapter)
    with pytest.raises(ValueError, match="exists already"):
        loraplex.load(model, good_adapter, name="default")
    second = loraplex.load(model, good_adapter)          # "default" is taken: named after the folder
    assert second is model and model.adapter_names == ["default", "good"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterFileError, match="not a folder"):
        model.save(tmp_path / "file")


# =========================================================================== atomic saves
class _HalfWriter:
    """A file whose write() puts half of the data on disk and then fails, like a full disk."""

    def __init__(self, real) -> None:
        self.real = real

    def write(self, data):
        self.real.write(data[: len(data) // 2])
        self.real.flush()
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()
        return False


def _fail_nth_write(monkeypatch, n: int) -> None:
    real_fdopen = os.fdopen
    count = {"writes": 0}

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        count["writes"] += 1
        return _HalfWriter(f) if count["writes"] == n else f

    monkeypatch.setattr(lp_io.os, "fdopen", fdopen)


def _fail_nth_replace(monkeypatch, n: int) -> None:
    real_replace = os.replace
    count = {"replaces": 0}

    def replace(src, dst):
        count["replaces"] += 1
        if count["replaces"] == n:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(lp_io.os, "replace", replace)


@pytest.mark.parametrize("crash", ["first file", "second file", "second rename"])
def test_crash_mid_save_keeps_previous_adapter(tmp_path, monkeypatch, crash):
    old = trained_zoo("lora", seed=1)
    old.save(tmp_path)
    x = zoo_ids()
    with torch.no_grad():
        old_out = loraplex.load(zoo(), tmp_path)(x)
    old_bytes = {n: (tmp_path / n).read_bytes() for n in (CONFIG, WEIGHTS)}
    new = trained_zoo("dora", seed=2, modules_to_save=["head"])   # other keys, other config
    with monkeypatch.context() as patch:
        if crash == "second rename":
            _fail_nth_replace(patch, 2)
        else:
            _fail_nth_write(patch, 1 if crash == "first file" else 2)
        with pytest.raises(OSError):
            new.save(tmp_path)
    assert files_in(tmp_path) == {CONFIG, WEIGHTS}, "temp files left behind"
    assert {n: (tmp_path / n).read_bytes() for n in (CONFIG, WEIGHTS)} == old_bytes
    with torch.no_grad():
        assert torch.equal(loraplex.load(zoo(), tmp_path)(x), old_out)
    new.save(tmp_path)   # and a save that succeeds replaces both
    with torch.no_grad():
        assert torch.equal(loraplex.load(zoo(), tmp_path)(x), new(x))


def test_crash_during_first_save_leaves_nothing_loadable_behind(tmp_path, monkeypatch):
    folder = tmp_path / "fresh"
    with monkeypatch.context() as patch:
        _fail_nth_replace(patch, 2)
        with pytest.raises(OSError):
            trained_zoo("lora").save(folder)
    assert files_in(folder) == set()
    with pytest.raises(AdapterFileError, match="missing"):
        loraplex.load(zoo(), folder)


_SAVER_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from torch import nn
    import loraplex
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1024, 1024))
    torch.manual_seed(1)
    model = loraplex.attach(base, loraplex.LoraConfig(r=384, init="random", dora=True, targets=["0"]))
    folder, mode = sys.argv[1], sys.argv[2]
    if mode == "loop":          # save forever, until killed
        print("ready", flush=True)
        while True:
            model.save(folder)
    real_replace, calls = os.replace, [0]

    def replace(src, dst):      # die like SIGKILL (no cleanup, no finally) just before rename number N
        calls[0] += 1
        if calls[0] == int(mode):
            os._exit(9)
        return real_replace(src, dst)

    os.replace = replace
    model.save(folder)
    os._exit(0)
""")


def _saver_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 1024))


def _old_and_new(folder: Path):
    """Save the old adapter (plain LoRA, r=8) to `folder`; return it and the saver script's (DoRA, r=384)."""
    base = _saver_base()
    torch.manual_seed(2)
    old = attach(base, LoraConfig(r=8, init="random", targets=["0"]))
    old.save(folder)
    base = _saver_base()
    torch.manual_seed(1)   # as the saver script draws its adapter
    new = attach(base, LoraConfig(r=384, init="random", dora=True, targets=["0"]))
    return old, new


def _run_saver(tmp_path: Path, folder: Path, mode: str, kill_after: float | None = None) -> int:
    script = tmp_path / "saver.py"
    script.write_text(_SAVER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(folder), mode], stdout=subprocess.PIPE, env=env)
    try:
        if kill_after is not None:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
    finally:
        if kill_after is not None:
            proc.kill()
        code = proc.wait(timeout=120)
        proc.stdout.close()
    return code


@pytest.mark.parametrize("rename", [1, 2])
def test_writer_killed_before_or_between_renames_leaves_previous_adapter(tmp_path, rename):
    """The writer dies (os._exit, as under SIGKILL: no cleanup runs) just before the weights rename (1)
    or between the weights and the config renames (2): the folder still loads the previous adapter
    with its previous outputs; the next save removes what the dead writer left."""
    folder = tmp_path / "adapter"
    old, new = _old_and_new(folder)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        old_out = old(x)
    assert _run_saver(tmp_path, folder, str(rename)) == 9
    assert any(name.startswith(".") for name in files_in(folder))   # the dead writer's leftovers
    with torch.no_grad():
        assert torch.equal(loraplex.load(_saver_base(), folder)(x), old_out)
    new.save(folder)
    assert files_in(folder) == {CONFIG, WEIGHTS}, "stale temp files of the killed writer remain"
    with torch.no_grad():
        assert torch.equal(loraplex.load(_saver_base(), folder)(x), new(x))


def test_sigkill_at_a_random_moment_leaves_old_or_new_adapter(tmp_path):
    """SIGKILL a process that keeps saving a 3 MB adapter over an old one: the folder loads, with
    exactly the old or the new outputs, never a mix or an error."""
    folder = tmp_path / "adapter"
    old, new = _old_and_new(folder)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(3))
    _run_saver(tmp_path, folder, "loop", kill_after=0.4)
    assert {CONFIG, WEIGHTS} <= files_in(folder)
    with torch.no_grad():
        out = loraplex.load(_saver_base(), folder)(x)
        assert torch.equal(out, old(x)) or torch.equal(out, new(x))
    old.save(folder)
    assert files_in(folder) == {CONFIG, WEIGHTS}
