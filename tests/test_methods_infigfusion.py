"""kdops.methods.InfiGFusion (python/kdops/methods/infigfusion.py) against a float64 transcription of
the formulas of METHODS.md: SFT = cross-entropy with ignore_index, ULD = L1 between descending-sorted
probability vectors (shorter vocabulary zero-padded), GLD = the reference sorted_gw of the reference
co-activation node features; L = (1 - lam) SFT + lam sum_m (ULD_m + w_g GLD_m)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdops.methods
from kdops import reference

B, T, V_S = 3, 9, 40
IGNORE = -100


def _batch(seed, teacher_vocabs=(40,)):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V_S, generator=g) * 2
    teachers = [torch.randn(B, T, v, generator=g) * 2 for v in teacher_vocabs]
    labels = torch.randint(0, V_S, (B, T), generator=g)
    labels[0, :4] = IGNORE
    labels[2, 6:] = IGNORE
    return student, teachers, labels


def _aligned(labels):  # HF causal-LM shift: position t is scored against label t + 1
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def ref_sft(student, aligned):
    return F.cross_entropy(student.double().reshape(-1, student.shape[-1]), aligned.reshape(-1),
                           ignore_index=IGNORE)


def ref_uld(student, teacher, valid, tau=1.0, top=None):
    """Per valid position: sort both probability vectors descending, zero-pad to the larger vocabulary
    (or cut to `top`), sum of |difference|; mean over the valid positions."""
    n = max(student.shape[-1], teacher.shape[-1])
    per_pos = []
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not valid[b, t]:
                continue
            ps = torch.softmax(student[b, t].double() / tau, -1).sort(descending=True).values
            pt = torch.softmax(teacher[b, t].double() / tau, -1).sort(descending=True).values
            ps = torch.cat([ps, ps.new_zeros(n - ps.numel())])
            pt = torch.cat([pt, pt.new_zeros(n - pt.numel())])
            if top is not None:
                ps, pt = ps[:top], pt[:top]
            per_pos.append((ps - pt).abs().sum())
    return torch.stack(per_pos).mean()


def ref_gld(student, teacher, valid, k, tau=1.0):
    f_s = reference.coactivation_features(student.double(), k, mask=valid, temperature=tau)
    f_t = reference.coactivation_features(teacher.double(), k, mask=valid, temperature=tau)
    return reference.sorted_gw(f_s, f_t)


def ref_loss(student, teachers, labels, k=10, tau=1.0, lam=0.5, w_g=1.0):
    aligned = _aligned(labels)
    valid = aligned.ne(IGNORE)
    distill = sum(ref_uld(student, t, valid, tau) + w_g * ref_gld(student, t, valid, k, tau) for t in teachers)
    return (1 - lam) * ref_sft(student, aligned) + lam * distill


def _close(actual, expect):
    torch.testing.assert_close(actual.double(), expect.double(), rtol=1e-5, atol=1e-6)


def test_each_term_matches_the_formulas_with_two_vocab_sizes():
    student, teachers, labels = _batch(0, teacher_vocabs=(40, 23, 57))
    valid = _aligned(labels).ne(IGNORE)
    fusion = kdops.methods.InfiGFusion(k=5, temperature=1.5)
    out = fusion(student, teachers, labels, return_components=True)
    _close(out["sft"], ref_sft(student, _aligned(labels)))
    for m, t in enumerate(teachers):
        _close(out["uld_per_teacher"][m], ref_uld(student, t, valid, 1.5))
        _close(out["gld_per_teacher"][m], ref_gld(student, t, valid, 5, 1.5))
    _close(out["uld"], out["uld_per_teacher"].sum())
    _close(out["gld"], out["gld_per_teacher"].sum())
    # the single-teacher term methods agree with forward
    _close(fusion.uld_loss(student, teachers[1], valid), ref_uld(student, teachers[1], valid, 1.5))
    _close(fusion.gld_loss(student, teachers[2], valid), ref_gld(student, teachers[2], valid, 5, 1.5))


def test_uld_zero_padding_by_hand():
    # student V=3, teacher V=5: sorted p_s = (a, b, c, 0, 0)
    student = torch.log(torch.tensor([[[0.2, 0.5, 0.3]]]))
    teacher = torch.log(torch.tensor([[[0.1, 0.4, 0.2, 0.2, 0.1]]]))
    valid = torch.ones(1, 1, dtype=torch.bool)
    fusion = kdops.methods.InfiGFusion()
    expect = abs(0.5 - 0.4) + abs(0.3 - 0.2) + abs(0.2 - 0.2) + 0.1 + 0.1
    torch.testing.assert_close(fusion.uld_loss(student, teacher, valid).item(), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fusion.uld_loss(teacher, student, valid).item(), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top", [1, 4, 30, 60])
def test_uld_top(top):
    student, teachers, labels = _batch(1, teacher_vocabs=(23,))
    valid = _aligned(labels).ne(IGNORE)
    fusion = kdops.methods.InfiGFusion(uld_top=top, graph_weight=0.0)
    out = fusion(student, teachers, labels, return_components=True)
    _close(out["uld"], ref_uld(student, teachers[0], valid, top=top))


@pytest.mark.parametrize("lam,w_g", [(0.5, 1.0), (0.2, 0.3), (0.0, 1.0), (1.0, 2.0)])
def test_combination_several_teachers(lam, w_g):
    student, teachers, labels = _batch(2, teacher_vocabs=(40, 31))
    fusion = kdops.methods.InfiGFusion(k=4, temperature=2.0, lam=lam, graph_weight=w_g)
    loss = fusion(student, teachers, labels)
    _close(loss, ref_loss(student, teachers, labels, k=4, tau=2.0, lam=lam, w_g=w_g))
    out = fusion(student, teachers, labels, return_components=True)
    _close(out["loss"], (1 - lam) * out["sft"] + lam * (out["uld"] + w_g * out["gld"]))


def test_defaults_single_tensor_teacher_and_teacher_weights():
    student, teachers, labels = _batch(3, teacher_vocabs=(48, 20))
    fusion = kdops.methods.InfiGFusion()
    assert (fusion.k, fusion.temperature, fusion.lam, fusion.graph_weight) == (10, 1.0, 0.5, 1.0)
    _close(fusion(student, teachers[0], labels), ref_loss(student, teachers[:1], labels))
    weighted = kdops.methods.InfiGFusion(teacher_weights=[0.25, 2.0])
    out = fusion(student, teachers, labels, return_components=True)
    expect = 0.5 * out["sft"] + 0.5 * (0.25 * (out["uld_per_teacher"][0] + out["gld_per_teacher"][0])
                                       + 2.0 * (out["uld_per_teacher"][1] + out["gld_per_teacher"][1]))
    _close(weighted(student, teachers, labels), expect)


def test_graph_weight_zero_skips_gld():
    student, teachers, labels = _batch(4, teacher_vocabs=(40, 25))
    out = kdops.methods.InfiGFusion(graph_weight=0.0)(student, teachers, labels, return_components=True)
    assert out["gld"].item() == 0.0
    _close(out["loss"], 0.5 * out["sft"] + 0.5 * out["uld"])


def test_aligned_labels_without_shift():
    student, teachers, labels = _batch(5, teacher_vocabs=(33,))
    shifted = kdops.methods.InfiGFusion(k=3)(student, teachers, labels)
    aligned = kdops.methods.InfiGFusion(k=3, shift_labels=False)(student, teachers, _aligned(labels))
    _close(aligned, shifted)


def test_ignored_positions_change_nothing():
    student, teachers, labels = _batch(6, teacher_vocabs=(40, 29))
    fusion = kdops.methods.InfiGFusion(k=4)
    base = fusion(student, teachers, labels, return_components=True)
    ignored = ~_aligned(labels).ne(IGNORE)  # includes the last position of every sequence
    g = torch.Generator().manual_seed(99)
    s2 = torch.where(ignored[..., None], torch.randn(student.shape, generator=g) * 9, student)
    t2 = [torch.where(ignored[..., None], torch.randn(t.shape, generator=g) * 9, t) for t in teachers]
    other = fusion(s2, t2, labels, return_components=True)
    for key in ("loss", "sft", "uld", "gld"):
        torch.testing.assert_close(other[key], base[key])
    # and no gradient reaches the ignored positions
    s = student.clone().requires_grad_()
    fusion(s, teachers, labels).backward()
    assert (s.grad[ignored] == 0).all() and (s.grad[~ignored] != 0).any()


def test_all_positions_ignored_gives_zero():
    student, teachers, labels = _batch(7, teacher_vocabs=(40,))
    labels = torch.full_like(labels, IGNORE)
    s = student.clone().requires_grad_()
    loss = kdops.methods.InfiGFusion(k=3)(s, teachers, labels)
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


def test_gradient_into_student_not_teachers():
    student, teachers, labels = _batch(8, teacher_vocabs=(40, 26))
    s = student.double().requires_grad_()
    ts = [t.double().requires_grad_() for t in teachers]
    loss = kdops.methods.InfiGFusion(k=4, lam=0.7)(s, ts, labels)
    assert loss.requires_grad
    loss.backward()
    assert all(t.grad is None for t in ts)
    s64 = student.double().requires_grad_()
    ref_loss(s64, [t.double() for t in teachers], labels, k=4, lam=0.7).backward()
    torch.testing.assert_close(s.grad, s64.grad, rtol=1e-6, atol=1e-9)


def test_adam_steps_lower_the_loss():
    student, teachers, labels = _batch(9, teacher_vocabs=(40, 30))
    z = student.clone().requires_grad_()
    fusion = kdops.methods.InfiGFusion(k=5)
    opt = torch.optim.Adam([z], lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = fusion(z, teachers, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_arguments():
    with pytest.raises(ValueError):
        kdops.methods.InfiGFusion(lam=1.5)
    with pytest.raises(ValueError):
        kdops.methods.InfiGFusion(temperature=0)
    with pytest.raises(ValueError):
        kdops.methods.InfiGFusion(uld_top=0)
    student, teachers, labels = _batch(10)
    fusion = kdops.methods.InfiGFusion(k=3)
    with pytest.raises(ValueError):
        fusion(student, [], labels)
    with pytest.raises(ValueError):
        fusion(student, [teachers[0][:, :-1]], labels)
    with pytest.raises(ValueError):
        kdops.methods.InfiGFusion(teacher_weights=[1.0, 2.0])(student, teachers, labels)
