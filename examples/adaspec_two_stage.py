"""AdaSPEC's two stages on tiny random models, on the CPU, in seconds (no downloads).

A "target" language model is fixed; a small "draft" is distilled from it with AdaSPEC:

  stage 1  a reference model, initialized as the draft is, learns the target with plain forward KL
  stage 2  the draft learns the target only on the 40% of tokens with the largest
           KL(p || q_draft) - KL(p || q_reference), the reference frozen

The models are next-token predictors over random token sequences: an embedding of the previous
tokens followed by a linear head (the draft sees one token of context, the target four, so the
draft cannot match the target everywhere: the capacity gap AdaSPEC is about). Run:

    python examples/adaspec_two_stage.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import kdops.methods

VOCAB, HIDDEN, BATCH, SEQ, STEPS = 512, 64, 8, 48, 60


class TinyLM(nn.Module):
    """logits[t] = head(sum of the embeddings of tokens t - context + 1 .. t)."""

    def __init__(self, context: int, hidden: int):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, hidden)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        mixed = h.clone()
        for lag in range(1, self.context):
            mixed[:, lag:] += h[:, :-lag]
        return self.head(torch.tanh(mixed)) * 3.0


def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = tokens.clone()
    labels[:, :8] = -100  # a "prompt" that does not count
    return tokens, labels


def train(model, loss_fn, steps: int, generator: torch.Generator, what: str) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        tokens, labels = batch(generator)
        loss = loss_fn(model(tokens), tokens, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"  {what} step {step:3d}  loss {loss.item():.4f}")


def main() -> None:
    torch.manual_seed(0)
    target = TinyLM(context=4, hidden=4 * HIDDEN).eval().requires_grad_(False)
    draft = TinyLM(context=1, hidden=HIDDEN)
    reference = copy.deepcopy(draft)  # the draft's initialization
    adaspec = kdops.methods.AdaSPEC(fraction=0.4)
    data = torch.Generator().manual_seed(1)

    print("stage 1: reference <- target, forward KL on every token")
    train(reference, lambda logits, tokens, labels: adaspec.reference_loss(logits, target(tokens), labels),
          STEPS, data, "reference")
    reference.eval().requires_grad_(False)

    print("stage 2: draft <- target on the 40% of tokens the reference says it can learn")
    train(draft, lambda logits, tokens, labels: adaspec(logits, reference(tokens), target(tokens), labels),
          STEPS, data, "draft")

    tokens, labels = batch(data)
    _, kept, draft_kl, reference_kl = adaspec.draft_loss(draft(tokens), reference(tokens), target(tokens),
                                                         labels, return_details=True)
    counted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100
    print(f"kept {kept.sum().item()} of {counted.sum().item()} counted tokens; mean KL(p || q) on them: "
          f"draft {draft_kl[kept].mean():.4f}, reference {reference_kl[kept].mean():.4f}; "
          f"on the rest: draft {draft_kl[counted & ~kept].mean():.4f}, "
          f"reference {reference_kl[counted & ~kept].mean():.4f}")

if __name__ == "__main__":
    main()
