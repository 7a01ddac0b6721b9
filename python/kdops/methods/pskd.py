"""PS-KD: progressive self-knowledge distillation.

Kim, Ji, Yoon, Hwang. "Self-Knowledge Distillation with Progressive Refinement of Targets".
ICCV 2021 (arXiv:2006.12000). Matches the released code (github.com/lgcnsai/PS-KD-Pytorch:
``main.py`` ``train``, ``loss/pskd_loss.py``).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .hinton import check_class_logits, check_number, labeled_rows, soft_cross_entropy


class PSKD(nn.Module):
    r"""Progressive self-knowledge distillation: the model is its own teacher from the last epoch.

    At (0-based) epoch e of E, each sample x is trained with the soft cross-entropy against::

        target(x) = (1 - a_e) onehot(y) + a_e P_prev[x],    a_e = alpha_T (e + 1) / E

    where P_prev[x] is the model's own softmax prediction for x recorded the last time x was
    trained on (the previous epoch, as each sample is seen once per epoch). The predictions live
    in a per-sample table, ``self.predictions`` ``[num_samples, C]`` (a buffer: it follows the
    module's device and is saved in its state dict, as the code saves it in checkpoints; keep the
    module on the CPU and the table stays there, as in the code, while the logits may be on a GPU).

    ``forward(logits [N, C], labels [N], indices [N], *, epoch)`` returns the 0-d loss and then
    records softmax(logits), detached, at ``indices``: the targets of this call use the table as
    it was before it. At epoch 0 the targets are the one-hot labels (the code writes one-hot rows
    into the table first); every sample should be seen in epoch 0 (the table starts at zero, as
    in the code). Call ``forward`` once per optimizer step on each batch (an extra call records
    predictions too; use ``soft_targets`` and ``loss`` for anything else, e.g. evaluation).

    The loss is mean_rows -sum_k target_k log softmax(z)_k, as ``Custom_CrossEntropy_PSKD``:
    one fused :func:`kdops.kd_loss` against log(target) plus the target entropy (see
    :func:`~kdops.methods.hinton.soft_cross_entropy`). There is no separate CE term.

    Differences from the code: none in the loss or the table semantics. Distributed training
    (the code all-gathers predictions and indices before writing the table) is the caller's:
    gather the logits and indices of all ranks and call ``record``.

    Args:
        num_samples: size of the training set (indices lie in [0, num_samples)).
        num_classes: C.
        total_epochs: E, the number of training epochs (the code's ``end_epoch``).
        alpha_T: the final weight of the model's own predictions (0 <= alpha_T <= 1).
    """

    def __init__(self, num_samples: int, num_classes: int, *, total_epochs: int, alpha_T: float = 0.8):
        super().__init__()
        for name, value in (("num_samples", num_samples), ("num_classes", num_classes),
                            ("total_epochs", total_epochs)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        alpha_T = check_number("alpha_T", alpha_T)
        if alpha_T > 1:
            raise ValueError(f"alpha_T must be in [0, 1]; got {alpha_T!r}")
        self.num_classes = int(num_classes)
        self.total_epochs = int(total_epochs)
        self.alpha_T = alpha_T
        self.register_buffer("predictions", torch.zeros(int(num_samples), int(num_classes)))

    def alpha(self, epoch: int) -> float:
        """a_e = alpha_T (e + 1) / E for the 0-based ``epoch``."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0 (0-based); got {epoch!r}")
        return self.alpha_T * (epoch + 1) / self.total_epochs

    def _check_indices(self, indices: torch.Tensor, rows: int) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor) or indices.shape != (rows,) or indices.dtype not in (
                torch.int32, torch.int64):
            got = (f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, torch.Tensor)
                   else type(indices).__name__)
            raise ValueError(f"indices must be an int32/int64 tensor of shape [{rows}]; got {got}")
        table_rows = self.predictions.shape[0]
        in_range = (indices >= 0) & (indices < table_rows)
        if indices.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(in_range.all(), "indices must be in [0, num_samples)")
        elif not bool(in_range.all()):
            raise ValueError(f"indices must be in [0, {table_rows}); got {indices[~in_range][0].item()}")
        return indices.to(self.predictions.device).long()

    def _check_batch(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        check_class_logits("logits", logits)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have {self.num_classes} classes; got {tuple(logits.shape)}")
        labeled_rows(labels, logits, ignore_index=None)
        return self._check_indices(indices, logits.shape[0])

    def soft_targets(self, labels: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """(1 - a_e) onehot(labels) + a_e predictions[indices] (one-hot at epoch 0), float32 on the
        labels' device."""
        onehot = torch.nn.functional.one_hot(labels.long(), self.num_classes).float()
        if epoch == 0:
            return onehot
        a = self.alpha(epoch)
        previous = self.predictions[self._check_indices(indices, labels.shape[0])].to(labels.device)
        return (1 - a) * onehot + a * previous

    @torch.no_grad()
    def record(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """predictions[indices] = softmax(logits) (float32, detached)."""
        rows = self._check_indices(indices, logits.shape[0])
        self.predictions[rows] = torch.softmax(logits.detach().float(), dim=1).to(self.predictions.device)

    @staticmethod
    def loss(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
        """mean_rows -sum_k target_k log softmax(logits)_k."""
        return soft_cross_entropy(logits, soft_targets.log())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, *,
                epoch: int) -> torch.Tensor:
        self._check_batch(logits, labels, indices)
        self.alpha(epoch)
        loss = self.loss(logits, self.soft_targets(labels, indices, epoch))
        self.record(logits, indices)
        return loss

    def extra_repr(self) -> str:
        return (f"num_samples={self.predictions.shape[0]}, num_classes={self.num_classes}, "
                f"total_epochs={self.total_epochs}, alpha_T={self.alpha_T}")
