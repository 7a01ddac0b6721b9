"""AdaSPEC: selective knowledge distillation of a speculative-decoding draft model.

Hu, Guo, Feng, Zhao. "AdaSPEC: Selective Knowledge Distillation for Efficient Speculative
Decoders". NeurIPS 2025 (arXiv:2510.19779); released code: github.com/yuezhouhu/adaspec.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adaspec import adaspec_loss
from ..divergence import kd_loss


class AdaSPEC(nn.Module):
    r"""The two-stage AdaSPEC recipe as loss functions for a training loop or a Hugging Face
    ``Trainer.compute_loss``.

    Stage 1 (``reference_loss``): a reference model, initialized as the draft is, is distilled
    from the target with plain forward KL on every counted token.
    Stage 2 (``forward`` / ``draft_loss``): with the reference frozen, the draft is distilled only
    on the ``fraction`` of tokens with the largest KL(p || q_draft) - KL(p || q_reference): the
    tokens the reference learned well and the draft has not yet (:func:`kdops.adaspec_loss`).

    Both stages normalize as the released ``AdaSPECTrainer.compute_loss``: with
    ``num_items_in_batch`` (what a Trainer passes under gradient accumulation: the number of label
    tokens in the whole accumulated batch) the loss is the sum over the kept tokens divided by it;
    without, the mean over the kept tokens. The reference and target logits are constants (the
    code computes them under ``torch.no_grad()``).

    Inputs are a causal LM's logits ``[B, T, V]`` and the unshifted ``labels`` ``[B, T]`` that a
    Trainer receives: position t is scored against label t + 1 (``shift_labels=True``, the
    code's ``logits[..., :-1, :]`` / ``labels[:, 1:]``). The shift is made on the labels (the
    last position gets ``ignore_index``) instead of slicing the logits, so no logits are copied;
    the fused kernels skip ignored rows without reading them.

    Differences from the released code:

    * ``temperature`` (default 1, the code's only value) tempers both KLs and the loss alike.
    * The quantile threshold is exact for any number of tokens (the code's ``torch.quantile``
      refuses more than 2^24 valid tokens per step).
    * The code multiplies the loss by ``accelerator.num_processes`` when
      ``average_tokens_across_devices`` is on and ``num_items_in_batch`` is given (as every HF
      ``compute_loss`` does); that factor is the Trainer's business: multiply the returned loss
      by it in ``compute_loss``.
    * The stage-1 normalization (sum / num_items_in_batch, else mean) is taken to match stage 2;
      the README describes stage 1 only as standard forward-KL distillation.

    Args:
        fraction: share of the counted tokens kept in stage 2, in (0, 1]; the code's ``k``
            (0.4 in the authors' runs).
        temperature: softmax temperature of both stages.
        ignore_index: label value of the positions that do not count.
        shift_labels: score position t against label t + 1 (causal LM); False when the labels
            are already aligned with the logits.

    Example (a Hugging Face Trainer)::

        class AdaSPECTrainer(Trainer):
            def __init__(self, *args, ref_model, target_model, **kwargs):
                super().__init__(*args, **kwargs)
                self.ref_model, self.target_model = ref_model.eval(), target_model.eval()
                self.adaspec = kdops.methods.AdaSPEC(fraction=0.4)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                outputs = model(**inputs)
                with torch.no_grad():
                    target_logits = self.target_model(**inputs, use_cache=False).logits
                    ref_logits = self.ref_model(**inputs, use_cache=False).logits
                loss = self.adaspec(outputs.logits, ref_logits, target_logits, inputs["labels"],
                                    num_items_in_batch=num_items_in_batch)
                return (loss, outputs) if return_outputs else loss
    """

    def __init__(self, fraction: float = 0.4, temperature: float = 1.0, ignore_index: int = -100,
                 shift_labels: bool = True):
        super().__init__()
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be a number in (0, 1]; got {fraction!r}")
        self.fraction = float(fraction)
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels

    def _aligned(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None or not self.shift_labels:
            return labels
        return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=self.ignore_index)

    def reference_loss(self, reference_logits: torch.Tensor, target_logits: torch.Tensor,
                       labels: torch.Tensor | None = None,
                       num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        """Stage 1: forward KL(p_target || q_reference) over every counted token."""
        return kd_loss(reference_logits, target_logits.detach(), divergence="fkl",
                       temperature=self.temperature, labels=self._aligned(labels),
                       ignore_index=self.ignore_index, normalizer=num_items_in_batch)

    def draft_loss(self, draft_logits: torch.Tensor, reference_logits: torch.Tensor,
                   target_logits: torch.Tensor, labels: torch.Tensor | None = None,
                   num_items_in_batch: int | torch.Tensor | None = None,
                   return_details: bool = False):
        """Stage 2: :func:`kdops.adaspec_loss` of the draft against the frozen reference.
        ``return_details`` adds (kept, draft_kl, reference_kl) for logging."""
        return adaspec_loss(draft_logits, reference_logits, target_logits, fraction=self.fraction,
                            labels=self._aligned(labels), ignore_index=self.ignore_index,
                            normalizer=num_items_in_batch, temperature=self.temperature,
                            return_details=return_details)

    forward = draft_loss

    def extra_repr(self) -> str:
        return (f"fraction={self.fraction}, temperature={self.temperature}, "
                f"ignore_index={self.ignore_index}, shift_labels={self.shift_labels}")
