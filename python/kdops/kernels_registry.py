"""Triton ops, imported lazily: kdops.kernels needs triton, which is an optional dependency."""

from __future__ import annotations

import functools


@functools.cache
def triton_ops() -> dict:
    """Map op name -> the torch.library triton_op that runs it (empty without triton)."""
    try:
        from .kernels import TRITON_OPS
    except ImportError:
        return {}
    return TRITON_OPS
