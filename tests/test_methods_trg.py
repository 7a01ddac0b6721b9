"""kdops.methods.TRG against a float64 transcription of its terms (METHODS.md, TRG): each relation
term is formed explicitly here, [N, N] per instance, and compared with the module built on the
fused relation_kd_loss; gradients reach the student and the projection, never the teacher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdops.methods.trg import TRG

F64 = torch.float64


def _inputs(seed, batch=3, tokens=9, ds=6, dt=10, classes=7):
    g = torch.Generator().manual_seed(seed)
    return dict(
        student_logits=torch.randn(batch, classes, generator=g, dtype=F64).requires_grad_(),
        teacher_logits=torch.randn(batch, classes, generator=g, dtype=F64).requires_grad_(),
        labels=torch.randint(0, classes, (batch,), generator=g),
        student_tokens=torch.randn(batch, tokens, ds, generator=g, dtype=F64).requires_grad_(),
        teacher_tokens=torch.randn(batch, tokens, dt, generator=g, dtype=F64).requires_grad_(),
    )


def _row_softmax(x, keep):
    return x.masked_fill(~keep, -math.inf).softmax(-1).nan_to_num(0.0)


def _contextual(s, t, mask):
    """Mean over valid tokens i of (1/n) sum_j (P_t - P_s)^2, R = F F^T / sqrt(D), per instance."""
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        keep = mask[b]
        fs, ft = s[b][keep], t[b][keep]
        if fs.shape[0] == 0:
            continue
        ps = (fs @ fs.T / math.sqrt(fs.shape[1])).softmax(-1)
        pt = (ft @ ft.T / math.sqrt(ft.shape[1])).softmax(-1)
        total = total + (pt - ps).square().mean(-1).sum()
        rows += fs.shape[0]
    return total / max(rows, 1)


def _local_kl(s, t, tau):
    """KL(softmax b_i || softmax a_i) over j != i of cosine relations, mean over tokens."""
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    a, b = s @ s.T / tau, t @ t.T / tau
    keep = ~torch.eye(a.shape[0], dtype=torch.bool)
    p, q = _row_softmax(b, keep), _row_softmax(a, keep)
    return torch.where(keep, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0).sum(-1).mean()


def _infonce(s, t, tau):
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    c = s @ t.T / tau
    return (c.logsumexp(-1) - c.diagonal()).mean()


def _transcription(trg, x, mask, sampled, epoch):
    tau = trg.kd_temperature(epoch) if callable(trg.kd_temperature) else trg.kd_temperature
    zs, zt = x["student_logits"], x["teacher_logits"].detach()
    ce = F.cross_entropy(zs, x["labels"])
    kd = tau**2 * F.kl_div((zs / tau).log_softmax(-1), (zt / tau).log_softmax(-1), log_target=True,
                           reduction="batchmean")
    st, tt = x["student_tokens"], x["teacher_tokens"].detach()
    inner = _contextual(st, tt, mask)
    flat_s, flat_t = st.reshape(-1, st.shape[-1]), tt.reshape(-1, tt.shape[-1])
    local = _local_kl(flat_s[sampled], flat_t[sampled], trg.local_temperature)
    proj = trg.projection.weight.to(F64)
    glob = _infonce((flat_s @ proj.T)[mask.reshape(-1)], flat_t[mask.reshape(-1)], trg.global_temperature)
    return (ce + trg.kd_weight * kd + trg.inner_weight * inner + trg.local_weight * local
            + trg.global_weight * glob)


def _sampled_rows(mask, local_tokens, seed):
    """The rows TRG.local_loss samples: the valid rows, a randperm prefix when there are more."""
    valid = torch.arange(mask.numel())[mask.reshape(-1)]
    if valid.numel() > local_tokens:
        order = torch.randperm(valid.numel(), generator=torch.Generator().manual_seed(seed))
        valid = valid[order[:local_tokens]].sort().values
    return valid


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("local_tokens", [8, 1000])
def test_trg_matches_transcription(masked, local_tokens):
    x = _inputs(0)
    batch, tokens = x["student_tokens"].shape[:2]
    mask = (torch.rand(batch, tokens, generator=torch.Generator().manual_seed(1)) < 0.7) if masked \
        else torch.ones(batch, tokens, dtype=torch.bool)
    trg = TRG(6, 10, local_tokens=local_tokens, kd_temperature=TRG.linear_temperature(4.0, 2.0, 10),
              global_weight=0.3).double()
    loss = trg(**x, mask=mask if masked else None, epoch=5, generator=torch.Generator().manual_seed(2))
    expected = _transcription(trg, x, mask, _sampled_rows(mask, local_tokens, 2), epoch=5)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)

    grads = torch.autograd.grad(loss, [x["student_logits"], x["student_tokens"], trg.projection.weight])
    want = torch.autograd.grad(expected, [x["student_logits"], x["student_tokens"], trg.projection.weight])
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-11)


def test_trg_never_reaches_the_teacher():
    x = _inputs(3)
    trg = TRG(6, 10).double()
    trg(**x).backward()
    assert x["teacher_logits"].grad is None and x["teacher_tokens"].grad is None
    assert x["student_tokens"].grad.abs().sum() > 0 and trg.projection.weight.grad.abs().sum() > 0


def test_knn_local_loss_keeps_the_teacher_neighbours():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(12, 5, generator=g, dtype=F64), torch.randn(12, 7, generator=g, dtype=F64)
    trg = TRG(5, 7, knn=3, local_temperature=0.5)
    got = trg.local_loss(s[None], t[None])
    # per token: its 3 most similar other tokens in the teacher graph, then KL over those entries
    sn, tn = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    total = 0.0
    for i in range(12):
        sims = [(float(tn[i] @ tn[j]), j) for j in range(12) if j != i]
        nbrs = [j for _, j in sorted(sims, reverse=True)[:3]]
        p = (tn[nbrs] @ tn[i] / 0.5).softmax(0)
        q = (sn[nbrs] @ sn[i] / 0.5).softmax(0)
        total += float((p * (p.log() - q.log())).sum())
    assert got.item() == pytest.approx(total / 12, rel=1e-6)


def test_linear_temperature_schedule():
    schedule = TRG.linear_temperature(4.0, 1.0, 3)
    assert [schedule(e) for e in (0, 1.5, 3, 10)] == [4.0, 2.5, 1.0, 1.0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(kd_weight=-1.0), "kd_weight"),
    (dict(local_temperature=0.0), "local_temperature"),
    (dict(local_tokens=1), "local_tokens"),
    (dict(knn=0), "knn"),
    (dict(kd_temperature=0.0), "kd_temperature"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TRG(6, 10, **kwargs)


def test_bad_token_shapes():
    x = _inputs(5)
    trg = TRG(6, 10).double()
    with pytest.raises(ValueError, match="widths"):
        trg(**{**x, "student_tokens": torch.randn(3, 9, 5, dtype=F64)})
    with pytest.raises(ValueError, match="share"):
        trg(**{**x, "teacher_tokens": torch.randn(3, 8, 10, dtype=F64)})


# --------------------------------------------------------------------------------------------------
# GramRelationKD (MLKD-style batch- and class-level relations)


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_gram_relation_matches_transcription(kind):
    from kdops.methods.gram_relation import GramRelationKD

    g = torch.Generator().manual_seed(6)
    zs = torch.randn(10, 7, generator=g, dtype=F64).requires_grad_()
    zt = torch.randn(10, 7, generator=g, dtype=F64).requires_grad_()
    gram = GramRelationKD(kind=kind, temperature=2.0, gram_temperature=0.2, class_weight=0.5)
    loss = gram(zs, zt)

    def level(ps, pt):  # tokens are the rows of ps / pt
        a, b = ps @ ps.T / 0.2, pt @ pt.T / 0.2
        p, q = b.softmax(-1), a.softmax(-1)
        per_row = (p - q).square().mean(-1) if kind == "mse" else (p * (p.log() - q.log())).sum(-1)
        return per_row.mean()

    ps, pt = (zs / 2).softmax(-1), (zt.detach() / 2).softmax(-1)
    expected = level(ps, pt) + 0.5 * level(ps.T, pt.T)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-7)  # fp32 predictions
    loss.backward()
    assert zt.grad is None and zs.grad.abs().sum() > 0


def test_gram_relation_rejects_infonce_and_bad_shapes():
    from kdops.methods.gram_relation import GramRelationKD

    with pytest.raises(ValueError, match="kind"):
        GramRelationKD(kind="infonce")
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        GramRelationKD()(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
