"""Swing distillation: privacy-preserving knowledge distillation with a per-token temperature set by
how likely the token is private, and noise on the teacher's soft targets.

Li, Wu, Dong, Wu, Bian, Xiong. "Swing Distillation: A Privacy-Preserving Knowledge Distillation
Framework" (arXiv:2212.08349, 2022). Released code: none that we know of. The paper gives the idea
(temperature adjusted per token by the likelihood that it carries private information; noise
injected into the soft targets) but its exact score-to-temperature mapping and noise distribution
are not public, so both are parameters here, with defaults of ours (listed in
:class:`SwingDistillation`).
"""

from __future__ import annotations

import numbers
from typing import Callable

import torch
from torch import nn

from .. import _checks
from ..divergence import kd_loss
from .token_kd import aligned_labels, check_student_teacher, check_temperature


class LinearTemperature:
    """The default score-to-temperature map (ours): privacy score s in [0, 1] -> low + (high - low) s.

    A token certainly private (s = 1) is distilled at ``high``, a public one at ``low``: the higher
    the temperature, the flatter the teacher's soft target and the less of it reaches the student.
    """

    def __init__(self, low: float = 1.0, high: float = 4.0):
        self.low = check_temperature(low)
        self.high = check_temperature(high)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * scores

    def __repr__(self) -> str:
        return f"LinearTemperature(low={self.low}, high={self.high})"


class SwingDistillation(nn.Module):
    r"""Forward-KL distillation with a per-token temperature from a privacy score and noisy soft
    targets::

        tau_t   = temperature_map(s_t)                       s_t in [0, 1]: how likely token t is private
        p~_t    = p_t * exp(noise_scale * eps_t) / Z_t       p_t = softmax(z_t / tau_t), eps_t ~ N(0, I_V)
        loss    = mean over counted t of KL(p~_t || softmax(z_s,t / tau_t))   (x tau_t^2 with t2_scale)

    The noise multiplies the soft targets by a log-normal factor and renormalizes them (Z_t), so
    they stay a distribution without any clamping, and a token the teacher rules out (p = 0, a
    ``-inf`` logit) stays ruled out. It is applied as Gaussian noise on the tempered teacher logits
    (softmax(z_t / tau_t + noise_scale eps_t) is the same distribution), so the loss runs in one
    fused :func:`kdops.kd_loss` call with a per-row temperature and no extra [N, V] buffer besides
    the noisy logits. eps is drawn as ``torch.randn(teacher_logits.shape, generator=generator,
    dtype=float32, device=teacher_logits.device)`` (float64 for float64 logits): pass a seeded
    ``generator`` (on the logits' device) to reproduce a step.

    Ours, since the paper does not publish them (see the module docstring): the linear default map
    :class:`LinearTemperature` (1 at s = 0 to 4 at s = 1), the log-normal noise and its default
    scale 0.1, forward KL as the divergence, no tau^2 factor by default. Where the scores come from
    (the paper's private-token detector, e.g. an NER model's probability that a token is part of a
    name, number or address) is up to the caller. The cross-entropy term of a full KD objective is
    the trainer's job.

    Positions: like the labels, ``privacy_scores`` are per input token. With ``shift_labels=True``
    (a causal LM's unshifted labels) position t is scored against label t + 1 and distilled at the
    temperature of token t + 1's score (the token whose prediction could leak it); the last position
    gets score 0 (and label ``ignore_index``). ``mask`` is aligned with the logits, not shifted.

    Args:
        temperature_map: callable mapping a float tensor of scores to positive temperatures of the
            same shape (may be a learnable module); default ``LinearTemperature(1.0, 4.0)``.
        noise_scale: standard deviation of the log-space noise, >= 0 (0 disables the noise).
        t2_scale: multiply each token's loss by its tau^2 (Hinton's scaling).
        ignore_index: label value of the positions that do not count.
        shift_labels: see above; False when labels and scores are already aligned with the logits.

    Call: ``loss = swing(student_logits, teacher_logits, privacy_scores, labels=None, *, mask=None,
    generator=None, num_items_in_batch=None)``; logits ``[B, T, V]`` or ``[N, V]``, scores and
    labels of the leading shape. The teacher is detached.
    """

    def __init__(self, temperature_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 noise_scale: float = 0.1, t2_scale: bool = False, ignore_index: int = -100,
                 shift_labels: bool = True):
        super().__init__()
        if isinstance(noise_scale, bool) or not isinstance(noise_scale, numbers.Real) or not (
            0.0 <= float(noise_scale) < float("inf")
        ):
            raise ValueError(f"noise_scale must be a finite number >= 0; got {noise_scale!r}")
        if temperature_map is not None and not callable(temperature_map):
            raise ValueError(f"temperature_map must be callable; got {type(temperature_map).__name__}")
        self.temperature_map = LinearTemperature() if temperature_map is None else temperature_map
        self.noise_scale = float(noise_scale)
        self.t2_scale = t2_scale
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels

    def token_temperatures(self, privacy_scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The temperature of each logit row: ``temperature_map`` of the (shifted) scores."""
        lead_shape = logits.shape[:-1]
        if not isinstance(privacy_scores, torch.Tensor) or privacy_scores.shape != lead_shape:
            raise ValueError(f"privacy_scores must be a tensor of the logits' leading shape "
                             f"{tuple(lead_shape)}; got {_describe(privacy_scores)}")
        if not privacy_scores.dtype.is_floating_point:
            raise ValueError(f"privacy_scores must be floating point; got {privacy_scores.dtype}")
        if privacy_scores.device != logits.device:
            raise ValueError(f"privacy_scores is on {privacy_scores.device} but the logits are on "
                             f"{logits.device}")
        in_range = ((privacy_scores >= 0) & (privacy_scores <= 1)).all()
        if privacy_scores.device.type != "cpu" or torch.compiler.is_compiling():
            torch._assert_async(in_range, "privacy_scores must lie in [0, 1]")
        elif not bool(in_range):
            raise ValueError("privacy_scores must lie in [0, 1] (NaN is not a score)")
        if self.shift_labels:
            privacy_scores = torch.nn.functional.pad(privacy_scores[..., 1:], (0, 1), value=0.0)
        temperature = self.temperature_map(privacy_scores)
        if not isinstance(temperature, torch.Tensor) or temperature.shape != lead_shape:
            raise ValueError(f"temperature_map must return a tensor of privacy_scores' shape "
                             f"{tuple(lead_shape)}; got {_describe(temperature)}")
        _checks.check_positive_tensor("temperature_map(privacy_scores)", temperature)
        return temperature

    def noisy_teacher_logits(self, teacher_logits: torch.Tensor, temperature: torch.Tensor,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Teacher logits z~ with softmax(z~ / tau) = the noisy soft targets: z + tau noise_scale eps.
        Returned in the teacher's dtype; no gradient."""
        if self.noise_scale == 0.0:
            return teacher_logits.detach()
        acc = _checks.acc_dtype(teacher_logits.dtype)
        with torch.no_grad():
            noise = torch.randn(teacher_logits.shape, generator=generator, dtype=acc,
                                device=teacher_logits.device)
            # tau is detached: the noise is a fixed perturbation of the soft targets, not a path
            # for a learnable temperature map's gradient
            noise.mul_(temperature.detach().to(acc).unsqueeze(-1) * self.noise_scale)
            return noise.add_(teacher_logits.to(acc)).to(teacher_logits.dtype)

    def soft_targets(self, teacher_logits: torch.Tensor, privacy_scores: torch.Tensor, *,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The noisy soft targets p~ ``[..., V]`` the student is distilled toward (for inspection;
        the loss never materializes them). The same generator state gives the same p~ as
        :meth:`forward`."""
        _checks.check_logits("teacher_logits", teacher_logits)
        temperature = self.token_temperatures(privacy_scores, teacher_logits)
        noisy = self.noisy_teacher_logits(teacher_logits, temperature, generator)
        acc = _checks.acc_dtype(teacher_logits.dtype)
        with torch.no_grad():
            return torch.softmax(noisy.to(acc) / temperature.to(acc).unsqueeze(-1), dim=-1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                privacy_scores: torch.Tensor, labels: torch.Tensor | None = None, *,
                mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        check_student_teacher(student_logits, teacher_logits)
        labels = aligned_labels(labels, self.ignore_index, self.shift_labels)
        # labels and mask are checked before the noise is drawn (kd_loss checks them again)
        _checks.valid_rows(student_logits.shape[:-1], student_logits.device, labels, self.ignore_index, mask)
        temperature = self.token_temperatures(privacy_scores, student_logits)
        teacher = self.noisy_teacher_logits(teacher_logits, temperature, generator)
        return kd_loss(student_logits, teacher, divergence="fkl", temperature=temperature, labels=labels,
                       ignore_index=self.ignore_index, mask=mask, normalizer=num_items_in_batch,
                       t2_scale=self.t2_scale)

    def extra_repr(self) -> str:
        return (f"temperature_map={self.temperature_map!r}, noise_scale={self.noise_scale}, "
                f"t2_scale={self.t2_scale}, ignore_index={self.ignore_index}, "
                f"shift_labels={self.shift_labels}")


def _describe(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
