"""b-only (Zhu et al. 2024, asymmetry of the LoRA factors): A random, orthonormal rows, frozen; B trains."""

from __future__ import annotations

import pytest
import torch
from recipe_opt_util import initial_adapter, run, saved_adapter

from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.b_only import haar_orthonormal_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def test_haar_rows_are_orthonormal_and_random():
    g = torch.Generator().manual_seed(0)
    a = haar_orthonormal_rows(4, 32, g)
    torch.testing.assert_close(a @ a.t(), torch.eye(4, dtype=a.dtype), rtol=0, atol=1e-12)
    b = haar_orthonormal_rows(4, 32, g)
    assert not torch.allclose(a, b)
    # Haar: E[A_ij²] = 1/d for every entry; check the mean over many draws
    draws = torch.stack([haar_orthonormal_rows(2, 8, g) for _ in range(1500)])
    torch.testing.assert_close(draws.pow(2).mean(0), torch.full((2, 8), 1 / 8, dtype=draws.dtype), rtol=0, atol=0.02)
    with pytest.raises(ValueError, match="r <= d_in"):
        haar_orthonormal_rows(8, 4, g)


def test_random_frozen_a_and_trained_b(tmp_path):
    start = initial_adapter(tmp_path, recipe="b-only")
    run(tmp_path, recipe="b-only", lr=5e-2)
    end = saved_adapter(tmp_path)
    a_keys = [k for k in end if "lora_A" in k]
    for k in a_keys:
        assert torch.equal(start[k], end[k]), k                       # frozen
        a = end[k].double()
        torch.testing.assert_close(a @ a.t(), torch.eye(a.shape[0], dtype=a.dtype), rtol=0, atol=1e-5)  # random orthogonal
    assert any(not torch.equal(start[k], end[k]) for k in end if "lora_B" in k)


def test_keep_uses_the_adapter_init_and_bad_option(tmp_path):
    start = initial_adapter(tmp_path, recipe="b-only", recipe_options={"a_init": "keep"})
    plain = initial_adapter(tmp_path / "p")
    for k in (k for k in plain if "lora_A" in k):
        torch.testing.assert_close(start[k], plain[k], rtol=0, atol=1e-20)  # Kaiming init, not redrawn
    with pytest.raises(ValueError, match="a_init must be one of orthogonal, keep"):
        make_recipe("b-only", {"a_init": "zeros"})
