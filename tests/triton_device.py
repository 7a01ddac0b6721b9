"""Where the Triton test modules run: the CPU under TRITON_INTERPRET=1 (CI), else a CUDA device.

Each test_*_triton.py calls ``triton_device_or_skip()`` at import, before it imports kdops'
kernels: the module is skipped cleanly without triton, or without both a GPU and the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_device_or_skip() -> str:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        pytest.skip("triton is not installed: the Triton backend is not available", allow_module_level=True)
    if INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip(
        "the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 (set before triton is "
        "imported) to run them on the CPU",
        allow_module_level=True,
    )
