"""The methods page: one row per registered method with the registry's facts and the cached results."""

from __future__ import annotations

import json

import pytest

from loraplex.cli.main import main as cli
from loraplex.methods import available
from loraplex.tools import methods_doc


def test_page_has_every_method_with_its_facts_and_results(tmp_path):
    results = {"vera": {"exact_match": 12.0, "final_loss": 0.5, "trainable_parameters": 1234},
               "conv-lora": {"error": "ValueError: not a square | grid"}}
    (tmp_path / "methods.json").write_text(json.dumps(results))
    assert methods_doc.main(["--output", str(tmp_path / "methods.md")]) == 0
    page = (tmp_path / "methods.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines() if line.startswith("| `")}
    assert set(rows) == set(available())
    assert "| 1,234 |" in rows["vera"] and "| 12.0 | 0.500 |" in rows["vera"] and "plain low-rank" in rows["vera"]
    assert "does not run: ValueError: not a square / grid" in rows["conv-lora"]    # table-safe
    assert "| no |" in rows["conv-lora"] and "merged only" in rows["fourierft"]
    assert "low-rank after conversion" in rows["pissa"] and "Meng, Wang, Zhang 2024" in rows["pissa"]
    assert "not measured" in rows["lora"] and "Not measured yet:" in page
    assert methods_doc.standard_command("vera") in page.replace("NAME", "vera")


def test_cli_methods_markdown_and_bad_names(tmp_path, capsys):
    assert cli(["methods", "--markdown", str(tmp_path / "m.md")]) == 0
    assert (tmp_path / "m.md").read_text().startswith("# Adapter methods")
    with pytest.raises(SystemExit, match="unknown method"):
        methods_doc.main(["--output", str(tmp_path / "x.md"), "--measure", "nope"])
