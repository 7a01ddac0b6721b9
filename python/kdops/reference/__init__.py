"""Float64 pure-PyTorch oracles for the kdops ops.

These are the reference implementations the kernels are tested against: short, readable and
computed in float64 with plain autograd-differentiable PyTorch. They are also usable as the
``"reference"`` backend; they are not meant to be fast.
"""

from .divergence import DIVERGENCES, REDUCTIONS, kd_loss
from .fused_linear import fused_linear_kd_loss
from .topk import topk_kd_loss

__all__ = ["DIVERGENCES", "REDUCTIONS", "fused_linear_kd_loss", "kd_loss", "topk_kd_loss"]
