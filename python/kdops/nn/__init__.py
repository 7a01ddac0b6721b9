"""Loss modules over the kdops ops."""

from .divergence import KDLoss
from .fused_linear import FusedLinearKDLoss
from .topk import TopKKDLoss

__all__ = ["FusedLinearKDLoss", "KDLoss", "TopKKDLoss"]
