"""Triton kernels of kdops, shipped as kdops.kernels (importing this needs triton).

TRITON_OPS maps a kdops op name to the torch.library triton_op that runs it on CUDA tensors.
"""

from .adaspec import adaspec_token_kl_triton
from .coactivation import coactivation_features_backward_triton, coactivation_features_triton
from .divergence import kd_loss_triton
from .relation import relation_kd_loss_backward_triton, relation_kd_loss_triton
from .selection import select_top_fraction_triton
from .sequence import sequence_logprob_triton
from .topk import topk_kd_loss_triton

TRITON_OPS: dict = {
    "adaspec_token_kl": adaspec_token_kl_triton,
    "coactivation_features": coactivation_features_triton,
    "coactivation_features_backward": coactivation_features_backward_triton,
    "kd_loss": kd_loss_triton,
    "relation_kd_loss": relation_kd_loss_triton,
    "relation_kd_loss_backward": relation_kd_loss_backward_triton,
    "select_top_fraction": select_top_fraction_triton,
    "sequence_logprob": sequence_logprob_triton,
    "topk_kd_loss": topk_kd_loss_triton,
}
