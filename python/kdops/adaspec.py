"""adaspec_loss: AdaSPEC's selective distillation of a speculative-decoding draft (DESIGN.md 3.7).

AdaSPEC (Hu, Guo, Feng, Zhao: "AdaSPEC: Selective Knowledge Distillation for Efficient
Speculative Decoders", NeurIPS 2025) distils the draft only on the tokens it can learn: a
reference model (the draft's initialization, distilled from the target with plain forward KL)
fits some tokens much better than the draft does so far; those (the largest
KL(p || q_draft) - KL(p || q_reference)) are kept, and the rest, hard even for the reference,
are dropped.

The step costs one read of the three logit tensors for the statistics (``adaspec_token_kl``: both
KLs per token in one sweep), an O(N) selection on N numbers (``select_top_fraction``), and the
fused forward-KL kernel of ``kd_loss`` on the kept rows only: it reads the kept fraction of the
draft and target rows and writes the draft gradient once (zero rows where not kept). Nothing of
size [N, V] is allocated besides that gradient.
"""

from __future__ import annotations

import numbers

import torch

from . import _backend, _checks
from . import reference as _reference
from .divergence import kd_loss
from .selection import select_top_fraction


def adaspec_loss(
    draft_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    fraction: float = 0.4,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    return_details: bool = False,
):
    r"""AdaSPEC's token-filtered forward KL between the target and the draft.

    Per counted token, with p = softmax(target / tau), q = softmax(logits / tau):
    l_d = KL(p || q_draft), l_r = KL(p || q_reference). The tokens whose l_d - l_r is
    >= ``torch.quantile`` of those scores at 1 - ``fraction`` (linear interpolation; ties kept)
    are kept, and the loss is

    * ``normalizer`` given: sum of the kept l_d / normalizer. This is the released code's
      ``num_items_in_batch`` branch (its Trainer passes the number of label tokens of the whole
      accumulated batch, not the number kept);
    * ``normalizer=None``: the mean of the kept l_d (0 when nothing is kept).

    That is the authors' ``AdaSPECTrainer.compute_loss`` (github.com/yuezhouhu/adaspec, README),
    which runs at tau = 1; ``temperature`` generalizes it (both KLs and the loss at the same tau,
    no tau^2 factor).

    Gradient flows to ``draft_logits`` only. The reference and target logits are constants, as
    the released code computes them under ``torch.no_grad()``: they are detached here, so they
    get no gradient even when they require one, and a tensor temperature gets none either. The
    selection carries no gradient (a boolean mask).

    Args:
        draft_logits, reference_logits, target_logits: ``[..., V]`` of one dtype (float32,
            float64, bfloat16, float16) and device. Rows may be strided.
        fraction: the share of counted tokens kept, in (0, 1]. ``fraction=1`` keeps every counted
            token: plain forward-KL distillation (``kd_loss``).
        labels, ignore_index, mask: the tokens that count, as in :func:`kdops.kd_loss`.
        normalizer: a number > 0 or a 0-d tensor (e.g. ``num_items_in_batch``).
        temperature: a number > 0, a 0-d tensor or one per token.
        return_details: also return the kept mask and both KLs, for logging.

    Returns:
        The loss (float32; float64 for float64 logits), or with ``return_details``
        ``(loss, kept, draft_kl, reference_kl)``: kept a bool tensor and the KLs in the loss
        dtype, all of the logits' leading shape (0 for tokens that do not count).

    Example::

        >>> loss = kdops.adaspec_loss(draft_logits, ref_logits, target_logits, labels=labels,
        ...                           normalizer=num_items_in_batch)
    """
    for name, logits in (("draft_logits", draft_logits), ("reference_logits", reference_logits),
                         ("target_logits", target_logits)):
        _checks.check_logits(name, logits)
    _checks.check_pair(draft_logits, reference_logits, "reference_logits")
    _checks.check_pair(draft_logits, target_logits, "target_logits")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be a number in (0, 1]; got {fraction!r}")

    lead_shape = draft_logits.shape[:-1]
    device = draft_logits.device
    acc = _checks.acc_dtype(draft_logits.dtype)
    rows = lead_shape.numel()
    valid = _checks.valid_rows(lead_shape, device, labels, ignore_index, mask)
    tau = _checks.row_temperature(temperature, lead_shape, rows, acc, device).detach()
    norm = _checks.normalizer_tensor(normalizer)
    reference_logits = reference_logits.detach()
    target_logits = target_logits.detach()

    draft_kl, reference_kl = adaspec_token_kl(draft_logits.detach(), reference_logits, target_logits, tau,
                                              valid)
    kept = select_top_fraction(draft_kl - reference_kl, float(fraction), mask=valid)

    if torch.is_grad_enabled() and draft_logits.requires_grad:
        # the fused fkl kernel on the kept rows: the loss and the stored draft gradient in one read
        loss = kd_loss(draft_logits, target_logits, divergence="fkl", temperature=tau,
                       mask=kept.reshape(lead_shape), normalizer=norm)
    else:
        # nothing to differentiate: the kept KLs are already known, no second read
        total = torch.where(kept, draft_kl, 0.0).sum()
        count = norm if norm is not None else kept.sum().clamp(min=1)
        loss = total / count.to(device=device, dtype=acc)
    if return_details:
        return loss, kept.reshape(lead_shape), draft_kl.reshape(lead_shape), reference_kl.reshape(lead_shape)
    return loss


def adaspec_token_kl(
    draft: torch.Tensor,
    reference: torch.Tensor,
    target: torch.Tensor,
    temperature: torch.Tensor,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics op on checked ``[..., V]`` logits: (draft_kl, reference_kl) as [N] in the
    accumulate dtype, on the selected backend. ``temperature`` is 0-d or [N], ``valid`` [N] bool
    or None (as :func:`adaspec_loss` prepares them). No gradient."""
    backend = _backend.select("adaspec_token_kl", draft.device, needs_grad=False)
    if backend == "reference":
        lead_shape = draft.shape[:-1]
        draft_kl, reference_kl = _reference.adaspec_token_kl(
            draft, reference, target, temperature=temperature,
            mask=None if valid is None else valid.reshape(lead_shape),
        )
        acc = _checks.acc_dtype(draft.dtype)
        return draft_kl.reshape(-1).to(acc), reference_kl.reshape(-1).to(acc)
    if backend == "triton":
        from .kernels_registry import triton_ops

        op = triton_ops()["adaspec_token_kl"]
    else:
        op = torch.ops.kdops.adaspec_token_kl.default  # cpu and cuda: the dispatcher picks by device
    return op(_checks.rows_view(draft), _checks.rows_view(reference), _checks.rows_view(target),
              temperature, valid)


def adaspec_token_kl_fake(draft, reference, target, temperature, valid):
    rows = draft.shape[0]
    acc = _checks.acc_dtype(draft.dtype)
    return draft.new_empty((rows,), dtype=acc), draft.new_empty((rows,), dtype=acc)


torch.library.register_fake("kdops::adaspec_token_kl")(adaspec_token_kl_fake)
