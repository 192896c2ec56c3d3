"""The retriever's contrastive loss: in-batch negatives over the whole local batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shoprank.models.retriever import contrastive_loss


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def test_loss_is_softmax_over_every_item_of_the_batch() -> None:
    torch.manual_seed(0)
    b, g = 4, 2  # each group: positive + 1 hard negative
    ctx, items = _unit(b, 8), _unit(b * g, 8)
    rows = torch.arange(b * g).view(b, g)  # all distinct catalog rows
    scale = torch.tensor(20.0)
    logits = scale * ctx @ items.T  # [B, B*G]: every item of the batch for every context
    expected = F.cross_entropy(logits, torch.arange(b) * g)
    assert torch.allclose(contrastive_loss(ctx, items, rows, scale), expected)

    # Another group's item is a negative for context 0: moving it onto context 0 raises the loss.
    moved = items.clone()
    moved[5] = ctx[0]
    assert contrastive_loss(ctx, moved, rows, scale) > contrastive_loss(ctx, items, rows, scale)


def test_copies_of_the_positive_are_not_negatives() -> None:
    torch.manual_seed(1)
    ctx, items = _unit(3, 8), _unit(3, 8)
    items[2] = items[0]  # users 0 and 2 bought the same item
    rows = torch.tensor([[10], [11], [10]])
    scale = torch.tensor(20.0)
    logits = scale * ctx @ items.T
    masked = logits.clone()
    masked[0, 2] = masked[2, 0] = float("-inf")
    expected = F.cross_entropy(masked, torch.arange(3))
    assert torch.allclose(contrastive_loss(ctx, items, rows, scale), expected)
