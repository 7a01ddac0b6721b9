"""Argument checks and row views shared by every op wrapper (DESIGN.md section 2).

Every check runs before any kernel and raises ValueError naming the argument.
"""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic (and loss) dtype for logits of `dtype`: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_unit_interval(name: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")


def check_logits(name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, bfloat16 or float16; got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1; got {tuple(logits.shape)}")


def check_pair(student: torch.Tensor, teacher: torch.Tensor, teacher_name: str) -> None:
    """The teacher must match the student in shape, dtype and device."""
    if teacher.shape != student.shape:
        raise ValueError(
            f"{teacher_name} must have the student's shape {tuple(student.shape)}; "
            f"got {tuple(teacher.shape)}"
        )
    if teacher.dtype != student.dtype:
        raise ValueError(f"{teacher_name} dtype {teacher.dtype} differs from the student's {student.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"{teacher_name} is on {teacher.device} but the student is on {student.device}")


def rows_view(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] as [N, V] rows. Row strides are kept; a non-contiguous last dim is copied once."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def valid_rows(
    lead_shape: torch.Size,
    device: torch.device,
    labels: torch.Tensor | None,
    ignore_index: int,
    mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Bool [N] of the rows that count (labels != ignore_index AND mask), or None for all rows."""
    valid = None
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != lead_shape:
            raise ValueError(
                f"labels must be a tensor of the logits' leading shape {tuple(lead_shape)}; "
                f"got {tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
        if labels.device != device:
            raise ValueError(f"labels is on {labels.device} but the logits are on {device}")
        valid = labels.reshape(-1) != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != lead_shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of the logits' leading shape {tuple(lead_shape)}; "
                f"got {getattr(mask, 'dtype', type(mask).__name__)} "
                f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else ''}"
            )
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but the logits are on {device}")
        valid = mask.reshape(-1) if valid is None else valid & mask.reshape(-1)
    return valid


def check_positive_tensor(name: str, value: torch.Tensor) -> None:
    """All entries > 0 (NaN fails). CUDA tensors are checked on the device, without a host sync."""
    if value.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async((value > 0).all(), f"{name} must be > 0")
    elif not bool((value > 0).all()):
        raise ValueError(f"{name} must be > 0 everywhere; got min {value.min().item()}")


def row_temperature(
    temperature: float | torch.Tensor,
    lead_shape: torch.Size,
    rows: int,
    acc: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """temperature as the op takes it: 0-d or [N] in the accumulate dtype.

    A Python float becomes a 0-d CPU tensor (no device copy here; the op moves it once).
    """
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() == 0:
            tau = temperature
        elif temperature.shape == lead_shape or temperature.shape == (rows,):
            tau = temperature.reshape(rows)
        else:
            raise ValueError(
                f"temperature must be a float, a 0-d tensor, or a tensor of shape {tuple(lead_shape)} "
                f"or [{rows}]; got shape {tuple(temperature.shape)}"
            )
        if not tau.dtype.is_floating_point:
            raise ValueError(f"temperature must be a floating-point tensor; got {tau.dtype}")
        if tau.device != device and tau.dim() != 0:
            raise ValueError(f"temperature is on {tau.device} but the logits are on {device}")
        check_positive_tensor("temperature", tau)
        return tau.to(device=device if tau.dim() else tau.device, dtype=acc)
    if not isinstance(temperature, numbers.Real) or not float(temperature) > 0.0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    return torch.tensor(float(temperature), dtype=acc)


def normalizer_tensor(normalizer: float | torch.Tensor | None) -> torch.Tensor | None:
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 0-d tensor; got shape {tuple(normalizer.shape)}")
        return normalizer.reshape(())
    if not isinstance(normalizer, numbers.Real) or not float(normalizer) > 0.0:
        raise ValueError(f"normalizer must be a number > 0 or a 0-d tensor; got {normalizer!r}")
    return torch.tensor(float(normalizer))
