"""The LLM token-level methods (python/kdops/methods/{token_kd,gkd,distillm,akl,swing,offline_topk}.py)
against float64 transcriptions of the published formulas and released codes, written out here:
DistillSpec's per-token divergences and acceptance rate, TRL's generalized JSD, DistiLLM's
``skewed_forward_kl`` / ``skewed_reverse_kl``, AKL's ``get_ratio`` + ``get_kl``, Swing's per-token
temperature with log-normal noise on the soft targets, and the axolotl / DistillKit top-k forward KL.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import kdops
from kdops.methods.akl import AKL, akl_gaps
from kdops.methods.distillm import DistiLLM
from kdops.methods.gkd import GKD
from kdops.methods.offline_topk import OfflineTopKKD, topk_teacher
from kdops.methods.swing import LinearTemperature, SwingDistillation
from kdops.methods.token_kd import TokenKD, acceptance_rate

IGNORE = -100
B, T, V = 3, 8, 23


def _batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, T, V, generator=g) * 2
    student = teacher * 0.5 + torch.randn(B, T, V, generator=g) * 1.5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE  # a prompt
    labels[2, 5:] = IGNORE  # padding
    return student.to(dtype), teacher.to(dtype), labels


def _shift(labels):  # HF causal LM: position t is scored against label t + 1
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def _token_mean(per_token, labels):
    counted = labels != IGNORE
    return (per_token * counted).sum() / counted.sum()


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _check_against(method_loss, reference_loss, student, student64, *, rtol=1e-5, atol=1e-6):
    """Loss and student gradient of the method (float32 kernels) against the float64 transcription."""
    method_loss.backward()
    reference_loss.backward()
    torch.testing.assert_close(method_loss.double(), reference_loss.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=rtol, atol=1e-8)


def distillspec_per_token(student, teacher, divergence, tau=1.0, beta=0.5):
    """DistillSpec's divergences between p = softmax(z_t / tau) and q = softmax(z_s / tau), float64."""
    lp = torch.log_softmax(teacher.double() / tau, -1)
    lq = torch.log_softmax(student.double() / tau, -1)
    p, q = lp.exp(), lq.exp()
    if divergence == "fkl":
        return (p * (lp - lq)).sum(-1)
    if divergence == "rkl":
        return (q * (lq - lp)).sum(-1)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    log_m = torch.log(beta * p + (1 - beta) * q)
    return beta * (p * (lp - log_m)).sum(-1) + (1 - beta) * (q * (lq - log_m)).sum(-1)


# ------------------------------------------------------------------------------------------ TokenKD

@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_token_kd_matches_distillspec(divergence, tau):
    student, teacher, labels = _batch(0)
    s, t = _leaf(student), _leaf(teacher)
    loss = TokenKD(divergence, temperature=tau, beta=0.3)(s, t, labels)
    s64 = _leaf(student.double())
    expect = _token_mean(distillspec_per_token(s64, teacher, divergence, tau, beta=0.3), _shift(labels))
    _check_against(loss, expect, s, s64)
    assert t.grad is None  # the teacher is a constant
    assert (s.grad[:, -1] == 0).all()  # the last position predicts nothing


def test_token_kd_sequence_mean_and_normalizers():
    student, teacher, labels = _batch(1)
    labels[1, :] = IGNORE  # a sequence without a counted token: left out of the sequence mean
    aligned = _shift(labels)
    per_token = distillspec_per_token(student, teacher, "fkl") * (aligned != IGNORE)
    counts = (aligned != IGNORE).sum(-1)
    per_sequence = per_token.sum(-1)[counts > 0] / counts[counts > 0]
    loss = TokenKD("fkl", sequence_mean=True)(student, teacher, labels)
    torch.testing.assert_close(loss.double(), per_sequence.mean(), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(per_sequence.mean(), _token_mean(per_token, aligned))  # the two differ here

    loss = TokenKD("fkl")(student, teacher, labels, num_items_in_batch=50)
    torch.testing.assert_close(loss.double(), per_token.sum() / 50, rtol=1e-5, atol=1e-6)

    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) > 0.3
    loss = TokenKD("fkl")(student, teacher, labels, mask=mask)
    both = (aligned != IGNORE) & mask
    torch.testing.assert_close(loss.double(), (per_token * both).sum() / both.sum(), rtol=1e-5, atol=1e-6)


def test_token_kd_rows_with_aligned_labels():
    student, teacher, labels = _batch(2)
    rows_s, rows_t, rows_labels = student.reshape(-1, V), teacher.reshape(-1, V), labels.reshape(-1)
    loss = TokenKD("rkl", shift_labels=False)(rows_s, rows_t, rows_labels)
    expect = _token_mean(distillspec_per_token(rows_s, rows_t, "rkl"), rows_labels)
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-6)


def test_acceptance_rate_is_one_minus_tvd():
    draft, target, _ = _batch(3)
    tvd = distillspec_per_token(draft, target, "tvd", tau=0.7)
    torch.testing.assert_close(acceptance_rate(draft, target, temperature=0.7).double(), 1 - tvd.mean(),
                               rtol=1e-6, atol=1e-6)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[2, :3] = True
    rate = acceptance_rate(draft.requires_grad_(), target, mask)
    torch.testing.assert_close(rate.double(), 1 - distillspec_per_token(draft, target, "tvd")[mask].mean(),
                               rtol=1e-6, atol=1e-6)
    assert not rate.requires_grad  # a metric
    # sum_v min(p, q) is the same number
    p, q = torch.softmax(target.double(), -1), torch.softmax(draft.double(), -1)
    torch.testing.assert_close(rate.double(), torch.minimum(p, q).sum(-1)[mask].mean(), rtol=1e-6, atol=1e-6)
    assert torch.isnan(acceptance_rate(draft, target, torch.zeros(B, T, dtype=torch.bool)))
    assert acceptance_rate(target, target).item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- GKD

def trl_generalized_jsd(student, teacher, labels, beta, tau=1.0):
    """TRL's generalized_jsd_loss written out: F.kl_div on log-probabilities, the mixture through a
    logsumexp, plain KLs at beta = 0 / 1, mean over the labels != -100 (batchmean with labels)."""
    s = torch.log_softmax(student.double() / tau, -1)
    t = torch.log_softmax(teacher.double() / tau, -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        mixture = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), 0)
        jsd = (beta * F.kl_div(mixture, t, reduction="none", log_target=True)
               + (1 - beta) * F.kl_div(mixture, s, reduction="none", log_target=True))
    keep = labels != IGNORE
    return jsd[keep].sum() / keep.sum()


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_gkd_matches_trl(beta):
    student, teacher, labels = _batch(4)
    s, t = _leaf(student), _leaf(teacher)
    loss = GKD(beta=beta)(s, t, labels)
    s64 = _leaf(student.double())
    # TRL: logits[:, :-1] against labels[:, 1:]
    expect = trl_generalized_jsd(s64[:, :-1], teacher[:, :-1], labels[:, 1:], beta)
    _check_against(loss, expect, s, s64)
    assert t.grad is None


def test_gkd_temperature_and_sequence_mean():
    student, teacher, labels = _batch(5)
    loss = GKD(beta=0.3, temperature=2.0)(student, teacher, labels)
    torch.testing.assert_close(loss.double(), trl_generalized_jsd(student[:, :-1], teacher[:, :-1],
                                                                   labels[:, 1:], 0.3, tau=2.0),
                               rtol=1e-5, atol=1e-6)
    aligned = _shift(labels)
    per_token = distillspec_per_token(student, teacher, "jsd", beta=0.3) * (aligned != IGNORE)
    expect = (per_token.sum(-1) / (aligned != IGNORE).sum(-1)).mean()
    torch.testing.assert_close(GKD(beta=0.3, sequence_mean=True)(student, teacher, labels).double(), expect,
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ DistiLLM

def distillm_released(student, teacher, aligned, kind, lam=0.1):
    """distillm/losses.py: skewed_forward_kl is the cross-entropy -sum p log(lam p + (1 - lam) q),
    skewed_reverse_kl the KL(q || (1 - lam) p + lam q); mean over labels != -100."""
    p = torch.softmax(teacher.double(), -1)
    q = torch.softmax(student.double(), -1)
    if kind == "skew_fkl":
        per_token = -(p * torch.log(lam * p + (1 - lam) * q)).sum(-1)
    else:
        log_q = torch.log_softmax(student.double(), -1)
        per_token = (q * (log_q - torch.log((1 - lam) * p + lam * q))).sum(-1)
    return _token_mean(per_token, aligned)


@pytest.mark.parametrize("divergence", ["skew_fkl", "skew_rkl"])
def test_distillm_matches_released_code(divergence):
    student, teacher, labels = _batch(6)
    s, t = _leaf(student), _leaf(teacher)
    loss = DistiLLM(divergence)(s, t, labels)
    s64 = _leaf(student.double())
    _check_against(loss, distillm_released(s64, teacher, _shift(labels), divergence), s, s64)
    assert t.grad is None


def test_distillm_paper_value_differs_by_teacher_entropy():
    student, teacher, labels = _batch(7)
    aligned = _shift(labels)
    s_code, s_paper = _leaf(student), _leaf(student)
    code = DistiLLM("skew_fkl", alpha=0.2)(s_code, teacher, labels)
    paper = DistiLLM("skew_fkl", alpha=0.2, cross_entropy_value=False)(s_paper, teacher, labels)
    p = torch.softmax(teacher.double(), -1)
    entropy = -(p * p.log()).sum(-1)
    kl = (p * (p.log() - torch.log(0.2 * p + 0.8 * torch.softmax(student.double(), -1)))).sum(-1)
    torch.testing.assert_close(paper.double(), _token_mean(kl, aligned), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((code - paper).double(), _token_mean(entropy, aligned), rtol=1e-5, atol=1e-6)
    code.backward()
    paper.backward()
    torch.testing.assert_close(s_code.grad, s_paper.grad)  # same gradient
    # with num_items_in_batch the entropy is normalized like the loss
    code = DistiLLM("skew_fkl", alpha=0.2)(student, teacher, labels, num_items_in_batch=40)
    expect = ((kl + entropy) * (aligned != IGNORE)).sum() / 40
    torch.testing.assert_close(code.double(), expect, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- AKL

def akl_released(student, teacher, aligned, mu=0.5):
    """AKL.py written out: get_ratio (teacher-sorted cumulative p > mu is tail, top-1 forced head,
    |p - q| summed on each part, the student's q detached) and the two weighted get_kl terms."""
    lp = torch.log_softmax(teacher.double(), -1)
    p = lp.exp()
    lq = torch.log_softmax(student.double(), -1)
    q = lq.exp()
    p_sorted, order = p.sort(-1, descending=True)
    errors = (p_sorted - q.detach().gather(-1, order)).abs()
    tail = p_sorted.cumsum(-1) > mu
    tail[..., 0] = False
    s1 = errors.masked_fill(tail, 0).sum(-1)
    s2 = errors.masked_fill(~tail, 0).sum(-1)
    fkl = (p * (lp - lq)).sum(-1)
    rkl = (q * (lq - lp)).sum(-1)
    return _token_mean(s1 / (s1 + s2) * fkl + s2 / (s1 + s2) * rkl, aligned)


@pytest.mark.parametrize("mu", [0.5, 0.2, 0.8])
def test_akl_matches_released_code(mu):
    student, teacher, labels = _batch(8)
    s, t = _leaf(student), _leaf(teacher)
    loss = AKL(mu=mu)(s, t, labels)
    s64 = _leaf(student.double())
    _check_against(loss, akl_released(s64, teacher, _shift(labels), mu), s, s64)
    assert t.grad is None


def test_akl_normalizer_and_unshifted_labels():
    student, teacher, labels = _batch(9)
    loss = AKL(shift_labels=False)(student, teacher, labels, num_items_in_batch=30)
    expect = akl_released(student, teacher, labels) * (labels != IGNORE).sum() / 30
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-6)


def test_akl_head_tail_split_on_hand_made_distributions():
    # teacher p sorted: id1 .40, id3 .25, id4 .20, id2 .10, id0 .05 -> cumulative .40 .65 .85 .95 1
    p = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.20], dtype=torch.float64)
    q = torch.tensor([0.25, 0.10, 0.25, 0.15, 0.25], dtype=torch.float64)
    gap = (p - q).abs()  # .20 .30 .15 .10 .05
    head_ids = {0.0: [1], 0.3: [1], 0.5: [1], 0.7: [1, 3], 0.9: [1, 3, 4]}  # top-1 always in
    for mu, ids in head_ids.items():
        g_head, g_tail = akl_gaps(q.log(), p.log(), mu=mu)
        torch.testing.assert_close(g_head, gap[ids].sum())
        torch.testing.assert_close(g_tail, gap.sum() - gap[ids].sum())
    # the head runs until the cumulative p *exceeds* mu: a cumulative sum equal to mu stays in
    # (mu taken bit for bit from the same float64 softmax and cumsum the split computes)
    at_boundary = torch.softmax(p.log() / 1.0, -1).sort(descending=True).values.cumsum(-1)[1].item()
    g_head, _ = akl_gaps(q.log(), p.log(), mu=at_boundary)
    torch.testing.assert_close(g_head, gap[[1, 3]].sum())
    # a teacher whose top-1 alone exceeds mu: the head is that one id
    peaked = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    flat = torch.full((3,), 1 / 3, dtype=torch.float64)
    g_head, g_tail = akl_gaps(flat.log(), peaked.log(), mu=0.5)
    torch.testing.assert_close(g_head, (peaked - flat)[0].abs())
    # the loss on the hand-made row: (g_h FKL + g_t RKL) / (g_h + g_t)
    g_head, g_tail = akl_gaps(q.log(), p.log(), mu=0.7)
    fkl, rkl = (p * (p / q).log()).sum(), (q * (q / p).log()).sum()
    loss = AKL(mu=0.7, shift_labels=False)(q.log()[None], p.log()[None])
    torch.testing.assert_close(loss, (g_head * fkl + g_tail * rkl) / (g_head + g_tail))


def test_akl_equal_distributions_and_padding():
    _, teacher, labels = _batch(10)
    student = teacher.clone()
    student[1, 6] = float("nan")  # garbage at a position that does not count
    labels[1, 7] = IGNORE  # position 6 scores label 7
    loss = AKL()(student.requires_grad_(), teacher, labels)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # p == q: no 0 / 0 in the weights
    loss.backward()
    assert torch.isfinite(student.grad).all()


# --------------------------------------------------------------------------------------------- Swing

def swing_reference(student, teacher, scores, labels, *, low, high, noise_scale, seed):
    """Per-token tau = low + (high - low) s_{t+1}; soft targets softmax(z_t / tau + sigma eps),
    i.e. p * exp(sigma eps) renormalized; KL(p~ || softmax(z_s / tau)), mean over counted tokens."""
    aligned_scores = F.pad(scores[:, 1:], (0, 1), value=0.0).double()
    tau = (low + (high - low) * aligned_scores).unsqueeze(-1)
    eps = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    log_target = torch.log_softmax(teacher.double() / tau + noise_scale * eps.double(), -1)
    log_q = torch.log_softmax(student.double() / tau, -1)
    return _token_mean((log_target.exp() * (log_target - log_q)).sum(-1), _shift(labels))


def test_swing_matches_formula():
    student, teacher, labels = _batch(11)
    scores = torch.rand(B, T, generator=torch.Generator().manual_seed(12))
    swing = SwingDistillation(temperature_map=LinearTemperature(1.0, 3.0), noise_scale=0.3)
    s, t = _leaf(student), _leaf(teacher)
    loss = swing(s, t, scores, labels, generator=torch.Generator().manual_seed(7))
    s64 = _leaf(student.double())
    expect = swing_reference(s64, teacher, scores, labels, low=1.0, high=3.0, noise_scale=0.3, seed=7)
    _check_against(loss, expect, s, s64)
    assert t.grad is None


def test_swing_temperature_map():
    student, teacher, labels = _batch(13)
    scores = torch.tensor([0.0, 0.5, 1.0, 0.25]).repeat(B, 2)
    swing = SwingDistillation(noise_scale=0.0)  # default map: 1 at s = 0, 4 at s = 1
    taus = swing.token_temperatures(scores, student)
    torch.testing.assert_close(taus[0, :4], torch.tensor([2.5, 4.0, 1.75, 1.0]))  # shifted by one token
    assert taus[0, -1] == 1.0  # the last position gets score 0
    unshifted = SwingDistillation(noise_scale=0.0, shift_labels=False).token_temperatures(scores, student)
    torch.testing.assert_close(unshifted[0, :4], torch.tensor([1.0, 2.5, 4.0, 1.75]))
    # without noise, Swing is kd_loss with the mapped per-token temperatures
    expect = swing_reference(student, teacher, scores, labels, low=1.0, high=4.0, noise_scale=0.0, seed=0)
    torch.testing.assert_close(swing(student, teacher, scores, labels).double(), expect, rtol=1e-5, atol=1e-6)
    constant = SwingDistillation(temperature_map=lambda s: torch.full_like(s, 2.0), noise_scale=0.0)
    loss = constant(student, teacher, scores, labels)
    fixed_temperature = _token_mean(distillspec_per_token(student, teacher, "fkl", tau=2.0), _shift(labels))
    torch.testing.assert_close(loss.double(), fixed_temperature, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="temperature_map"):
        SwingDistillation(temperature_map=lambda s: s - 0.5)(student, teacher, scores, labels)


def test_swing_noise_is_renormalized_and_reproducible():
    _, teacher, _ = _batch(14)
    teacher[0, 1, :5] = float("-inf")  # ids the teacher rules out
    scores = torch.rand(B, T, generator=torch.Generator().manual_seed(15))
    swing = SwingDistillation(noise_scale=0.5)
    targets = swing.soft_targets(teacher, scores, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(targets.sum(-1), torch.ones(B, T))
    assert (targets[0, 1, :5] == 0).all() and (targets >= 0).all()
    # p * exp(sigma eps) / Z at the mapped temperature
    tau = swing.token_temperatures(scores, teacher).double().unsqueeze(-1)
    eps = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(3)).double()
    unnormalized = torch.softmax(teacher.double() / tau, -1) * torch.exp(0.5 * eps)
    torch.testing.assert_close(targets.double(), unnormalized / unnormalized.sum(-1, keepdim=True),
                               rtol=1e-5, atol=1e-7)
    again = swing.soft_targets(teacher, scores, generator=torch.Generator().manual_seed(3))
    other = swing.soft_targets(teacher, scores, generator=torch.Generator().manual_seed(4))
    assert torch.equal(targets, again) and not torch.allclose(targets, other)
    student = teacher.nan_to_num(neginf=0.0) + 1.0
    first = swing(student, teacher, scores, generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, swing(student, teacher, scores, generator=torch.Generator().manual_seed(9)))
    assert first != swing(student, teacher, scores, generator=torch.Generator().manual_seed(10))


# ----------------------------------------------------------------------------------- offline top-k

def test_topk_teacher_is_what_a_server_returns():
    _, teacher, _ = _batch(16)
    ids, logprobs = topk_teacher(teacher, 6)
    full = torch.log_softmax(teacher.double(), -1)
    top = full.topk(6, -1)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(logprobs.double(), top.values, rtol=1e-6, atol=1e-6)
    assert (logprobs[..., :-1] >= logprobs[..., 1:]).all()


def offline_topk_reference(student, ids, logprobs, aligned, divergence, tau, renormalize):
    """Forward KL of the stored teacher against the student's full-vocabulary softmax (axolotl's
    forward_kl.loss, DistillKit's sparse_kl_div), or reverse KL on the K support; token mean."""
    lp = torch.log_softmax(logprobs.double() / tau, -1) if renormalize else logprobs.double()
    if divergence == "fkl":
        lq = torch.log_softmax(student.double() / tau, -1).gather(-1, ids)
        per_token = (lp.exp() * (lp - lq)).sum(-1)
    else:
        lq = torch.log_softmax(student.double().gather(-1, ids) / tau, -1)
        per_token = (lq.exp() * (lq - lp)).sum(-1)
    return _token_mean(per_token, aligned)


@pytest.mark.parametrize("divergence,tau,renormalize", [
    ("fkl", 1.0, True), ("fkl", 2.0, True), ("fkl", 1.0, False), ("rkl", 1.5, True),
])
def test_offline_topk_matches_formula(divergence, tau, renormalize):
    student, teacher, labels = _batch(17)
    ids, logprobs = topk_teacher(teacher, 5)
    s, lp = _leaf(student), _leaf(logprobs)
    loss = OfflineTopKKD(divergence, temperature=tau, renormalize=renormalize)(s, ids, lp, labels)
    s64 = _leaf(student.double())
    expect = offline_topk_reference(s64, ids, logprobs, _shift(labels), divergence, tau, renormalize)
    _check_against(loss, expect, s, s64)
    assert lp.grad is None


def test_offline_topk_normalizer_and_t2_scale():
    student, teacher, labels = _batch(18)
    ids, logprobs = topk_teacher(teacher, 4)
    aligned = _shift(labels)
    mean = offline_topk_reference(student, ids, logprobs, aligned, "fkl", 2.0, True)
    summed = mean * (aligned != IGNORE).sum()
    kd = OfflineTopKKD(temperature=2.0, t2_scale=True)
    loss = kd(student, ids, logprobs, labels, num_items_in_batch=64)
    torch.testing.assert_close(loss.double(), 4.0 * summed / 64, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ dtypes, Triton and GPU backends

def _every_method(student, teacher, labels):
    """Every method's loss on one batch (Swing without noise, so that devices can be compared)."""
    scores = torch.linspace(0, 1, student.shape[1], device=student.device).expand(student.shape[:-1])
    ids, logprobs = topk_teacher(teacher, 5)
    return {
        "token_kd": TokenKD("jsd", temperature=1.5, beta=0.3)(student, teacher, labels),
        "gkd": GKD(beta=0.7)(student, teacher, labels),
        "distillm": DistiLLM()(student, teacher, labels),  # the entropy sweep reads a stride-0 row
        "akl": AKL()(student, teacher, labels),
        "swing": SwingDistillation(noise_scale=0.0)(student, teacher, scores, labels),
        "offline_topk": OfflineTopKKD(temperature=2.0)(student, ids, logprobs, labels),
        "acceptance_rate": acceptance_rate(student, teacher, labels != IGNORE),
    }


def test_bfloat16_inputs_compute_in_float32():
    student, teacher, labels = _batch(21, dtype=torch.bfloat16)
    low = _every_method(student, teacher, labels)
    high = _every_method(student.float(), teacher.float(), labels)  # the same values, in float32
    for name, loss in low.items():
        assert loss.dtype == torch.float32, name
        torch.testing.assert_close(loss, high[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", [
    pytest.param("triton", marks=[
        pytest.mark.triton_interpret,
        # the interpreter evaluates masked-off lanes too (their NaNs are discarded by tl.where)
        pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    ]),
    pytest.param("cuda", marks=pytest.mark.gpu),
])
def test_backends_match_the_cpu_kernels(backend):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and not (interpreting or torch.cuda.is_available()):
        pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1")
    device = "cpu" if interpreting else "cuda"
    student, teacher, labels = _batch(22)
    expect = _every_method(student, teacher, labels)
    with kdops.use_backend(backend):
        got = _every_method(student.to(device), teacher.to(device), labels.to(device))
    for name, loss in got.items():
        torch.testing.assert_close(loss.cpu(), expect[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_swing_noise_on_a_cuda_generator():
    student, teacher, labels = (x.cuda() for x in _batch(23))
    scores = torch.rand(B, T, device="cuda")
    swing = SwingDistillation(noise_scale=0.3)
    first = swing(student, teacher, scores, labels, generator=torch.Generator(device="cuda").manual_seed(5))
    again = swing(student, teacher, scores, labels, generator=torch.Generator(device="cuda").manual_seed(5))
    assert torch.equal(first, again)
    targets = swing.soft_targets(teacher, scores, generator=torch.Generator(device="cuda").manual_seed(5))
    tau = swing.token_temperatures(scores, student).double()[..., None]
    log_q = torch.log_softmax(student.double() / tau, -1)
    per_token = (targets.double() * (targets.double().log() - log_q)).sum(-1)
    torch.testing.assert_close(first.double().cpu(), _token_mean(per_token, _shift(labels)).cpu(),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- gradcheck, bad input

@pytest.mark.parametrize("make_loss", [
    lambda t, ids, lp: (lambda s: TokenKD("jsd", temperature=1.5, beta=0.3)(s, t)),
    lambda t, ids, lp: (lambda s: GKD(beta=0.7)(s, t)),
    lambda t, ids, lp: (lambda s: DistiLLM("skew_rkl", alpha=0.3)(s, t)),
    lambda t, ids, lp: (lambda s: SwingDistillation(noise_scale=0.2)(
        s, t, torch.linspace(0, 1, s.shape[1], dtype=s.dtype).expand(s.shape[:-1]),
        generator=torch.Generator().manual_seed(0))),
    lambda t, ids, lp: (lambda s: OfflineTopKKD(temperature=2.0)(s, ids, lp)),
], ids=["token_kd", "gkd", "distillm", "swing", "offline_topk"])
def test_gradcheck(make_loss):
    g = torch.Generator().manual_seed(19)
    student = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    ids, logprobs = topk_teacher(teacher, 3)
    assert torch.autograd.gradcheck(make_loss(teacher, ids, logprobs), (student,))


def test_bad_arguments():
    student, teacher, labels = _batch(20)
    scores = torch.rand(B, T)
    bad_constructions = [
        (lambda: TokenKD("skew_fkl"), "divergence"),
        (lambda: TokenKD(temperature=0.0), "temperature"),
        (lambda: TokenKD(beta=1.5), "beta"),
        (lambda: GKD(beta=-0.1), "beta"),
        (lambda: DistiLLM("fkl"), "divergence"),
        (lambda: DistiLLM(alpha=2.0), "alpha"),
        (lambda: AKL(mu=1.5), "mu"),
        (lambda: AKL(temperature=-1.0), "temperature"),
        (lambda: SwingDistillation(noise_scale=-0.1), "noise_scale"),
        (lambda: LinearTemperature(low=0.0), "temperature"),
        (lambda: OfflineTopKKD("kl"), "divergence"),
        (lambda: topk_teacher(teacher, 0), "k"),
        (lambda: topk_teacher(teacher, V + 1), "k"),
        (lambda: acceptance_rate(student, teacher, temperature=0.0), "temperature"),
    ]
    for make, name in bad_constructions:
        with pytest.raises(ValueError, match=name):
            make()
    bad_calls = [
        (lambda: TokenKD(sequence_mean=True)(student.reshape(-1, V), teacher.reshape(-1, V)),
         "sequence_mean"),
        (lambda: TokenKD(sequence_mean=True)(student, teacher, labels, num_items_in_batch=10),
         "num_items_in_batch"),
        (lambda: AKL()(student, teacher, labels[:, :-1]), "labels"),
        (lambda: AKL()(student, teacher[..., :-1]), "teacher_logits"),
        (lambda: AKL()(student, teacher, labels, num_items_in_batch=0), "normalizer"),
        (lambda: SwingDistillation()(student, teacher, scores * 2, labels), "privacy_scores"),
        (lambda: SwingDistillation()(student, teacher, scores[:, :-1], labels), "privacy_scores"),
        (lambda: GKD()(student, teacher.double(), labels), "teacher_logits"),
    ]
    for call, name in bad_calls:
        with pytest.raises(ValueError, match=name):
            call()
