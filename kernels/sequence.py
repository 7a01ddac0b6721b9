"""Triton kernel of sequence_logprob (DESIGN.md 3.8): the op ``kdops::sequence_logprob_triton``.

Same schema and outputs as the C++ op ``kdops::sequence_logprob`` (csrc/registration.cpp,
csrc/sequence/sequence.h): per row, z the logits and y the label,

    token_logprob = (z_y - max z) - log sum_j exp(z_j - max z)
    grad_logits_j = [j == y] - exp((z_j - max z) - log sum)          (with grad=True)

One program per row; arithmetic in float32, offsets in int64 (N * V > 2^31 works).

* Sweep 1: online max / sum of exp(z - max) over BLOCK_V tiles, each tile loaded before the
  arithmetic on the previous one. The label's logit is one scalar load issued first.
* Sweep 2 (grad=True): -softmax for every logit and 1 - p at the label, tiles in reverse order:
  the tiles sweep 1 read last are re-read first, while they are most likely still in L2.

Bytes per row, e the logit size: V e read (forward), plus V e re-read (mostly from L2) and V e
written with the gradient. A row whose label is ignore_index reads nothing: 0 and a zero gradient
row. A label outside [0, V) is never dereferenced: the row's outputs are NaN.

Float64 logits are not supported by the Triton backend (use the cpu or cuda backend).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .divergence import _shape_only
from .topk import _fill, _online_logsumexp

# Launch shape (see _launch_config). Module-level so that tests can force several vocabulary
# tiles on small problems (they monkeypatch MAX_BLOCK_V).
MAX_BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _sequence_logprob_kernel(
    z_ptr, z_stride, labels_ptr, ignore_index, out_ptr, g_ptr, V,
    GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    g_row = g_ptr + row * V
    cols = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(out_ptr + row, 0.0)
        if GRAD:
            _fill(g_row, V, 0.0, BLOCK_V)
    else:
        in_range = (label >= 0) & (label < V)
        z_label = tl.load(z_row + label, mask=in_range, other=float("nan")).to(tl.float32)

        # sweep 1: online max and sum of exp(z - max)
        run_max = tl.full([], NEG_INF, tl.float32)
        run_sum = tl.zeros([], tl.float32)
        z_next = tl.load(z_row + cols, mask=cols < V, other=NEG_INF)
        for start in range(0, V, BLOCK_V):
            z = z_next.to(tl.float32)
            next_cols = start + BLOCK_V + cols
            z_next = tl.load(z_row + next_cols, mask=next_cols < V, other=NEG_INF)
            run_max, run_sum, _ = _online_logsumexp(z, run_max, run_sum, 0.0, False)
        # an all -inf row: log_sum = -inf and everything below is NaN, as log_softmax gives
        row_max = tl.where(run_max == NEG_INF, 0.0, run_max)
        log_sum = tl.log(run_sum)
        logprob = (z_label - row_max) - log_sum  # NaN for a label outside [0, V)
        tl.store(out_ptr + row, logprob)

        if GRAD:
            # sweep 2, tiles in reverse order (see the docstring); a bad label's row is all NaN
            row_nan = tl.where(in_range, 0.0, float("nan"))
            n_tiles = tl.cdiv(V, BLOCK_V)
            last = (n_tiles - 1) * BLOCK_V
            z_next = tl.load(z_row + last + cols, mask=last + cols < V, other=NEG_INF)
            for i in range(0, n_tiles):
                start = last - i * BLOCK_V
                z = z_next.to(tl.float32)
                next_cols = start - BLOCK_V + cols
                z_next = tl.load(z_row + next_cols, mask=next_cols >= 0, other=NEG_INF)
                p = tl.exp((z - row_max) - log_sum)
                g = tl.where(start + cols == label, 1.0 - p, -p) + row_nan
                tl.store(g_row + start + cols, g.to(g_ptr.dtype.element_ty), mask=start + cols < V)


def _launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps); depends on V only, so torch.compile with dynamic shapes guards on V."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(int(vocab)))
    num_warps = max(1, min(NUM_WARPS, block_v // 256))  # at least 8 logits per thread
    return block_v, num_warps


def _check_args(logits: torch.Tensor, labels: torch.Tensor) -> None:
    # The checks of csrc/sequence/sequence_op.cpp, in the same order, before any launch.
    if logits.dim() != 2:
        raise ValueError(f"sequence_logprob: logits must be 2-D [rows, vocab]; got {logits.dim()} dims")
    if logits.dtype == torch.float64:
        raise ValueError(
            "sequence_logprob: the triton backend does not support float64 logits (float32, "
            "bfloat16 or float16 only); use the cpu or cuda backend for float64"
        )
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"sequence_logprob: logits must be float32, bfloat16 or float16 on the triton backend; "
            f"got {logits.dtype}"
        )
    rows, vocab = logits.shape
    if vocab <= 0:
        raise ValueError("sequence_logprob: vocab (last dim) must be at least 1")
    if logits.stride(1) != 1:
        raise ValueError("sequence_logprob: the logits' last dim must be contiguous")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"sequence_logprob: labels must have shape [{rows}]; got {list(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"sequence_logprob: labels must be int64 or int32; got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"sequence_logprob: labels is on {labels.device} but logits is on {logits.device}")


@triton_op("kdops::sequence_logprob_triton", mutates_args=())
def sequence_logprob_triton(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logprob on Triton: the schema and outputs of ``kdops::sequence_logprob`` (see the
    module docstring). Returns (token_logprob [N] float32, grad_logits [N, V] in the logits' dtype,
    or a fresh empty [0] tensor when grad is False)."""
    _check_args(logits, labels)
    rows, vocab = logits.shape
    device = logits.device
    token = torch.empty((rows,), dtype=torch.float32, device=device)
    grad_logits = torch.empty((rows, vocab) if grad else (0,), dtype=logits.dtype, device=device)
    if rows > 0 and not _shape_only(logits):
        block_v, num_warps = _launch_config(vocab)
        wrap_triton(_sequence_logprob_kernel)[(rows,)](
            logits, logits.stride(0), labels.contiguous(), ignore_index, token, grad_logits, vocab,
            GRAD=bool(grad), BLOCK_V=block_v, num_warps=num_warps,
        )
    return token, grad_logits
