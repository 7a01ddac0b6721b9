"""Classification-style KD methods (kdops.methods: HintonKD, DKD, NKD, USKD, PSKD, DIST, logit
standardization, CTKD, DHO, MultiTeacherKD) against float64 transcriptions of the published
formulas written out here in plain PyTorch, independently of the modules under test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdops.methods.ctkd import CTKD
from kdops.methods.dho import DHO, DualHead
from kdops.methods.dist import DIST
from kdops.methods.dkd import DKD
from kdops.methods.hinton import HintonKD
from kdops.methods.logit_standardization import (LogitStandardized, LogitStandardizedDKD, LogitStandardizedKD,
                                                 standardize_logits)
from kdops.methods.multi_teacher import MultiTeacherKD
from kdops.methods.nkd import NKD
from kdops.methods.pskd import PSKD
from kdops.methods.uskd import USKD

CLASS_COUNTS = [3, 10, 101]  # odd counts and a tiny one


def _batch(seed, n, c, *, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, c, generator=g) * scale).to(dtype)
    teacher = (torch.randn(n, c, generator=g) * scale).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    return student, teacher, labels


def _check_against(method_call, reference, student, teacher, labels, *, rtol=1e-5, atol=1e-6):
    """The method's loss and student gradient against the float64 reference's (autograd)."""
    s = student.detach().clone().requires_grad_()
    loss = method_call(s, teacher, labels)
    loss.backward()
    s64 = student.detach().double().clone().requires_grad_()
    t64 = [t.double() for t in teacher] if isinstance(teacher, list) else teacher.double()
    expect = reference(s64, t64, labels)
    expect.backward()
    assert loss.dim() == 0
    torch.testing.assert_close(loss.double(), expect, rtol=rtol, atol=atol)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=rtol, atol=atol)


def _teacher_gets_no_gradient(method_call, student, teacher, labels):
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    method_call(s, t, labels).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# ---- float64 transcriptions --------------------------------------------------------------------

def ref_ce(z, y):
    return -torch.log_softmax(z, 1).gather(1, y[:, None]).mean()


def ref_hinton(z_s, z_t, y, tau, w_ce, w_kd):
    p_t = torch.softmax(z_t / tau, 1)
    kl = (p_t * (torch.log_softmax(z_t / tau, 1) - torch.log_softmax(z_s / tau, 1))).sum(1).mean()
    return w_ce * ref_ce(z_s, y) + w_kd * tau ** 2 * kl


def ref_dkd(z_s, z_t, y, epoch, alpha, beta, tau, warmup, w_ce=1.0):
    """mdistiller's dkd_loss, line by line: two bins from summed probabilities, -1000 shift."""
    n = z_s.shape[0]
    gt = torch.zeros_like(z_s).scatter_(1, y[:, None], 1).bool()
    p_s, p_t = torch.softmax(z_s / tau, 1), torch.softmax(z_t / tau, 1)

    def bins(p):
        return torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)

    b_s, b_t = bins(p_s), bins(p_t)
    tckd = (b_t * (b_t.log() - b_s.log())).sum() * tau ** 2 / n
    q_t = torch.softmax(z_t / tau - 1000.0 * gt, 1)
    log_q_s = torch.log_softmax(z_s / tau - 1000.0 * gt, 1)
    nckd = torch.where(q_t > 0, q_t * (q_t.log() - log_q_s), 0).sum() * tau ** 2 / n
    return w_ce * ref_ce(z_s, y) + min(epoch / warmup, 1.0) * (alpha * tckd + beta * nckd)


def ref_nkd(z_s, z_t, y, tau, gamma, w_ce=1.0):
    """NKDLoss of yzd-v/cls_KD (after the fix) plus the distiller's CE: target classes removed
    by boolean indexing."""
    n, c = z_s.shape
    s_t = torch.log_softmax(z_s, 1).gather(1, y[:, None])
    t_t = torch.softmax(z_t, 1).gather(1, y[:, None]).detach()
    loss_t = -(t_t * s_t).mean()
    keep = torch.ones_like(z_s).scatter_(1, y[:, None], 0).bool()
    S = torch.log_softmax(z_s[keep].reshape(n, c - 1) / tau, 1)
    T = torch.softmax(z_t[keep].reshape(n, c - 1) / tau, 1)
    loss_non = -gamma * tau ** 2 * (T * S).sum(1).mean()
    return w_ce * ref_ce(z_s, y) + loss_t + loss_non


def ref_pearson_rows(a, b):
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)


def ref_dist(z_s, z_t, y, tau, beta, gamma, w_ce, w_kd):
    p_s, p_t = torch.softmax(z_s / tau, 1), torch.softmax(z_t / tau, 1)
    inter = 1 - ref_pearson_rows(p_s, p_t).mean()
    intra = 1 - ref_pearson_rows(p_s.T, p_t.T).mean()
    return w_ce * ref_ce(z_s, y) + w_kd * tau ** 2 * (beta * inter + gamma * intra)


# ---- Hinton KD ----------------------------------------------------------------------------------

@pytest.mark.parametrize("c", CLASS_COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hinton_matches_formula(c, dtype):
    student, teacher, labels = _batch(c, 13, c, dtype=dtype)
    kd = HintonKD()
    assert (kd.temperature, kd.w_ce, kd.w_kd) == (4.0, 0.1, 0.9)  # mdistiller CIFAR defaults
    _check_against(kd, lambda s, t, y: ref_hinton(s, t, y, 4.0, 0.1, 0.9), student, teacher, labels)
    imagenet = HintonKD(temperature=1.0, w_ce=0.5, w_kd=0.5)
    _check_against(imagenet, lambda s, t, y: ref_hinton(s, t, y, 1.0, 0.5, 0.5), student, teacher, labels)


def test_hinton_unlabeled_rows_get_kd_only():
    student, teacher, labels = _batch(1, 9, 5, dtype=torch.float64)
    labels[[1, 4, 6]] = -100
    kd = HintonKD(temperature=2.0, w_ce=0.3, w_kd=0.7)
    loss = kd(student, teacher, labels)
    keep = labels != -100
    kl = ref_hinton(student, teacher, labels.clamp_min(0), 2.0, 0.0, 1.0)
    expect = 0.3 * ref_ce(student[keep], labels[keep]) + 0.7 * kl
    torch.testing.assert_close(loss, expect)
    all_unlabeled = torch.full_like(labels, -100)
    torch.testing.assert_close(kd(student, teacher, all_unlabeled), 0.7 * kl)


# ---- DKD ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("c", CLASS_COUNTS)
@pytest.mark.parametrize("epoch", [1, 7.5, 40])
def test_dkd_matches_released_code(c, epoch):
    student, teacher, labels = _batch(10 + c, 11, c)
    dkd = DKD()
    assert (dkd.alpha, dkd.beta, dkd.temperature, dkd.warmup, dkd.w_ce) == (1.0, 8.0, 4.0, 20.0, 1.0)
    _check_against(lambda s, t, y: dkd(s, t, y, epoch=epoch),
                   lambda s, t, y: ref_dkd(s, t, y, epoch, 1.0, 8.0, 4.0, 20.0),
                   student, teacher, labels)
    other = DKD(alpha=0.5, beta=2.0, temperature=1.0, warmup=1, w_ce=0.3)
    _check_against(lambda s, t, y: other(s, t, y, epoch=epoch),
                   lambda s, t, y: ref_dkd(s, t, y, epoch, 0.5, 2.0, 1.0, 1.0, 0.3),
                   student, teacher, labels)


def test_dkd_paper_nckd_and_terms():
    student, teacher, labels = _batch(3, 10, 9, dtype=torch.float64)
    dkd = DKD(target_shift=None)
    labeled = torch.ones_like(labels, dtype=torch.bool)
    tckd, nckd = dkd.decoupled_terms(student, teacher, labels, labeled)
    tau = 4.0
    keep = torch.ones_like(student).scatter_(1, labels[:, None], 0).bool()
    s_hat = torch.log_softmax(student[keep].reshape(10, 8) / tau, 1)
    t_hat = torch.log_softmax(teacher[keep].reshape(10, 8) / tau, 1)
    torch.testing.assert_close(nckd, tau ** 2 * (t_hat.exp() * (t_hat - s_hat)).sum(1).mean())
    p_s, p_t = torch.softmax(student / tau, 1), torch.softmax(teacher / tau, 1)
    b_s = torch.stack([p_s.gather(1, labels[:, None])[:, 0], p_s[keep].reshape(10, 8).sum(1)], 1)
    b_t = torch.stack([p_t.gather(1, labels[:, None])[:, 0], p_t[keep].reshape(10, 8).sum(1)], 1)
    torch.testing.assert_close(tckd, tau ** 2 * (b_t * (b_t.log() - b_s.log())).sum(1).mean())
    assert dkd.warmup_factor(5) == 0.25 and dkd.warmup_factor(25) == 1.0
    torch.testing.assert_close(dkd(student, teacher, labels, epoch=5),
                               ref_ce(student, labels) + 0.25 * (tckd + 8 * nckd))


def test_dkd_unlabeled_rows_drop_out():
    student, teacher, labels = _batch(9, 12, 7, dtype=torch.float64)
    labels[[0, 5, 11]] = -100
    keep = labels != -100
    dkd = DKD(temperature=2.0)
    torch.testing.assert_close(dkd(student, teacher, labels, epoch=30),
                               ref_dkd(student[keep], teacher[keep], labels[keep], 30, 1.0, 8.0, 2.0, 20.0))
    zero = dkd(student, teacher, torch.full_like(labels, -100), epoch=30)
    assert zero.item() == 0.0


def test_dkd_epoch_is_required():
    student, teacher, labels = _batch(0, 4, 5)
    with pytest.raises(TypeError):
        DKD()(student, teacher, labels)
    with pytest.raises(ValueError, match="epoch"):
        DKD()(student, teacher, labels, epoch=-1)


# ---- NKD ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("c", CLASS_COUNTS + [2])
def test_nkd_matches_released_code(c):
    student, teacher, labels = _batch(20 + c, 12, c)
    nkd = NKD()
    assert (nkd.temperature, nkd.gamma, nkd.w_ce) == (1.0, 1.5, 1.0)
    _check_against(nkd, lambda s, t, y: ref_nkd(s, t, y, 1.0, 1.5), student, teacher, labels)
    cifar = NKD(temperature=3.0, gamma=3.5)
    _check_against(cifar, lambda s, t, y: ref_nkd(s, t, y, 3.0, 3.5), student, teacher, labels)


# ---- DIST ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("c", CLASS_COUNTS)
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_matches_released_code(c, tau):
    student, teacher, labels = _batch(30 + c, 16, c)
    dist = DIST(temperature=tau)
    assert (dist.beta, dist.gamma, dist.w_ce, dist.w_kd) == (1.0, 1.0, 1.0, 2.0)
    _check_against(dist, lambda s, t, y: ref_dist(s, t, y, tau, 1.0, 1.0, 1.0, 2.0), student, teacher, labels)
    weighted = DIST(temperature=tau, beta=0.5, gamma=2.0, w_ce=0.0, w_kd=1.0)
    _check_against(weighted, lambda s, t, y: ref_dist(s, t, y, tau, 0.5, 2.0, 0.0, 1.0), student, teacher, labels)


def test_dist_couples_the_batch():
    """The intra-class term correlates columns across rows: the loss of a batch is not the mean
    of its halves' losses."""
    student, teacher, labels = _batch(4, 12, 6, dtype=torch.float64)
    dist = DIST(w_ce=0.0)
    whole = dist(student, teacher, labels)
    halves = (dist(student[:6], teacher[:6], labels[:6]) + dist(student[6:], teacher[6:], labels[6:])) / 2
    assert not torch.allclose(whole, halves)


# ---- teacher stays frozen -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hinton", "dkd", "nkd", "dist"])
def test_teacher_methods_leave_the_teacher_frozen(name):
    student, teacher, labels = _batch(5, 8, 7)
    call = {
        "hinton": HintonKD(),
        "dkd": lambda s, t, y: DKD()(s, t, y, epoch=30),
        "nkd": NKD(),
        "dist": DIST(),
    }[name]
    _teacher_gets_no_gradient(call, student, teacher, labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    """Low-precision logits: float32 loss, gradients in the logits' dtype, close to float64."""
    student, teacher, labels = _batch(6, 8, 11, dtype=dtype)
    for call, ref in [
        (HintonKD(), lambda s, t, y: ref_hinton(s, t, y, 4.0, 0.1, 0.9)),
        (lambda s, t, y: DKD()(s, t, y, epoch=30), lambda s, t, y: ref_dkd(s, t, y, 30, 1.0, 8.0, 4.0, 20.0)),
        (NKD(), lambda s, t, y: ref_nkd(s, t, y, 1.0, 1.5)),
        (DIST(), lambda s, t, y: ref_dist(s, t, y, 1.0, 1.0, 1.0, 1.0, 2.0)),
    ]:
        s = student.clone().requires_grad_()
        loss = call(s, teacher, labels)
        loss.backward()
        assert loss.dtype == torch.float32 and s.grad.dtype == dtype
        torch.testing.assert_close(loss.double(), ref(student.double(), teacher.double(), labels),
                                   rtol=1e-4, atol=1e-5)


# ---- bad arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize("make, name", [
    (lambda: HintonKD(temperature=0), "temperature"),
    (lambda: HintonKD(w_ce=-1), "w_ce"),
    (lambda: HintonKD(w_kd=float("nan")), "w_kd"),
    (lambda: DKD(alpha=-0.1), "alpha"),
    (lambda: DKD(warmup=0), "warmup"),
    (lambda: DKD(temperature=True), "temperature"),
    (lambda: NKD(gamma=-1), "gamma"),
    (lambda: NKD(temperature=float("inf")), "temperature"),
    (lambda: DIST(beta="1"), "beta"),
    (lambda: DIST(temperature=-2), "temperature"),
])
def test_bad_hyperparameters(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("call", [
    HintonKD(), NKD(), DIST(), lambda s, t, y: DKD()(s, t, y, epoch=1),
])
def test_bad_inputs(call):
    student, teacher, labels = _batch(7, 6, 5)
    with pytest.raises(ValueError, match="teacher_logits"):
        call(student, teacher[:, :4], labels)
    with pytest.raises(ValueError, match="teacher_logits"):
        call(student, teacher.double(), labels)
    with pytest.raises(ValueError, match="student_logits"):
        call(student[None], teacher[None], labels)
    with pytest.raises(ValueError, match="labels"):
        call(student, teacher, labels[:5])
    with pytest.raises(ValueError, match="labels"):
        call(student, teacher, labels.float())
    with pytest.raises(ValueError, match="labels"):
        call(student, teacher, torch.full_like(labels, 5))
    with pytest.raises(ValueError, match="labels"):
        call(student, teacher, torch.full_like(labels, -3))


def test_target_split_methods_need_two_classes():
    student, teacher, labels = _batch(8, 4, 1)
    with pytest.raises(ValueError, match="C >= 2"):
        NKD()(student, teacher, labels)
    with pytest.raises(ValueError, match="C >= 2"):
        DKD()(student, teacher, labels, epoch=1)


# ---- logit standardization ----------------------------------------------------------------------

def ref_standardize(z):
    return (z - z.mean(1, keepdim=True)) / (1e-7 + z.std(1, unbiased=True, keepdim=True))


def test_standardize_logits_is_the_z_score():
    z = _batch(40, 6, 11, dtype=torch.float64)[0]
    out = standardize_logits(z)
    torch.testing.assert_close(out, ref_standardize(z))
    torch.testing.assert_close(out.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.std(1), torch.ones(6, dtype=torch.float64))
    assert standardize_logits(z.to(torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="at least 2"):
        standardize_logits(z[:, :1])


@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_logit_standardized_kd_and_dkd_match_released_code(c):
    student, teacher, labels = _batch(50 + c, 10, c, scale=5.0)
    kd = LogitStandardizedKD()
    assert (kd.base.temperature, kd.base.w_ce, kd.base.w_kd) == (2.0, 0.1, 9.0)
    _check_against(kd, lambda s, t, y: 0.1 * ref_ce(s, y) + ref_hinton(ref_standardize(s), ref_standardize(t), y,
                                                                         2.0, 0.0, 9.0),
                   student, teacher, labels)
    dkd = LogitStandardizedDKD()
    assert (dkd.base.alpha, dkd.base.beta, dkd.base.temperature) == (9.0, 72.0, 2.0)
    _check_against(lambda s, t, y: dkd(s, t, y, epoch=4),
                   lambda s, t, y: ref_ce(s, y) + ref_dkd(ref_standardize(s), ref_standardize(t), y, 4,
                                                          9.0, 72.0, 2.0, 20.0, w_ce=0.0),
                   student, teacher, labels)
    _teacher_gets_no_gradient(kd, student, teacher, labels)


def test_logit_standardization_wraps_ctkd_and_rejects_other_modules():
    student, teacher, labels = _batch(51, 6, 5)
    wrapped = LogitStandardized(CTKD())
    s = student.clone().requires_grad_()
    wrapped(s, teacher, labels, epoch=3).backward()
    assert s.grad is not None and wrapped.base.theta.grad is not None
    with pytest.raises(ValueError, match="base"):
        LogitStandardized(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="eps"):
        LogitStandardizedKD(eps=-1.0)


# ---- CTKD ---------------------------------------------------------------------------------------

def ref_ctkd_loss(z_s, z_t, y, theta, w_ce=0.1, w_kd=0.9):
    tau = 1.0 + 20.0 * torch.sigmoid(theta)
    log_q = torch.log_softmax(z_s / tau, 1)
    p = torch.softmax(z_t / tau, 1)
    kl = (p * (p.log() - log_q)).sum(1).mean() * tau * tau
    return w_ce * ref_ce(z_s, y) + w_kd * kl


@pytest.mark.parametrize("c", CLASS_COUNTS)
@pytest.mark.parametrize("epoch, factor", [(0, 0.0), (1, (math.cos(math.pi / 10) + 1) / 2 - 1), (5, -0.5),
                                           (10, -1.0), (37, -1.0)])
def test_ctkd_matches_released_code_and_reverses_the_temperature_gradient(c, epoch, factor):
    student, teacher, labels = _batch(60 + c, 9, c)
    ctkd = CTKD()
    with torch.no_grad():
        ctkd.theta.fill_(0.3)
    assert ctkd.reversal_factor(epoch) == pytest.approx(factor, abs=1e-12)
    s = student.clone().requires_grad_()
    loss = ctkd(s, teacher, labels, epoch=epoch)
    loss.backward()
    s64 = student.double().requires_grad_()
    theta64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    expect = ref_ctkd_loss(s64, teacher.double(), labels, theta64)
    expect.backward()
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-7)
    # the reversal layer scales the temperature's gradient by lambda: reversed at full ramp
    torch.testing.assert_close(ctkd.theta.grad.double(), factor * theta64.grad, rtol=1e-4, atol=1e-9)
    if epoch >= 10:
        assert theta64.grad.abs() > 0 and torch.sign(ctkd.theta.grad) == -torch.sign(theta64.grad)


def test_ctkd_temperature_range_and_teacher():
    ctkd = CTKD()
    assert ctkd.theta.item() == 1.0  # the code's initialization
    tau = ctkd.temperature(3)
    assert tau.item() == pytest.approx(1 + 20 / (1 + math.exp(-1.0)))
    student, teacher, labels = _batch(61, 6, 5)
    _teacher_gets_no_gradient(lambda s, t, y: ctkd(s, t, y, epoch=12), student, teacher, labels)


# ---- DHO ----------------------------------------------------------------------------------------

def ref_dho(z_ce, z_kd, z_t, y, tau=2.0, w_ce=0.5, w_kd=0.5):
    """The code's loss on a labeled batch and an unlabeled batch (label -100 marks the latter)."""
    lab = y != -100

    def batchmean_kl(s, t):
        p = torch.softmax(t / tau, 1)
        return (p * (p.log() - torch.log_softmax(s / tau, 1))).sum() / s.shape[0] * tau * tau

    ce = F.cross_entropy(z_ce[lab], y[lab])
    return w_ce * ce + w_kd * (batchmean_kl(z_kd[lab], z_t[lab]) + batchmean_kl(z_kd[~lab], z_t[~lab]))


@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_dho_loss_matches_released_code(c):
    g = torch.Generator().manual_seed(70 + c)
    z_ce, z_kd, z_t = (torch.randn(12, c, generator=g) * 3 for _ in range(3))
    labels = torch.randint(0, c, (12,), generator=g)
    labels[[2, 3, 7, 8, 11]] = -100
    dho = DHO()
    assert (dho.temperature, dho.w_ce, dho.w_kd) == (2.0, 0.5, 0.5)
    ce = z_ce.clone().requires_grad_()
    kd = z_kd.clone().requires_grad_()
    t = z_t.clone().requires_grad_()
    loss = dho(ce, kd, t, labels)
    loss.backward()
    ce64, kd64 = z_ce.double().requires_grad_(), z_kd.double().requires_grad_()
    expect = ref_dho(ce64, kd64, z_t.double(), labels)
    expect.backward()
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce.grad.double(), ce64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kd.grad.double(), kd64.grad, rtol=1e-5, atol=1e-7)
    assert (ce.grad[labels == -100] == 0).all() and t.grad is None  # CE head: labels only; teacher frozen


def test_dho_mixture_and_search():
    g = torch.Generator().manual_seed(71)
    z_ce, z_kd = torch.randn(40, 6, generator=g) * 2, torch.randn(40, 6, generator=g) * 2
    labels = torch.randint(0, 6, (40,), generator=g)
    probs = DHO.mixture(z_ce, z_kd, alpha=0.3, beta=1.5)
    torch.testing.assert_close(probs, 0.3 * z_ce.softmax(1) + 0.7 * (z_kd / 1.5).softmax(1))
    torch.testing.assert_close(probs.sum(1), torch.ones(40))
    torch.testing.assert_close(DHO.mixture(z_ce, z_kd, alpha=1.0, beta=2.0), z_ce.softmax(1))
    best = (None, None, -1.0)
    for beta in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0):
        for i in range(21):
            alpha = i / 20
            p = alpha * z_ce.softmax(1) + (1 - alpha) * (z_kd / beta).softmax(1)
            accuracy = (p.argmax(1) == labels).float().mean().item()
            if accuracy > best[2]:
                best = (alpha, beta, accuracy)
    alpha, beta, accuracy = DHO.search_mixture(z_ce, z_kd, labels)
    assert (alpha, beta) == pytest.approx(best[:2]) and accuracy == pytest.approx(best[2])
    with pytest.raises(ValueError, match="alpha"):
        DHO.mixture(z_ce, z_kd, alpha=1.5, beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        DHO.mixture(z_ce, z_kd, alpha=0.5, beta=0.0)


def test_dual_head():
    heads = DualHead(8, 5)
    x = torch.randn(3, 8)
    z_ce, z_kd = heads(x)
    torch.testing.assert_close(z_ce, heads.ce_head(x))
    torch.testing.assert_close(z_kd, heads.kd_head(x))
    clip_like = DualHead(8, 5, kd_logit_scale=100.0)
    torch.testing.assert_close(clip_like(x)[1], clip_like.kd_head(F.normalize(x, dim=1)) * 100)


# ---- multi-teacher ------------------------------------------------------------------------------

def ref_kd_rows(z_s, z_t, tau):
    p = torch.softmax(z_t / tau, 1)
    return (p * (p.log() - torch.log_softmax(z_s / tau, 1))).sum(1) * tau * tau


@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_multi_teacher_per_batch_and_per_instance(c):
    g = torch.Generator().manual_seed(80 + c)
    student = torch.randn(10, c, generator=g) * 3
    teachers = [torch.randn(10, c, generator=g) * 3 for _ in range(3)]
    labels = torch.randint(0, c, (10,), generator=g)
    router = torch.randn(10, 3, generator=g)
    mt = MultiTeacherKD()
    t64 = [t.double() for t in teachers]

    def ref(s, y, w):  # w: [M] or [N, M]
        rows = torch.stack([ref_kd_rows(s, t, 4.0) for t in t64], 1)
        return 0.1 * ref_ce(s, y) + 0.9 * (rows * w).sum(1).mean()

    _check_against(lambda s, t, y: mt(s, t, y), lambda s, t, y: ref(s, y, torch.full((3,), 1 / 3)),
                   student, teachers, labels)
    batch_w = torch.tensor([0.5, 0.2, 0.3])
    _check_against(lambda s, t, y: mt(s, t, y, weights=batch_w), lambda s, t, y: ref(s, y, batch_w.double()),
                   student, teachers, labels)
    inst_w = router.softmax(1)
    _check_against(lambda s, t, y: mt(s, t, y, weights=inst_w), lambda s, t, y: ref(s, y, inst_w.double()),
                   student, teachers, labels)
    fixed = MultiTeacherKD(teacher_weights=[1.0, 0.0, 2.0], temperature=2.0, w_ce=0.0, w_kd=1.0)
    expect = (2 * ref_kd_rows(student.double(), t64[2], 2.0) + ref_kd_rows(student.double(), t64[0], 2.0)).mean()
    torch.testing.assert_close(fixed(student, teachers, labels).double(), expect, rtol=1e-5, atol=1e-6)


def test_multi_teacher_router_gets_gradient_teachers_do_not():
    g = torch.Generator().manual_seed(90)
    student = torch.randn(7, 5, generator=g).requires_grad_()
    teachers = [torch.randn(7, 5, generator=g).requires_grad_() for _ in range(2)]
    labels = torch.randint(0, 5, (7,), generator=g)
    router_logits = torch.randn(7, 2, generator=g).requires_grad_()
    MultiTeacherKD()(student, teachers, labels, weights=router_logits.softmax(1)).backward()
    assert all(t.grad is None for t in teachers)
    assert student.grad.abs().sum() > 0 and router_logits.grad.abs().sum() > 0
    r64 = router_logits.detach().double().requires_grad_()
    rows = torch.stack([ref_kd_rows(student.detach().double(), t.detach().double(), 4.0) for t in teachers], 1)
    (0.9 * (rows * r64.softmax(1)).sum(1).mean()).backward()
    torch.testing.assert_close(router_logits.grad.double(), r64.grad, rtol=1e-5, atol=1e-8)


def test_multi_teacher_bad_weights():
    student, teacher, labels = _batch(91, 4, 5)
    mt = MultiTeacherKD()
    for weights in (torch.ones(3), torch.ones(4, 3), torch.ones(2, 2), torch.ones(2, dtype=torch.long), [0.5, 0.5]):
        with pytest.raises(ValueError, match="weights"):
            mt(student, [teacher, teacher], labels, weights=weights)
    with pytest.raises(ValueError, match="teacher_weights"):
        MultiTeacherKD(teacher_weights=[1.0, 1.0])(student, [teacher], labels)
    with pytest.raises(ValueError, match="teacher_weights"):
        MultiTeacherKD(teacher_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="at least one"):
        mt(student, [], labels)
    with pytest.raises(ValueError, match=r"teacher_logits\[1\]"):
        mt(student, [teacher, teacher[:, :3]], labels)


# ---- USKD ---------------------------------------------------------------------------------------

def ref_uskd(fea, z, y, weight, bias, *, alpha=1.0, beta=0.1, mu=0.005, rank_log_probs=True):
    """USKDLoss of yzd-v/cls_KD line by line (hard labels), plus the distiller's CE."""
    n, c = z.shape
    label = y[:, None]
    s_t = torch.softmax(z, 1).gather(1, label)
    p_t = (s_t ** 2 + 1 - (s_t ** 2).mean(0, keepdim=True)).detach()
    s_i = torch.log_softmax(z, 1)
    s_t = s_i.gather(1, label)
    loss_t = -(p_t * s_t).sum(1).mean()
    target = torch.zeros_like(z).scatter_(1, label, 0.9) + 0.1 / c
    w_fc = fea @ weight.T + bias
    loss_weak = -(mu * target * torch.log_softmax(w_fc, 1)).sum(1).mean()
    w_i = torch.softmax(w_fc, 1)
    w_t = w_i.gather(1, label)
    final, final_t = (s_i, s_t) if rank_log_probs else (torch.softmax(z, 1), torch.softmax(z, 1).gather(1, label))
    rank = w_i / (1 - w_t.sum(1, True) + 1e-6) + final / (1 - final_t.sum(1, True) + 1e-6)
    _, rank = torch.sort(rank, descending=True, dim=-1)
    z_i = (1 / torch.arange(1, c + 1, dtype=z.dtype)).repeat(n, 1).gather(1, torch.argsort(rank))
    keep = torch.ones_like(z).scatter_(1, label, 0).bool()
    ns_i = torch.log_softmax(z[keep].reshape(n, -1), 1)
    nz_i = z_i[keep].reshape(n, -1)
    nz_i = (nz_i / nz_i.sum(1, keepdim=True)).detach()
    loss_non = -(nz_i * ns_i).sum(1).mean()
    return ref_ce(z, y) + alpha * loss_t + beta * loss_non + loss_weak


@pytest.mark.parametrize("c", CLASS_COUNTS + [2])
@pytest.mark.parametrize("rank_log_probs", [True, False])
def test_uskd_matches_released_code(c, rank_log_probs):
    g = torch.Generator().manual_seed(100 + c)
    fea = torch.randn(9, 6, generator=g, dtype=torch.float64)
    logits = torch.randn(9, c, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (9,), generator=g)
    uskd = USKD(6, c, rank_log_probs=rank_log_probs).double()
    assert (uskd.alpha, uskd.beta, uskd.mu, uskd.w_ce) == (1.0, 0.1, 0.005, 1.0)
    z = logits.clone().requires_grad_()
    loss = uskd(fea, z, labels)
    loss.backward()
    w = uskd.weak_head.weight.detach().clone().requires_grad_()
    z64 = logits.clone().requires_grad_()
    expect = ref_uskd(fea, z64, labels, w, uskd.weak_head.bias.detach(), rank_log_probs=rank_log_probs)
    expect.backward()
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(z.grad, z64.grad)
    torch.testing.assert_close(uskd.weak_head.weight.grad, w.grad)


def test_uskd_rank_forms_differ_and_float32_runs():
    g = torch.Generator().manual_seed(101)
    fea, logits = torch.randn(16, 4, generator=g), torch.randn(16, 50, generator=g) * 3
    labels = torch.randint(0, 50, (16,), generator=g)
    code, paper = USKD(4, 50), USKD(4, 50, rank_log_probs=False)
    paper.load_state_dict(code.state_dict())
    parts_code = code(fea, logits, labels, return_components=True)
    parts_paper = paper(fea, logits, labels, return_components=True)
    assert parts_code["loss"].dtype == torch.float32
    torch.testing.assert_close(parts_code["ce"], parts_paper["ce"])
    assert not torch.allclose(parts_code["non_target"], parts_paper["non_target"])


# ---- PS-KD --------------------------------------------------------------------------------------

def ref_soft_ce(z, target):
    return (-target * torch.log_softmax(z, 1)).mean(0).sum()  # Custom_CrossEntropy_PSKD


def test_pskd_schedule_and_table_semantics():
    g = torch.Generator().manual_seed(110)
    n_samples, c, epochs = 12, 7, 5
    pskd = PSKD(n_samples, c, total_epochs=epochs)
    assert pskd.alpha_T == 0.8 and pskd.alpha(0) == pytest.approx(0.16) and pskd.alpha(4) == pytest.approx(0.8)
    index = torch.tensor([3, 0, 9, 5])
    labels = torch.randint(0, c, (4,), generator=g)
    onehot = F.one_hot(labels, c).double()

    # epoch 0: one-hot targets (plain CE), then the predictions are recorded
    z0 = torch.randn(4, c, generator=g) * 2
    loss0 = pskd(z0, labels, index, epoch=0)
    torch.testing.assert_close(loss0.double(), ref_soft_ce(z0.double(), onehot), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pskd.predictions[index], z0.softmax(1))
    untouched = torch.ones(n_samples, dtype=torch.bool)
    untouched[index] = False
    assert (pskd.predictions[untouched] == 0).all()

    # epoch 2: targets mix the one-hot labels with the predictions recorded before this call
    z2 = (torch.randn(4, c, generator=g) * 2).requires_grad_()
    a = 0.8 * 3 / 5
    target = (1 - a) * onehot + a * z0.double().softmax(1)
    loss2 = pskd(z2, labels, index, epoch=2)
    loss2.backward()
    z2_64 = z2.detach().double().requires_grad_()
    expect = ref_soft_ce(z2_64, target)
    expect.backward()
    torch.testing.assert_close(loss2.double(), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z2.grad.double(), z2_64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pskd.predictions[index], z2.detach().softmax(1))
    torch.testing.assert_close(pskd.soft_targets(labels, index, 3).double(),
                               (1 - 0.48 * 4 / 3) * onehot + 0.48 * 4 / 3 * z2.detach().double().softmax(1))
    assert "predictions" in pskd.state_dict()


def test_pskd_bad_arguments():
    pskd = PSKD(6, 4, total_epochs=3)
    z, labels = torch.randn(2, 4), torch.tensor([1, 3])
    with pytest.raises(ValueError, match="indices"):
        pskd(z, labels, torch.tensor([0, 6]), epoch=1)
    with pytest.raises(ValueError, match="indices"):
        pskd(z, labels, torch.tensor([0.0, 1.0]), epoch=1)
    with pytest.raises(ValueError, match="epoch"):
        pskd(z, labels, torch.tensor([0, 1]), epoch=-1)
    with pytest.raises(ValueError, match="labels"):
        pskd(z, torch.tensor([1, -100]), torch.tensor([0, 1]), epoch=1)
    with pytest.raises(ValueError, match="classes"):
        pskd(torch.randn(2, 5), labels, torch.tensor([0, 1]), epoch=1)
    with pytest.raises(ValueError, match="alpha_T"):
        PSKD(6, 4, total_epochs=3, alpha_T=1.5)
    with pytest.raises(ValueError, match="total_epochs"):
        PSKD(6, 4, total_epochs=0)


# ---- more bad arguments -------------------------------------------------------------------------

@pytest.mark.parametrize("make, name", [
    (lambda: CTKD(t_start=0), "t_start"),
    (lambda: CTKD(lambda_epochs=0), "lambda_epochs"),
    (lambda: CTKD(lambda_min=float("nan")), "lambda_min"),
    (lambda: DHO(temperature=0), "temperature"),
    (lambda: DHO(w_kd=-1), "w_kd"),
    (lambda: DualHead(0, 3), "in_features"),
    (lambda: USKD(4, 1), "num_classes"),
    (lambda: USKD(4, 3, mu=-1), "mu"),
    (lambda: MultiTeacherKD(temperature=-1), "temperature"),
    (lambda: LogitStandardizedKD(temperature=0), "temperature"),
    (lambda: LogitStandardizedDKD(beta=-1), "beta"),
])
def test_bad_hyperparameters_of_the_rest(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_bad_inputs_of_the_rest():
    student, teacher, labels = _batch(120, 6, 5)
    with pytest.raises(ValueError, match="epoch"):
        CTKD()(student, teacher, labels, epoch=-2)
    with pytest.raises(ValueError, match="labels"):
        CTKD()(student, teacher, labels + 10, epoch=1)
    with pytest.raises(ValueError, match="teacher_logits"):
        DHO()(student, student, teacher[:, :3], labels)
    with pytest.raises(ValueError, match="ce_logits"):
        DHO()(student[:, :4], student, teacher, labels)
    with pytest.raises(ValueError, match="mid_features"):
        USKD(3, 5)(torch.randn(6, 4), student, labels)
    with pytest.raises(ValueError, match="C >= 2"):
        LogitStandardizedKD()(student[:, :1], teacher[:, :1], labels.clamp_max(0))


# ---- CUDA ---------------------------------------------------------------------------------------

def _cuda_cases():
    def pskd_two_epochs(m, s, t, y):
        index = torch.arange(s.shape[0], device=s.device)
        m(t, y, index, epoch=0)
        return m(s, y, index, epoch=1)

    return {
        "hinton": (HintonKD(), lambda m, s, t, y: m(s, t, y)),
        "dkd": (DKD(), lambda m, s, t, y: m(s, t, y, epoch=5)),
        "nkd": (NKD(), lambda m, s, t, y: m(s, t, y)),
        "dist": (DIST(), lambda m, s, t, y: m(s, t, y)),
        "ls_kd": (LogitStandardizedKD(), lambda m, s, t, y: m(s, t, y)),
        "ls_dkd": (LogitStandardizedDKD(), lambda m, s, t, y: m(s, t, y, epoch=5)),
        "ctkd": (CTKD(), lambda m, s, t, y: m(s, t, y, epoch=12)),
        "dho": (DHO(), lambda m, s, t, y: m(s, 0.5 * s, t, y.masked_fill(y > 30, -100))),
        "multi": (MultiTeacherKD(), lambda m, s, t, y: m(s, [t, t.flip(0)], y, weights=t[:, :2].softmax(1))),
        "uskd": (USKD(4, 37), lambda m, s, t, y: m(t[:, :4], s, y)),
        "pskd": (PSKD(16, 37, total_epochs=4), pskd_two_epochs),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_cuda_cases()))
def test_methods_on_cuda_match_cpu(name):
    import copy

    method, call = _cuda_cases()[name]
    student, teacher, labels = _batch(130, 16, 37)
    results = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(method).to(device)
        s = student.to(device).requires_grad_()
        loss = call(m, s, teacher.to(device), labels.to(device))
        loss.backward()
        param_grads = [p.grad.cpu() for p in m.parameters() if p.grad is not None]
        results.append((loss.detach().cpu(), s.grad.cpu(), param_grads))
    (cpu_loss, cpu_grad, cpu_params), (gpu_loss, gpu_grad, gpu_params) = results
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-4, atol=1e-6)
    for a, b in zip(gpu_params, cpu_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
