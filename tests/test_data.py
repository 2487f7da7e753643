"""Tests of loraplex.data: synthetic tasks, user data files, tokenization and batching."""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import re
import string
import subprocess
import sys
from datetime import date, datetime
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.data import (
    DEFAULT_TASK,
    IGNORE_INDEX,
    TASKS,
    DataError,
    Encoded,
    Example,
    collate,
    encode,
    encode_all,
    exact_match,
    get_task,
    length_bucketed_batches,
    load_data,
    load_examples,
    render_prompt,
    split_examples,
    task_split,
)

# ---------------------------------------------------------------- independent answer checkers


def _ordinal_suffix(day: int) -> str:
    return {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}.get(day, "th")


_NAMED_DATE_FORMATS = ["%B %d, %Y", "%d %B %Y", "%d %b %Y", "%b %d, %Y", "%Y, %B %d", "%d %B, %Y",
                       "%A, %B %d, %Y"]


def check_dates(ex: Example) -> str:
    """Parse the date back with `datetime`; return which format family it was."""
    m = re.fullmatch(r"Rewrite this date in ISO 8601 format \(YYYY-MM-DD\): (.+)", ex.prompt)
    assert m, ex.prompt
    text = m.group(1)
    numeric = re.fullmatch(r"(\d+)([/.])(\d+)\2(\d+) \((\w+)\2(\w+)\2(\w+)\)", text)
    if numeric:
        values = [int(numeric.group(i)) for i in (1, 3, 4)]
        order = [numeric.group(i) for i in (5, 6, 7)]
        assert sorted(order) == ["day", "month", "year"], text
        fields = dict(zip(order, values))
        parsed = date(fields["year"], fields["month"], fields["day"])
        family = "numeric " + "/".join(order) + numeric.group(2)
    else:
        for number, suffix in re.findall(r"\b(\d+)(st|nd|rd|th)\b", text):
            assert suffix == _ordinal_suffix(int(number)), text
        cleaned = re.sub(r"\b(\d+)(st|nd|rd|th)\b", r"\1", text)
        cleaned = cleaned.replace("the ", "").replace(" of ", " ")
        for family in _NAMED_DATE_FORMATS:
            try:
                parsed = datetime.strptime(cleaned, family).date()
                break
            except ValueError:
                continue
        else:
            raise AssertionError(f"unparseable date {text!r}")
        if "%A" in family:
            assert text.split(",")[0] == parsed.strftime("%A"), text
        family += " (ordinal)" if cleaned != text else ""
    assert 1900 <= parsed.year <= 2099
    assert ex.completion == parsed.isoformat()
    return family


def check_arithmetic(ex: Example) -> str:
    m = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\? Answer with the number only\.", ex.prompt)
    assert m, ex.prompt
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    assert a >= 10 and b >= 10, "operands are multi-digit"
    result = {"+": operator.add, "-": operator.sub}[op](a, b)
    assert result >= 0
    assert ex.completion == str(result)
    return op


# size of each unit in the smallest unit of its dimension
_UNIT_SIZES = {
    "length": {"kilometer": 1_000_000, "meter": 1000, "centimeter": 10, "millimeter": 1},
    "mass": {"tonne": 10**9, "kilogram": 10**6, "gram": 1000, "milligram": 1},
    "time": {"week": 604_800, "day": 86_400, "hour": 3600, "minute": 60, "second": 1},
    "volume": {"liter": 1000, "milliliter": 1},
    "imperial": {"yard": 36, "foot": 12, "inch": 1},
}
_IRREGULAR = {"feet": "foot", "inches": "inch"}


def _unit_size(word: str) -> tuple[str, int, bool]:
    """(dimension, size, is_plural) of a unit word."""
    singular = _IRREGULAR.get(word, word[:-1] if word.endswith("s") else word)
    for dimension, sizes in _UNIT_SIZES.items():
        if singular in sizes:
            return dimension, sizes[singular], singular != word
    raise AssertionError(f"unknown unit {word!r}")


def check_units(ex: Example) -> str:
    m = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\. Answer with the number only\.", ex.prompt)
    assert m, ex.prompt
    quantity, src, dst = int(m.group(1)), m.group(2), m.group(3)
    src_dim, src_size, src_plural = _unit_size(src)
    dst_dim, dst_size, dst_plural = _unit_size(dst)
    assert src_dim == dst_dim and src != dst
    assert src_plural == (quantity != 1) and dst_plural
    assert quantity * src_size % dst_size == 0, "answers are whole numbers"
    assert ex.completion == str(quantity * src_size // dst_size)
    return f"{src}->{dst}"


def check_extract(ex: Example) -> str:
    assert 'Reply with compact JSON only: {"name":...,"age":...,"city":...}' in ex.prompt
    text = ex.prompt.split("\nText: ", 1)[1]
    obj = json.loads(ex.completion)
    assert list(obj) == ["name", "age", "city"]
    assert json.dumps(obj, separators=(",", ":")) == ex.completion
    assert isinstance(obj["age"], int) and re.findall(r"\d+", text) == [str(obj["age"])]
    assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", obj["name"])
    assert obj["name"] in text and obj["city"] in text
    without_city = text.replace(obj["city"], "")
    assert obj["name"] in without_city, "the name is not part of the city"
    return re.sub(r"[A-Z][a-z]+|\d+", "_", text)  # the sentence template


def check_sort(ex: Example) -> str:
    head, words_line = ex.prompt.split("\nWords: ")
    assert head.startswith("Sort these words alphabetically")
    words = words_line.split(" ")
    assert 4 <= len(words) <= 7 and len(set(words)) == len(words)
    assert ex.completion.split(" ") == sorted(words)
    return str(len(words))


def check_reverse(ex: Example) -> str:
    head, words_line = ex.prompt.split("\nWords: ")
    assert head.startswith("Reverse the order of these words")
    words = words_line.split(" ")
    assert 3 <= len(words) <= 6 and len(set(words)) == len(words)
    assert ex.completion.split(" ") == words[::-1]
    return str(len(words))


CHECKERS = {"dates": check_dates, "arithmetic": check_arithmetic, "units": check_units,
            "extract": check_extract, "sort": check_sort, "reverse": check_reverse}
# how many distinct variants (format families, ops, ...) each task must show in 600 examples
MIN_VARIANTS = {"dates": 11, "arithmetic": 2, "units": 25, "extract": 7, "sort": 4, "reverse": 4}


# ---------------------------------------------------------------- tasks


def test_registry_and_default():
    assert set(CHECKERS) <= set(TASKS) and len(TASKS) >= 6
    assert DEFAULT_TASK == "dates"
    for name, task in TASKS.items():
        assert task.name == name and task.description and get_task(name) is task
    with pytest.raises(ValueError) as info:
        get_task("datez")
    for name in TASKS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", sorted(CHECKERS))
def test_every_answer_recomputes(name):
    examples = task_split(name, "train", 500, seed=1) + task_split(name, "test", 100, seed=1)
    variants = {CHECKERS[name](ex) for ex in examples}
    assert len(variants) >= MIN_VARIANTS[name], sorted(variants)
    for ex in examples:
        assert ex.messages is None
        assert ex.completion == ex.completion.strip() and "\n" not in ex.completion and ex.completion
        assert exact_match(ex.completion, ex.completion)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**40), name=st.sampled_from(sorted(CHECKERS)))
def test_answers_recompute_for_any_seed(seed, name):
    for ex in task_split(name, "test", 5, seed=seed):
        CHECKERS[name](ex)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_deterministic(name):
    first = task_split(name, "train", 60, seed=7)
    assert first == task_split(name, "train", 60, seed=7)
    assert first[:25] == task_split(name, "train", 25, seed=7), "a prefix does not depend on n"
    assert first != task_split(name, "train", 60, seed=8)
    assert task_split(name, "test", 20, seed=7) == task_split(name, "test", 20, seed=7)
    assert task_split(name, "train", 0, seed=7) == []


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_and_test_are_disjoint(name):
    train = [e.prompt for e in task_split(name, "train", 3000, seed=0)]
    test = [e.prompt for e in task_split(name, "test", 300, seed=0)]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    other_seed_test = [e.prompt for e in task_split(name, "test", 300, seed=1)]
    assert not set(train) & set(other_seed_test), "disjoint across seeds too"
    assert set(test) != set(other_seed_test)


def test_splits_do_not_depend_on_hash_seed():
    code = ("import hashlib; from loraplex.data import TASKS, task_split; "
            "print(hashlib.sha256(repr([task_split(t, s, 20, 3) for t in sorted(TASKS) "
            "for s in ('train', 'test')]).encode()).hexdigest())")
    here = hashlib.sha256(repr([task_split(t, s, 20, 3) for t in sorted(TASKS)
                                for s in ("train", "test")]).encode()).hexdigest()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_task_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="train, test"):
        task_split("dates", "validation", 3)
    with pytest.raises(ValueError, match="non-negative"):
        task_split("dates", "train", -1)
    with pytest.raises(ValueError, match="unknown task"):
        task_split("nope", "train", 3)


@pytest.mark.parametrize("prediction, expected", [
    ("2021-03-05", True),
    ("  2021-03-05 \n", True),
    ("2021-03-05\nBecause March is the third month.", True),
    ("\n\n2021-03-05", True),
    ("The answer is 2021-03-05", False),
    ("Sure!\n2021-03-05", False),
    ("2021-03-05.", False),
    ("2021-3-5", False),
    ("", False),
])
def test_exact_match(prediction, expected):
    assert exact_match(prediction, " 2021-03-05\n") is expected


# ---------------------------------------------------------------- files


def write(tmp_path, name: str, text: str, encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def jsonl(*records) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"


def test_jsonl_prompt_completion(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl({"prompt": "a", "completion": "b", "id": 1}, "",
                                            {"prompt": "", "completion": "c"}))
    assert load_examples(path) == [Example("a", "b"), Example("", "c")]


BAD_RECORDS = [
    ('{"prompt": "a", "completion": ', "invalid JSON"),
    ({"prompt": "a"}, 'missing "completion"'),
    ({"completion": "a"}, 'missing "prompt"'),
    ({"prompt": "a", "completion": 5}, '"completion" must be a string, got int'),
    ({"prompt": ["a"], "completion": "b"}, '"prompt" must be a string, got list'),
    ({"prompt": "a", "completion": "  "}, '"completion" is empty'),
    ([1, 2], "expected a JSON object, got list"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant's"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "allowed roles"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     '"content" must be a string'),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]},
     "no user message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "answer (last message) is empty"),
]


@pytest.mark.parametrize("record, reason", BAD_RECORDS)
def test_bad_line_names_file_line_and_reason(tmp_path, record, reason):
    path = write(tmp_path, "d.jsonl", jsonl({"prompt": "a", "completion": "b"}, "", record))
    with pytest.raises(DataError) as info:
        load_examples(path)
    message = str(info.value)
    assert str(path) in message and "1 bad line (lines 3)" in message and reason in message
    assert '"prompt"' in message and '"messages"' in message, "says what is allowed"
    assert "skip_bad_lines" in message


def test_many_bad_lines_are_all_numbered(tmp_path):
    lines = [{"prompt": str(i), "completion": "ok"} if i % 3 else "{oops" for i in range(1, 31)]
    path = write(tmp_path, "d.jsonl", jsonl(*lines))
    with pytest.raises(DataError, match=r"10 bad lines \(lines 3, 6, 9, 12, 15, 18, 21, 24, 27, 30\)"):
        load_examples(path)


def test_skip_bad_lines_logs_count_and_lines(tmp_path, caplog):
    path = write(tmp_path, "d.jsonl", jsonl({"prompt": "a", "completion": "b"}, "not json",
                                            {"prompt": "c"}, {"prompt": "d", "completion": "e"}))
    with caplog.at_level(logging.WARNING, logger="loraplex.data"):
        examples = load_examples(path, skip_bad_lines=True)
    assert examples == [Example("a", "b"), Example("d", "e")]
    assert "2 bad lines (lines 2, 3)" in caplog.text and "skipped" in caplog.text


@pytest.mark.parametrize("text, skip, reason", [
    ("", False, "no records"),
    ("\n  \n", False, "no records"),
    ("[1]\n{}\n", True, "all 2 lines were bad"),
])
def test_empty_dataset(tmp_path, text, skip, reason):
    path = write(tmp_path, "d.jsonl", text)
    with pytest.raises(DataError, match="no usable examples") as info:
        load_examples(path, skip_bad_lines=skip)
    assert reason in str(info.value)


def test_chat_messages(tmp_path):
    single = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    multi = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye?"},
             {"role": "assistant", "content": "bye", "name": "ignored"}]
    path = write(tmp_path, "chat.jsonl", jsonl({"messages": single}, {"messages": multi}))
    one, two = load_examples(path)
    assert (one.prompt, one.completion, one.messages) == ("2+2?", "4", single)
    assert two.completion == "bye" and two.messages[-1] == {"role": "assistant", "content": "bye"}
    assert two.messages[:-1] == multi[:-1]
    assert two.prompt == "system: Be brief.\nuser: hi\nassistant: hello\nuser: bye?"


def test_csv_and_tsv(tmp_path):
    csv_text = ('\ufeffprompt,completion,note\n'
                '"Hello, world",greeting,x\n'
                '\n'
                '"two\nlines",multi,y\n'
                'a,b\n'  # too few fields: line 6
                'c,,z\n'  # empty completion: line 7
                'e,f,g\n')
    path = write(tmp_path, "d.csv", csv_text)
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert "2 bad lines (lines 6, 7)" in str(info.value) and "header" in str(info.value)
    examples = load_examples(path, skip_bad_lines=True)
    assert examples == [Example("Hello, world", "greeting"), Example("two\nlines", "multi"), Example("e", "f")]
    tsv = write(tmp_path, "d.tsv", "completion\tprompt\nyes\tis, it?\n")
    assert load_examples(tsv) == [Example("is, it?", "yes")]


def test_csv_without_required_columns(tmp_path):
    path = write(tmp_path, "d.csv", "input,output\na,b\n")
    with pytest.raises(DataError, match=r"missing \['prompt', 'completion'\]"):
        load_examples(path)
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(write(tmp_path, "e.csv", ""))


def test_json_array(tmp_path):
    path = write(tmp_path, "d.json", json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
                                                indent=2))
    with pytest.raises(DataError, match=r"1 bad item \(items 2\)"):
        load_examples(path)
    assert load_examples(path, skip_bad_lines=True) == [Example("a", "b")]
    lines = write(tmp_path, "e.json", jsonl({"prompt": "a", "completion": "b"}))
    assert load_examples(lines) == [Example("a", "b")]


def test_unusable_files(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl.*\.csv"):
        load_examples(write(tmp_path, "d.txt", "prompt: a"))
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(path)


def test_load_data_tasks_and_errors(tmp_path):
    assert load_data("units", "test", 5, seed=2) == task_split("units", "test", 5, seed=2)
    assert len(load_data("sort", "train")) == 1000 and len(load_data("sort", "test")) == 200
    with pytest.raises(DataError) as info:
        load_data(str(tmp_path / "nope.jsonl"))
    for name in TASKS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="split"):
        load_data("dates", "dev")


def test_load_data_file_splits(tmp_path):
    records = [{"prompt": f"q{i % 40}", "completion": f"a{i}"} for i in range(100)]  # repeated prompts
    path = write(tmp_path, "d.jsonl", jsonl(*records))
    every = load_data(str(path), "all")
    train, test = load_data(str(path), "train", seed=5), load_data(str(path), "test", seed=5)
    assert len(every) == 100 and len(train) + len(test) == 100
    assert 10 <= len(test) <= 13
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert sorted(train + test, key=every.index) == every
    assert train == load_data(str(path), "train", seed=5) and train != load_data(str(path), "train", seed=6)
    sample = load_data(str(path), "train", n=10, seed=5)
    assert len(sample) == 10 and all(e in train for e in sample) and sample != train[:10]
    assert sample == load_data(str(path), "train", n=10, seed=5)
    assert split_examples([Example("only", "one")], "test") == []


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="local JSONL/CSV file"):
        load_data("hub:someone/some-data")
    with pytest.raises(DataError, match="hub:owner/name"):
        load_data("hub:no-owner")


def test_hub_with_datasets_package(monkeypatch):
    calls = []

    def load_dataset(repo, split):
        calls.append((repo, split))
        if split == "test":
            raise ValueError("Unknown split 'test'")
        return [{"prompt": "p", "completion": f"{split}"}, {"prompt": "q", "completion": 3}]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"hub:o/n \(split 'validation'\): 1 bad row \(rows 2\)"):
        load_data("hub:o/n", "test")
    assert calls == [("o/n", "test"), ("o/n", "validation")]
    assert load_data("hub:o/n", "test", skip_bad_lines=True) == [Example("p", "validation")]

    def offline(repo, split):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match="unreachable.*local JSONL/CSV"):
        load_data("hub:o/n", "train")


# ---------------------------------------------------------------- tokenization


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    """A character-level tokenizer with a ChatML template and a BOS post-processor; no model files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(string.printable)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture
def plain_tokenizer(tokenizer):
    tokenizer.chat_template = None
    yield tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE


def test_render_prompt(tokenizer):
    ex = Example("What is 2 + 2?", "4")
    assert render_prompt(tokenizer, ex) == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tokenizer, ex, use_chat_template=False) == "What is 2 + 2?\n"
    chat = Example("user: a\nassistant: b\nuser: c", "d", messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])
    assert render_prompt(tokenizer, chat) == ("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
                                              "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(tokenizer, chat, use_chat_template=False) == "user: a\nassistant: b\nuser: c\n"


def test_render_prompt_without_template(plain_tokenizer):
    assert render_prompt(plain_tokenizer, Example("hi", "x")) == "hi\n"


def test_encode_with_template(tokenizer):
    ex = Example("Sort: b a", "a b")
    enc = encode(tokenizer, ex, max_length=64)
    prompt_text = render_prompt(tokenizer, ex)
    assert tokenizer.decode(enc.input_ids[:enc.prompt_len]) == prompt_text
    assert enc.input_ids[0] != tokenizer.bos_token_id, "a rendered template gets no extra special tokens"
    completion = enc.input_ids[enc.prompt_len:]
    assert completion[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(completion[:-1]) == "a b"
    assert enc.prompt_len == len(prompt_text) - len("<|im_start|>") * 2 - len("<|im_end|>") + 3


def test_encode_without_template(plain_tokenizer):
    enc = encode(plain_tokenizer, Example("hi", "yo"), max_length=64)
    assert enc.input_ids[0] == plain_tokenizer.bos_token_id
    assert plain_tokenizer.decode(enc.input_ids) == "<s>hi\nyo<|im_end|>"
    assert enc.prompt_len == 4


def test_encode_length_limit_and_truncation(tokenizer):
    ex = Example("x" * 50, "answer")
    full = encode(tokenizer, ex, max_length=1000)
    total = len(full.input_ids)
    assert encode(tokenizer, ex, max_length=total) == full
    with pytest.raises(DataError) as info:
        encode(tokenizer, ex, max_length=total - 1)
    message = str(info.value)
    assert f"{total} tokens long" in message and f"max_length={total - 1}" in message
    assert "--max-length" in message and "shorter data" in message
    cut = encode(tokenizer, ex, max_length=20, truncate=True)
    assert len(cut.input_ids) == 20
    assert cut.input_ids[cut.prompt_len:] == full.input_ids[full.prompt_len:], "completion kept whole"
    assert cut.input_ids[:cut.prompt_len] == full.input_ids[full.prompt_len - cut.prompt_len:full.prompt_len]
    tiny = encode(tokenizer, Example("q", "a long answer"), max_length=5, truncate=True)
    assert tiny.prompt_len == 1 and len(tiny.input_ids) == 5
    assert tokenizer.decode(tiny.input_ids[1:]) == "a lo"


def test_encode_all_names_the_long_examples(tokenizer):
    examples = [Example("short", "a"), Example("x" * 80, "b"), Example("ok", "c"), Example("y" * 90, "d")]
    with pytest.raises(DataError, match=r"2 of 4 examples exceed max_length=60 \(indices 1, 3\); example 1:"):
        encode_all(tokenizer, examples, max_length=60)
    assert len(encode_all(tokenizer, examples, max_length=60, truncate=True)) == 4


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), max_size=700), batch_size=st.integers(1, 9),
       seed=st.integers(0, 5), epoch=st.integers(0, 3))
def test_bucketing_covers_each_index_once(lengths, batch_size, seed, epoch):
    batches = length_bucketed_batches(lengths, batch_size, seed, epoch)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert sum(len(b) < batch_size for b in batches) <= 1 and all(b for b in batches)
    assert batches == length_bucketed_batches(lengths, batch_size, seed, epoch)


def test_bucketing_groups_lengths_and_reshuffles():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(4000)]
    batches = length_bucketed_batches(lengths, 8, seed=0, epoch=0)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches) - sum(lengths)
    naive = [list(range(i, min(i + 8, 4000))) for i in range(0, 4000, 8)]
    naive_padded = sum(max(lengths[i] for i in b) * len(b) for b in naive) - sum(lengths)
    assert padded < naive_padded / 10
    assert batches != length_bucketed_batches(lengths, 8, seed=0, epoch=1)
    assert batches != length_bucketed_batches(lengths, 8, seed=1, epoch=0)
    firsts = [b[0] for b in batches[:20]]
    assert firsts != sorted(firsts, key=lengths.__getitem__), "batch order is shuffled, not by length"
    with pytest.raises(ValueError):
        length_bucketed_batches(lengths, 0, 0, 0)


def test_collate_pads_right_and_masks_labels():
    batch = [Encoded([5, 6, 7, 8, 9], prompt_len=3), Encoded([1, 2, 3], prompt_len=1)]
    out = collate(batch, pad_id=0)
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX] * 3 + [8, 9], [IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError):
        collate([], pad_id=0)


def test_collate_of_encoded_task_data(tokenizer):
    examples = task_split("dates", "train", 6, seed=0)
    out = collate([encode(tokenizer, e, max_length=256) for e in examples], tokenizer.pad_token_id)
    for row, ex in enumerate(examples):
        supervised = out["labels"][row][out["labels"][row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(supervised) == ex.completion + tokenizer.eos_token
        assert out["attention_mask"][row].sum() == len(encode(tokenizer, ex, max_length=256).input_ids)
