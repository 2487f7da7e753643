# The two commands of the README: `make train` (main job) and `make test` (the test suite).
.PHONY: setup train test lint

setup:
	bash scripts/setup.sh

train: setup
	.venv/bin/loraplex train

test: setup
	.venv/bin/python -m pytest tests

lint: setup
	.venv/bin/ruff check .
