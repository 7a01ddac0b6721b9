"""kdops: fused knowledge-distillation loss kernels for PyTorch.

Importing kdops loads the compiled operators (torch.ops.kdops.*) and registers their fake kernels
and autograd formulas.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.kdops)
from . import nn, reference
from ._backend import BACKENDS, available_backends, use_backend
from .adaspec import adaspec_loss
from .coactivation import coactivation_features, coactivation_graph
from .divergence import kd_loss
from .fused_linear import fused_linear_kd_loss
from .gw import gw_1d, sliced_gw, sorted_gw
from .relation import relation_kd_loss, token_relation
from .selection import select_top_fraction
from .sequence import sequence_logprob
from .topk import topk_kd_loss

from . import methods  # noqa: E402  (built on the ops above)

__all__ = [
    "BACKENDS", "adaspec_loss", "available_backends", "coactivation_features", "coactivation_graph",
    "fused_linear_kd_loss", "gw_1d", "kd_loss", "methods", "nn", "reference", "relation_kd_loss",
    "select_top_fraction", "sequence_logprob", "sliced_gw", "sorted_gw", "token_relation", "topk_kd_loss",
    "use_backend",
]
__version__ = "0.1.0"
