"""Float64 pure-PyTorch oracles for the kdops ops.

These are the reference implementations the kernels are tested against: short, readable and
computed in float64 with plain autograd-differentiable PyTorch. They are also usable as the
``"reference"`` backend; they are not meant to be fast.
"""

from .adaspec import adaspec_loss, adaspec_token_kl
from .coactivation import coactivation_features, coactivation_graph
from .divergence import DIVERGENCES, REDUCTIONS, kd_loss
from .fused_linear import fused_linear_kd_loss
from .gw import gw_1d, sliced_gw, sorted_gw
from .relation import relation_kd_loss, token_relation  # binds the module too (relation_row_loss)
from .selection import select_top_fraction
from .sequence import sequence_logprob
from .topk import topk_kd_loss

__all__ = [
    "DIVERGENCES", "REDUCTIONS", "adaspec_loss", "adaspec_token_kl", "coactivation_features",
    "coactivation_graph", "fused_linear_kd_loss", "gw_1d", "kd_loss", "relation", "relation_kd_loss",
    "select_top_fraction", "sequence_logprob", "sliced_gw", "sorted_gw", "token_relation", "topk_kd_loss",
]
