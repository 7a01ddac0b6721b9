"""Offline distillation from a teacher's stored top-k token ids and log-probabilities.

The teacher runs once, on an inference server (vLLM, SGLang), and its top-k log-probabilities per
token are stored with the dataset; training then needs K numbers per token instead of the teacher.
Styles matched: axolotl's KD integration (axolotl-ai-cloud/axolotl,
``src/axolotl/integrations/kd``: ``topk_logprob/forward_kl.py``, ``chat_template.py``) and
DistillKit's sparse KL (arcee-ai/DistillKit, ``distillkit/lossfuncs/kl.py``, ``common.py``).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .. import _checks
from ..topk import DIVERGENCES, topk_kd_loss
from .token_kd import aligned_labels, check_temperature


def topk_teacher(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-``k`` token ids and their log-probabilities per row, as an inference server
    returns them: log_softmax over the full vocabulary at temperature 1, the k largest, descending.

    Returns ``(ids, logprobs)``, both ``[..., k]``: int64 ids and float32 log-probabilities
    (float64 for float64 logits). No gradient. Ties between equal logits are broken as
    ``torch.topk`` breaks them.
    """
    _checks.check_logits("teacher_logits", teacher_logits)
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, V] = [1, {vocab}]; got {k!r}")
    acc = _checks.acc_dtype(teacher_logits.dtype)
    with torch.no_grad():
        top_logits, ids = teacher_logits.topk(int(k), dim=-1)
        log_normalizer = torch.logsumexp(teacher_logits.to(acc), dim=-1, keepdim=True)
        return ids, top_logits.to(acc) - log_normalizer


class OfflineTopKKD(nn.Module):
    r"""KD of a student against stored top-k teacher log-probabilities (:func:`kdops.topk_kd_loss`).

    Per counted position, the teacher is p_k = softmax(lp_k / temperature) over its K stored entries
    (``renormalize=True``, the axolotl and DistillKit treatment: the K entries are taken as the whole
    distribution) or exp(lp_k) as given (``renormalize=False``). ``fkl`` is exact against the
    student's full-vocabulary softmax: sum_k p_k (log p_k - log q[id_k]), q = softmax(z_s /
    temperature), as in axolotl's ``forward_kl.loss`` and DistillKit's ``sparse_kl_div``;
    ``rkl``, ``jsd``, ``skew_fkl``, ``skew_rkl``, ``tvd`` are taken on the K support with the student
    renormalized over the stored ids. The loss is the mean over the counted tokens, or the sum over
    them divided by ``num_items_in_batch``. ``-inf`` log-probabilities mark empty slots (a server
    that returned fewer than K).

    Alignment: ``teacher_ids`` / ``teacher_logprobs`` at position t must describe the teacher's
    distribution of the same next token as ``student_logits`` at position t (what
    :func:`topk_teacher` of the teacher's logits at t gives; vLLM's prompt log-probabilities of
    token t + 1 belong to position t). ``shift_labels`` moves only the labels.

    Log-probabilities stored at a sampling temperature T0 != 1: pass ``teacher_logprobs * T0``;
    with ``renormalize`` the teacher becomes p^(T0 / temperature), renormalized over the K entries,
    which is how axolotl (``gen_temperature`` -> ``kd_temperature``) and DistillKit
    (``target_generation_temperature``) rescale them.

    Differences from those codes:

    * Normalization: axolotl's ``forward_kl.loss`` without ``num_items_in_batch`` divides the sum by
      the number of valid (token, k) entries, K times the number of tokens; here it is the number of
      counted tokens (DistillKit's default). With ``num_items_in_batch`` all three agree.
    * ``t2_scale``: DistillKit multiplies by temperature^2, axolotl's current ``forward_kl.loss``
      does not; the default here, False, follows axolotl (the two agree at temperature 1).
    * axolotl's fused Liger path (``kd_normalize_topk``) also renormalizes the student over the K
      ids for fkl, i.e. a KL on the K support; DistillKit's ``SYMMETRIC_UNIFORM`` missing-mass
      handling: neither is offered.

    Args:
        divergence: one of :func:`kdops.topk_kd_loss`'s (``"fkl"`` default).
        temperature: distillation temperature, > 0 (applied to the student logits and the stored
            log-probabilities alike).
        renormalize: renormalize the teacher over its K entries (default True).
        beta, alpha: jsd / skew weights in [0, 1].
        t2_scale: multiply each token's loss by temperature^2.
        ignore_index: label value of the positions that do not count.
        shift_labels: score position t against label t + 1 (a causal LM's unshifted labels); False
            when the labels are already aligned with the logits.

    Call: ``loss = kd(student_logits, teacher_ids, teacher_logprobs, labels=None, *, mask=None,
    num_items_in_batch=None)``; logits ``[B, T, V]`` or ``[N, V]``, ids and log-probabilities
    ``[..., K]`` of the same leading shape. The log-probabilities are detached.
    """

    def __init__(self, divergence: str = "fkl", temperature: float = 1.0, renormalize: bool = True,
                 beta: float = 0.5, alpha: float = 0.1, t2_scale: bool = False, ignore_index: int = -100,
                 shift_labels: bool = True):
        super().__init__()
        _checks.check_choice("divergence", divergence, DIVERGENCES)
        _checks.check_unit_interval("beta", beta)
        _checks.check_unit_interval("alpha", alpha)
        self.divergence = divergence
        self.temperature = check_temperature(temperature)
        self.renormalize = renormalize
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.t2_scale = t2_scale
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels

    def forward(self, student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                labels: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        return topk_kd_loss(
            student_logits, teacher_ids, teacher_logprobs.detach(), divergence=self.divergence,
            temperature=self.temperature, beta=self.beta, alpha=self.alpha, renormalize=self.renormalize,
            labels=aligned_labels(labels, self.ignore_index, self.shift_labels),
            ignore_index=self.ignore_index, mask=mask, normalizer=num_items_in_batch, t2_scale=self.t2_scale,
        )

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, temperature={self.temperature}, "
                f"renormalize={self.renormalize}, beta={self.beta}, alpha={self.alpha}, "
                f"t2_scale={self.t2_scale}, ignore_index={self.ignore_index}, "
                f"shift_labels={self.shift_labels}")
