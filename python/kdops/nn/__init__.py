"""Loss modules over the kdops ops."""

from .divergence import KDLoss
from .fused_linear import FusedLinearKDLoss

__all__ = ["FusedLinearKDLoss", "KDLoss"]
