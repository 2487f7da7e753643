"""The optional Triton kernel of the serving path (segmented shrink/expand, `serving/triton_kernels.py`).

The checks live in `triton_check.py` and run in a fresh process: on CPU under Triton's interpreter
(TRITON_INTERPRET=1 must be set before Triton is imported), on CUDA compiled, where a GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECK = Path(__file__).with_name("triton_check.py")


def run_check(device: str, **env: str) -> None:
    result = subprocess.run([sys.executable, str(CHECK), "--device", device], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


@pytest.mark.slow
def test_kernel_layer_and_engine_match_the_pytorch_path_under_the_interpreter():
    run_check("cpu", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the interpreter test covers CPU)")
def test_kernel_layer_and_engine_match_the_pytorch_path_on_cuda():
    run_check("cuda")
