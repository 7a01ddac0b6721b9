"""Published knowledge-distillation methods built on the kdops ops (see METHODS.md): each cites its
paper, states which released code it matches and lists every difference from it."""

from .adaspec import AdaSPEC
from .infigfusion import InfiGFusion
from .miniplm import DifferenceSampler, difference_scores

__all__ = ["AdaSPEC", "InfiGFusion", "DifferenceSampler", "difference_scores"]
