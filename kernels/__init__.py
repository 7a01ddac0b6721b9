"""Triton kernels of kdops, shipped as kdops.kernels (importing this needs triton).

TRITON_OPS maps a kdops op name to the torch.library triton_op that runs it on CUDA tensors.
"""

from .divergence import kd_loss_triton
from .topk import topk_kd_loss_triton

TRITON_OPS: dict = {"kd_loss": kd_loss_triton, "topk_kd_loss": topk_kd_loss_triton}
