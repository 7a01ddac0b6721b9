"""Loss modules over the kdops ops."""

from .divergence import KDLoss

__all__ = ["KDLoss"]
