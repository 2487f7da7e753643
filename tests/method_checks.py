"""Checks shared by the method tests."""

from __future__ import annotations

import torch


def assert_rows_match_alone(model, x, ids, mixed, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Row i of a mixed-batch output `mixed` equals row i run alone with adapter ids[i] (None: bare base)."""
    for i, name in enumerate(ids):
        if name is None:
            with model.disabled():
                row = model(x[i:i + 1])
        else:
            model.set_active(name)
            row = model(x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], row, rtol=rtol, atol=atol, msg=f"row {i}")
