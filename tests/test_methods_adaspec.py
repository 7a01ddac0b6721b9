"""kdops.methods.AdaSPEC (python/kdops/methods/adaspec.py) against the authors' released
``AdaSPECTrainer.compute_loss`` written out in float64 PyTorch (shifted logits and labels, masked
tokens, torch.quantile, sum / num_items_in_batch or mean), and the two-stage example."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

import kdops.methods

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "adaspec_two_stage.py"


def released_compute_loss(logits, ref_logits, target_logits, labels, k, num_items_in_batch=None):
    """The released stage-2 loss, step by step: shift, drop ignored tokens, float KLs, quantile."""
    labels = labels[:, 1:]
    V = logits.shape[-1]
    keep = labels.ne(-100).reshape(-1)
    draft, ref, target = (x[..., :-1, :].reshape(-1, V)[keep].double()
                          for x in (logits, ref_logits, target_logits))
    p = torch.softmax(target, -1)
    actual = torch.nn.functional.kl_div(torch.log_softmax(draft, -1), p, reduction="none").sum(-1)
    reference = torch.nn.functional.kl_div(torch.log_softmax(ref, -1), p, reduction="none").sum(-1)
    delta = (actual - reference).detach()
    mask = delta >= torch.quantile(delta, 1 - k, dim=0, keepdim=True)
    if num_items_in_batch is not None:
        return torch.masked_select(actual, mask).sum() / num_items_in_batch
    return torch.masked_select(actual, mask).mean()


def _batch(seed, B=3, T=17, V=61):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, T, V, generator=g) * 2
    draft = target + torch.randn(B, T, V, generator=g) * (torch.rand(B, T, 1, generator=g) + 0.1)
    ref = target + torch.randn(B, T, V, generator=g) * (torch.rand(B, T, 1, generator=g) + 0.1)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :6] = -100
    labels[2, 12:] = -100
    return draft, ref, target, labels


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
@pytest.mark.parametrize("fraction", [0.4, 0.25, 1.0])
def test_draft_loss_matches_released_code(fraction, num_items_in_batch):
    draft, ref, target, labels = _batch(0)
    adaspec = kdops.methods.AdaSPEC(fraction=fraction)
    d = draft.clone().requires_grad_()
    loss = adaspec(d, ref, target, labels, num_items_in_batch=num_items_in_batch)
    loss.backward()
    d64 = draft.double().requires_grad_()
    expect = released_compute_loss(d64, ref, target, labels, fraction, num_items_in_batch)
    expect.backward()
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.grad.double(), d64.grad, rtol=1e-5, atol=1e-8)
    assert (d.grad[:, -1] == 0).all()  # the last position predicts nothing


def test_reference_loss_is_fkl_on_shifted_tokens():
    _, ref, target, labels = _batch(1)
    adaspec = kdops.methods.AdaSPEC()
    r = ref.clone().requires_grad_()
    loss = adaspec.reference_loss(r, target, labels, num_items_in_batch=30)
    loss.backward()
    r64 = ref.double().requires_grad_()
    expect = released_compute_loss(r64, ref, target, labels, 1.0, 30)  # fraction 1: every token
    expect.backward()
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.grad.double(), r64.grad, rtol=1e-5, atol=1e-8)


def test_unshifted_labels_and_details():
    draft, ref, target, labels = _batch(2)
    adaspec = kdops.methods.AdaSPEC(fraction=0.5, temperature=2.0, shift_labels=False)
    loss, kept, draft_kl, reference_kl = adaspec.draft_loss(draft, ref, target, labels, return_details=True)
    expect = kdops.adaspec_loss(draft, ref, target, fraction=0.5, labels=labels, temperature=2.0)
    torch.testing.assert_close(loss, expect)
    assert kept.shape == labels.shape and not kept[labels == -100].any()
    assert draft_kl.shape == reference_kl.shape == labels.shape
    assert "fraction=0.5" in repr(adaspec)


def test_bad_fraction():
    for fraction in (0, 1.2, -1, True):
        with pytest.raises(ValueError, match="fraction"):
            kdops.methods.AdaSPEC(fraction=fraction)


def test_example_runs():
    result = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "stage 1" in result.stdout and "stage 2" in result.stdout and "kept" in result.stdout
