"""Backend choice: which implementation of an op runs.

Backends: "cpu" (C++), "cuda" (CUDA C++), "triton", "reference" (float64 PyTorch). By default the
tensor's device picks: CPU tensors run the C++ kernels, CUDA tensors the faster of "cuda" and
"triton" for that op and kind of call (measured on an H200, see ``CUDA_DEFAULTS``).
``use_backend(name)`` (a context manager) or the ``KDOPS_BACKEND`` environment variable forces one;
a forced backend that is not built or cannot run on the tensor's device raises a RuntimeError
that says why.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")

# The default backend for CUDA tensors, per op and per kind of call (a gradient wanted or not): the
# faster one in bench/results/h200 (divergence_cuda_headline_run3.md, 8192 x 128256 bf16). kd_loss
# with a gradient: CUDA C++ (fkl 3.20 ms, jsd 7.30) over Triton (3.57, 7.70); loss only: Triton
# (fkl 1.92 ms, jsd 4.17) over CUDA C++ (2.69, 4.38).
CUDA_DEFAULTS: dict[str, dict[bool, str]] = {"kd_loss": {True: "cuda", False: "triton"}}

_local = threading.local()


def _forced_stack() -> list[str]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kdops backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every kdops op inside the block onto one backend (thread-local, nestable)."""
    stack = _forced_stack()
    stack.append(_check_name(name))
    try:
        yield
    finally:
        stack.pop()


def forced_backend() -> str | None:
    """The backend forced by use_backend or KDOPS_BACKEND, or None."""
    stack = _forced_stack()
    if stack:
        return stack[-1]
    env = os.environ.get("KDOPS_BACKEND")
    return _check_name(env) if env else None


@torch.compiler.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the compiled library registered `kdops::<op>` for a dispatch key (CPU, CUDA)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"kdops::{op}", dispatch_key)


@torch.compiler.assume_constant_result
@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends(op: str, device: torch.device, needs_grad: bool = True) -> list[str]:
    """Backends that can run `op` on tensors of `device`, the default first."""
    found = []
    if device.type == "cpu" and has_kernel(op, "CPU"):
        found.append("cpu")
    if device.type == "cuda" and has_kernel(op, "CUDA"):
        found.append("cuda")
    if triton_available() and (device.type == "cuda" or triton_interpreting()) and has_triton_op(op):
        found.append("triton")
    if device.type == "cuda":
        preferred = CUDA_DEFAULTS.get(op, {}).get(needs_grad)
        if preferred in found:
            found.remove(preferred)
            found.insert(0, preferred)
    found.append("reference")
    return found


@torch.compiler.assume_constant_result
def has_triton_op(op: str) -> bool:
    from . import kernels_registry

    return op in kernels_registry.triton_ops()


def _why_unavailable(name: str, op: str, device: torch.device) -> str:
    if name == "cpu":
        return f"the cpu backend runs CPU tensors; got a {device.type} tensor"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors; got a {device.type} tensor"
        return "kdops was built without CUDA kernels (its torch had no CUDA at build time)"
    if not triton_available():
        return "triton is not installed"
    if device.type != "cuda" and not triton_interpreting():
        return "Triton kernels run CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
    return f"no Triton kernel is registered for {op}"


def select(op: str, device: torch.device, needs_grad: bool = True) -> str:
    """The backend that runs `op` for tensors on `device` (needs_grad: a gradient is wanted)."""
    candidates = available_backends(op, device, needs_grad)
    forced = forced_backend()
    if forced is None:
        return candidates[0]
    if forced not in candidates:
        raise RuntimeError(
            f"kdops backend {forced!r} is not available for {op}: "
            f"{_why_unavailable(forced, op, device)}"
        )
    return forced
