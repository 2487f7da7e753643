"""User data: JSONL / CSV files with prompt-completion pairs or chat messages, and the Hub.

Accepted records:
  * `{"prompt": "...", "completion": "..."}` (JSONL, a JSON array, or CSV/TSV columns), or
  * `{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}`
    (JSONL / JSON array); the last message must be the assistant's and becomes the completion.
Malformed records raise `DataError` naming the file, the line numbers and what is allowed, unless
`skip_bad_lines=True`, which skips them with a logged warning.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loraplex.data.tasks import TASKS, Example, _derived_seed, task_split

logger = logging.getLogger(__name__)

JSONL_EXTENSIONS = (".jsonl", ".ndjson")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
SUPPORTED_EXTENSIONS = (*JSONL_EXTENSIONS, ".json", *CSV_DELIMITERS)
ROLES = ("system", "user", "assistant")
DEFAULT_TASK_SIZES = {"train": 1000, "test": 200}
TEST_FRACTION = 0.1

RECORD_HELP = ('Each record must be a JSON object with a string "prompt" and a non-empty string '
               '"completion", or with a "messages" list of {"role": "system"|"user"|"assistant", '
               '"content": "..."} objects that includes a user message and ends with the '
               "assistant's (non-empty) answer.")
CSV_HELP = ('A CSV/TSV file needs a header row with "prompt" and "completion" columns, and every row '
            "needs a non-empty completion.")
MAX_REASONS_SHOWN = 5
MAX_NUMBERS_SHOWN = 20


class DataError(ValueError):
    """Training or evaluation data is missing or malformed; the message says where and what is allowed."""


class _BadRecord(Exception):
    """One record is malformed; the message is the reason."""


# --- records ---
def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def _check_string(record: dict, key: str, non_empty: bool) -> str:
    if key not in record:
        raise _BadRecord(f'missing "{key}"')
    value = record[key]
    if not isinstance(value, str):
        raise _BadRecord(f'"{key}" must be a string, got {_type_name(value)}')
    if non_empty and not value.strip():
        raise _BadRecord(f'"{key}" is empty')
    return value


def _from_messages(messages: Any) -> Example:
    if not isinstance(messages, list) or not messages:
        raise _BadRecord('"messages" must be a non-empty list')
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRecord(f"message {i} must be an object, got {_type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise _BadRecord(f"message {i} has role {role!r}; allowed roles: {', '.join(ROLES)}")
        clean.append({"role": role, "content": _check_string(message, "content", non_empty=False)})
    if clean[-1]["role"] != "assistant":
        raise _BadRecord(f"the last message must be the assistant's, got role {clean[-1]['role']!r}")
    if not clean[-1]["content"].strip():
        raise _BadRecord("the assistant's answer (last message) is empty")
    context = clean[:-1]
    if not any(m["role"] == "user" for m in context):
        raise _BadRecord("no user message before the assistant's answer")
    if len(context) == 1:
        prompt = context[0]["content"]
    else:  # plain-text transcript, used when the tokenizer has no chat template
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in context)
    return Example(prompt=prompt, completion=clean[-1]["content"], messages=clean)


def _record_to_example(record: Any) -> Example:
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {_type_name(record)}")
    if "messages" in record:
        return _from_messages(record["messages"])
    prompt = _check_string(record, "prompt", non_empty=False)
    completion = _check_string(record, "completion", non_empty=True)
    return Example(prompt=prompt, completion=completion)


# --- readers: each yields (number, record or _BadRecord) ---
def _read_jsonl(text: str) -> Iterable[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            yield number, _BadRecord(f"invalid JSON ({e.msg} at column {e.colno})")


def _read_csv(text: str, delimiter: str, path: Path) -> Iterable[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}: cannot parse line {start} as CSV ({e}). {CSV_HELP}") from None
        if not row or not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            missing = [c for c in ("prompt", "completion") if c not in header]
            if missing:
                raise DataError(f"{path}: the header row (line {start}) has columns {header}, missing "
                                f"{missing}. {CSV_HELP}")
            continue
        if len(row) != len(header):
            yield start, _BadRecord(f"has {len(row)} fields but the header has {len(header)} "
                                    "(quote fields that contain the delimiter)")
            continue
        yield start, dict(zip(header, row))


def _read_json(text: str, path: Path) -> tuple[str, Iterable[tuple[int, Any]]]:
    """A `.json` file: a JSON array of records (numbered as items) or JSON Lines."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}). "
                            "A .json file must hold one JSON array of records, or one record per "
                            "line (JSON Lines).") from None
        return "item", enumerate(items, start=1)
    return "line", _read_jsonl(text)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _examples_from_records(records: Iterable[tuple[int, Any]], source: str, unit: str, help_text: str,
                           skip_bad_lines: bool) -> list[Example]:
    examples: list[Example] = []
    bad: list[tuple[int, str]] = []
    for number, record in records:
        try:
            if isinstance(record, _BadRecord):
                raise record
            examples.append(_record_to_example(record))
        except _BadRecord as e:
            bad.append((number, str(e)))
    if bad:
        numbers = ", ".join(str(n) for n, _ in bad[:MAX_NUMBERS_SHOWN])
        if len(bad) > MAX_NUMBERS_SHOWN:
            numbers += ", ..."
        summary = f"{source}: {_plural(len(bad), 'bad ' + unit)} ({unit}s {numbers})"
        reasons = "\n".join(f"  {unit} {n}: {why}" for n, why in bad[:MAX_REASONS_SHOWN])
        if skip_bad_lines:
            logger.warning("%s skipped; first reasons:\n%s", summary, reasons)
        else:
            raise DataError(f"{summary}:\n{reasons}\n{help_text}\nFix them, or pass skip_bad_lines=True "
                            "(the CLI's --skip-bad-lines) to skip them.")
    if not examples:
        why = f"all {_plural(len(bad), unit)} were bad and skipped" if bad else "it has no records"
        raise DataError(f"{source}: no usable examples ({why}). {help_text}")
    return examples


def load_examples(path: str | Path, skip_bad_lines: bool = False) -> list[Example]:
    """All examples of a `.jsonl`/`.ndjson`/`.json`/`.csv`/`.tsv` file, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; use one of "
                        f"{', '.join(SUPPORTED_EXTENSIONS)} with prompt/completion records or chat messages")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix in CSV_DELIMITERS:
        records = _read_csv(text, CSV_DELIMITERS[suffix], path)
        return _examples_from_records(records, str(path), "line", CSV_HELP, skip_bad_lines)
    unit, records = _read_json(text, path) if suffix == ".json" else ("line", _read_jsonl(text))
    return _examples_from_records(records, str(path), unit, RECORD_HELP, skip_bad_lines)


# --- Hugging Face Hub ---
def _load_hub(repo: str, split: str, skip_bad_lines: bool) -> list[Example]:
    source = f"hub:{repo}"
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise DataError(f"{source}: Hub datasets need the `datasets` package, which is not installed "
                        "(and the Hub may be unreachable here); pass a local JSONL/CSV file "
                        "instead") from None
    hub_splits = {"train": ["train"], "test": ["test", "validation"], "all": ["train"]}[split]
    errors = []
    for hub_split in hub_splits:
        try:
            rows = list(datasets.load_dataset(repo, split=hub_split))
        except Exception as e:  # network, auth, missing split: all mean "use a local file"
            errors.append(f"split {hub_split!r}: {type(e).__name__}: {e}")
            continue
        return _examples_from_records(enumerate(rows, start=1), f"{source} (split {hub_split!r})",
                                      "row", RECORD_HELP, skip_bad_lines)
    raise DataError(f"{source}: could not load the dataset from the Hugging Face Hub "
                    f"({'; '.join(errors)}); the Hub may be unreachable - pass a local JSONL/CSV file "
                    "instead")


# --- one entry point for tasks, files and the Hub ---
def _subsample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or n >= len(examples):
        return examples
    rng = random.Random(_derived_seed("loraplex.data.subsample", seed))
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), n))]


def split_examples(examples: list[Example], split: str, seed: int = 0,
                   test_fraction: float = TEST_FRACTION) -> list[Example]:
    """The train or test part of a user dataset, in file order, deterministic in `seed`.

    Examples with the same prompt stay on the same side, so the two parts never share a prompt. The
    test part holds about `test_fraction` of the examples (at least one prompt when there are two or
    more distinct prompts); `split="all"` returns everything.
    """
    if split == "all":
        return examples
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use train, test or all")
    prompts = list(dict.fromkeys(_prompt_key(e) for e in examples))
    random.Random(_derived_seed("loraplex.data.split", seed)).shuffle(prompts)
    counts: dict[str, int] = {}
    for e in examples:
        counts[_prompt_key(e)] = counts.get(_prompt_key(e), 0) + 1
    target = max(1, round(test_fraction * len(examples))) if len(prompts) > 1 else 0
    test_prompts: set[str] = set()
    held = 0
    for p in prompts:
        if held >= target:
            break
        test_prompts.add(p)
        held += counts[p]
    want_test = split == "test"
    return [e for e in examples if (_prompt_key(e) in test_prompts) == want_test]


def _prompt_key(example: Example) -> str:
    if example.messages is None:
        return example.prompt
    return json.dumps(example.messages[:-1], sort_keys=True)


def load_data(spec: str, split: str = "train", n: int | None = None, seed: int = 0,
              skip_bad_lines: bool = False) -> list[Example]:
    """Examples from a built-in task name, a local data file, or `hub:owner/name`.

    Tasks: `task_split(spec, split, n, seed)`, with n defaulting to 1000 (train) / 200 (test).
    Files and Hub data: the deterministic train/test parts of `split_examples` (or everything with
    `split="all"`), then a seeded subsample of `n` examples if `n` is given.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}; use train, test or all")
    if spec in TASKS:
        if split == "all":
            raise ValueError("split='all' is only for data files; built-in tasks have train and test")
        return task_split(spec, split, DEFAULT_TASK_SIZES[split] if n is None else n, seed)
    if spec.startswith("hub:"):
        repo = spec[len("hub:"):]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise DataError(f"{spec!r}: Hub datasets are written hub:owner/name")
        return _subsample(_load_hub(repo, split, skip_bad_lines), n, seed)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec!r} is neither a built-in task ({', '.join(TASKS)}) nor an existing file "
                        f"({', '.join(SUPPORTED_EXTENSIONS)}); Hub datasets are written hub:owner/name")
    examples = load_examples(path, skip_bad_lines=skip_bad_lines)
    return _subsample(split_examples(examples, split, seed), n, seed)
