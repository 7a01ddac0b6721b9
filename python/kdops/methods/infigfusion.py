"""InfiGFusion: multi-teacher fusion by universal-logit (ULD) and graph-on-logits (GLD) distillation.

Wang et al. "InfiGFusion: Graph-on-Logits Distillation via Efficient Gromov-Wasserstein for Model
Fusion" (2025). The ULD term is from Boizard et al. "Towards Cross-Tokenizer Distillation: the
Universal Logit Distillation Loss for LLMs" (2024).

Released code: not checked. The authors' code could not be consulted when this module was written
(no network access), so it follows the paper's formulas as summarized in METHODS.md, and every
choice the formulas leave open is ours (listed in :class:`InfiGFusion`). Check it against the
released code, if any, before relying on exact agreement.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..coactivation import coactivation_features
from ..gw import sorted_gw


class InfiGFusion(nn.Module):
    r"""InfiGFusion loss of a student against one or more frozen teachers (any vocabularies)::

        L = (1 - lam) * SFT + lam * sum_m (ULD_m + graph_weight * GLD_m)

    * SFT: cross-entropy of the student logits against the labels (``ignore_index`` positions
      skipped), the mean over the counted positions.
    * ULD_m (Boizard et al. 2024): per counted position, the L1 distance between the student's and
      teacher m's probability vectors ``softmax(z / temperature)``, each sorted in descending
      order, the shorter vocabulary zero-padded; the mean over counted positions. Sorting makes it
      independent of how the two vocabularies are indexed, so teachers need not share the
      student's tokenizer (their sequences must be aligned to the student's positions).
    * GLD_m: :func:`kdops.sorted_gw` between the node features :func:`kdops.coactivation_features`
      of the student and of teacher m (top-``k`` co-activation graph of each sequence, each model
      over its own vocabulary, ``temperature`` in its softmax, masked by the labels); the mean over
      the batch's sequences (a sequence without counted positions contributes 0 but still counts).

    The teachers are constants: their logits are detached, no gradient reaches them.

    Labels and positions: like a Hugging Face causal LM, ``forward`` takes the *unshifted* labels
    by default (``shift_labels=True``): position t is scored against label t + 1, the last position
    is ignored. The same shifted mask selects the positions of all three terms (ULD and GLD
    included), so the distillation terms see exactly the positions the SFT term trains. Pass
    ``shift_labels=False`` when the labels are already aligned with the logits.

    Memory: ULD sorts each counted position's full probability vector, so per teacher it holds
    ``[N, V_m]`` probabilities plus their sort values and int64 indices (N = counted positions),
    and ``[N, V_s]`` for the student (sorted once, shared by all teachers): about 3 x 4-byte +
    8-byte per entry, i.e. several GiB at LLM vocabularies and long batches. ``uld_top=n``
    compares only the n largest probabilities of each side (``torch.topk``, ``[N, n]`` kept),
    which drops the tails' contribution; ``uld_top=None`` is the exact form. GLD runs on
    :func:`kdops.coactivation_features` (CPU, CUDA and Triton kernels); ``graph_weight=0`` skips
    it (reported as 0).

    Choices that are ours (the paper's values and these details are not public or not checked):

    * defaults ``k=10``, ``temperature=1``, ``lam=0.5``, ``graph_weight=1``;
    * one ``temperature`` for the ULD probabilities and the co-activation softmax; no ``tau^2``
      factor; the SFT term always uses the raw logits (temperature 1);
    * ULD and SFT are means over counted positions; GLD is the mean over sequences of the per-
      sequence sorted-GW distance (``sorted_gw(reduction="mean")``), with the node features
      normalized by each sequence's counted positions (``coactivation_features(normalize=True)``)
      and compared over ``max(V_s, V_m)`` nodes (``gld_nodes`` to cut this);
    * the teachers' terms are summed, not averaged (as METHODS.md writes L); pass
      ``teacher_weights`` for a weighted sum;
    * the unshifted-labels convention (``shift_labels=True``) and label masking of ULD / GLD;
    * ``uld_top`` (off by default) is an addition, not part of either paper.

    Args:
        k: entries kept per position in the co-activation graph (1 <= k <= min(V, 256)).
        temperature: softmax temperature of ULD and of the co-activation graph, > 0.
        lam: weight of the distillation terms, in [0, 1]; SFT gets 1 - lam.
        graph_weight: weight w_g of GLD relative to ULD, >= 0 (0 skips the GLD computation).
        ignore_index: label value of the positions that do not count.
        shift_labels: score position t against label t + 1 (causal LM); False for aligned labels.
        uld_top: compare only the first n sorted probabilities in ULD (None: all).
        gld_nodes: ``n_nodes`` of :func:`kdops.sorted_gw` (None: the larger vocabulary).
        teacher_weights: optional per-teacher weights of the distillation terms (default all 1).

    ``forward(student_logits [B, T, V_s], teacher_logits, labels [B, T], return_components=False)``
    with ``teacher_logits`` a list of ``[B, T, V_m]`` tensors (or one tensor) returns the loss,
    or with ``return_components=True`` a dict: ``loss``, ``sft``, ``uld`` and ``gld`` (plain sums over
    teachers, without lam, graph_weight or teacher_weights), ``uld_per_teacher`` and
    ``gld_per_teacher`` (``[M]``). The components keep their graph; detach them for logging.
    """

    def __init__(self, k: int = 10, temperature: float = 1.0, lam: float = 0.5, graph_weight: float = 1.0,
                 ignore_index: int = -100, shift_labels: bool = True, uld_top: int | None = None,
                 gld_nodes: int | None = None, teacher_weights: list[float] | None = None):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be a positive int; got {k!r}")
        if not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0; got {temperature!r}")
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be a number in [0, 1]; got {lam!r}")
        if isinstance(graph_weight, bool) or not isinstance(graph_weight, numbers.Real) or not graph_weight >= 0:
            raise ValueError(f"graph_weight must be a number >= 0; got {graph_weight!r}")
        for name, value in (("uld_top", uld_top), ("gld_nodes", gld_nodes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None; got {value!r}")
        self.k = int(k)
        self.temperature = float(temperature)
        self.lam = float(lam)
        self.graph_weight = float(graph_weight)
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.uld_top = None if uld_top is None else int(uld_top)
        self.gld_nodes = None if gld_nodes is None else int(gld_nodes)
        self.teacher_weights = None if teacher_weights is None else [float(w) for w in teacher_weights]

    # ---- the three terms ---------------------------------------------------------------------

    def aligned_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels aligned with the logits: shifted left by one (last = ignore_index) when
        ``shift_labels``, else unchanged."""
        if not self.shift_labels:
            return labels
        return F.pad(labels[..., 1:], (0, 1), value=self.ignore_index)

    def sft_loss(self, student_logits: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the counted positions of the *aligned* labels (0 when there are none)."""
        acc = _checks.acc_dtype(student_logits.dtype)
        total = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]).to(acc),
                                aligned.reshape(-1), ignore_index=self.ignore_index, reduction="sum")
        count = aligned.ne(self.ignore_index).sum().clamp_min(1)
        return total / count

    def _sorted_probs(self, rows: torch.Tensor) -> torch.Tensor:
        """softmax(rows / tau) in descending order, all of them or the first ``uld_top``."""
        probs = torch.softmax(rows.to(_checks.acc_dtype(rows.dtype)) / self.temperature, dim=-1)
        if self.uld_top is not None and self.uld_top < probs.shape[-1]:
            return probs.topk(self.uld_top, dim=-1, largest=True, sorted=True).values
        return probs.sort(dim=-1, descending=True).values

    @staticmethod
    def _uld_rows(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """sum_i |s_i - t_i| per row, the shorter row zero-padded (without materializing the pad)."""
        m = min(s.shape[-1], t.shape[-1])
        dtype = torch.promote_types(s.dtype, t.dtype)
        s, t = s.to(dtype), t.to(dtype)
        head = (s[..., :m] - t[..., :m]).abs().sum(-1)
        # the padded tail is |p - 0| = p (probabilities are >= 0)
        return head + s[..., m:].sum(-1) + t[..., m:].sum(-1)

    def uld_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
        """ULD of one teacher: mean over the ``valid`` [B, T] positions (0 when there are none)."""
        s = self._sorted_probs(student_logits[valid])
        t = self._sorted_probs(teacher_logits.detach()[valid])
        return self._uld_rows(s, t).sum() / max(s.shape[0], 1)

    def gld_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
        """GLD of one teacher: sorted_gw of the two models' co-activation node features."""
        f_s = coactivation_features(student_logits, self.k, mask=valid, temperature=self.temperature)
        with torch.no_grad():
            f_t = coactivation_features(teacher_logits.detach(), self.k, mask=valid,
                                        temperature=self.temperature)
        return sorted_gw(f_s, f_t, n_nodes=self.gld_nodes, reduction="mean")

    # ---- the loss ----------------------------------------------------------------------------

    def forward(self, student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor,
                return_components: bool = False):
        _checks.check_logits("student_logits", student_logits)
        if student_logits.dim() != 3:
            raise ValueError(f"student_logits must have shape [B, T, V]; got {tuple(student_logits.shape)}")
        teachers = [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)
        if not teachers:
            raise ValueError("teacher_logits must hold at least one teacher")
        batch_seq = student_logits.shape[:2]
        for i, t in enumerate(teachers):
            _checks.check_logits(f"teacher_logits[{i}]", t)
            if t.dim() != 3 or t.shape[:2] != batch_seq:
                raise ValueError(f"teacher_logits[{i}] must have shape [{batch_seq[0]}, {batch_seq[1]}, V_m]; "
                                 f"got {tuple(t.shape)}")
            if t.device != student_logits.device:
                raise ValueError(f"teacher_logits[{i}] is on {t.device}, the student on {student_logits.device}")
        if not isinstance(labels, torch.Tensor) or labels.shape != batch_seq:
            raise ValueError(f"labels must be a tensor of shape {tuple(batch_seq)}; "
                             f"got {getattr(labels, 'shape', type(labels))}")
        weights = self.teacher_weights or [1.0] * len(teachers)
        if len(weights) != len(teachers):
            raise ValueError(f"teacher_weights has {len(weights)} entries for {len(teachers)} teachers")

        aligned = self.aligned_labels(labels)
        valid = aligned.ne(self.ignore_index)
        sft = self.sft_loss(student_logits, aligned)
        # the student's sorted probabilities are shared by all teachers
        s_sorted = self._sorted_probs(student_logits[valid])
        n_valid = max(s_sorted.shape[0], 1)
        uld_terms, gld_terms = [], []
        for t in teachers:
            t_sorted = self._sorted_probs(t.detach()[valid])
            uld_terms.append(self._uld_rows(s_sorted, t_sorted).sum() / n_valid)
            if self.graph_weight > 0:
                gld_terms.append(self.gld_loss(student_logits, t, valid).to(uld_terms[-1].dtype))
            else:
                gld_terms.append(uld_terms[-1].new_zeros(()))
        uld_all = torch.stack(uld_terms)
        gld_all = torch.stack(gld_terms)
        w = uld_all.new_tensor(weights)
        distill = (w * (uld_all + self.graph_weight * gld_all)).sum()
        loss = (1.0 - self.lam) * sft.to(distill.dtype) + self.lam * distill
        if not return_components:
            return loss
        return {"loss": loss, "sft": sft, "uld": uld_all.sum(), "gld": gld_all.sum(),
                "uld_per_teacher": uld_all, "gld_per_teacher": gld_all}

    def extra_repr(self) -> str:
        return (f"k={self.k}, temperature={self.temperature}, lam={self.lam}, "
                f"graph_weight={self.graph_weight}, ignore_index={self.ignore_index}, "
                f"shift_labels={self.shift_labels}, uld_top={self.uld_top}, gld_nodes={self.gld_nodes}")
