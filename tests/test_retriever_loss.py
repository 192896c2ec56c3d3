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


def test_length_buckets_give_the_same_loss_and_gradients(tiny_model_dir) -> None:
    """retriever.length_buckets: similar-length rows in passes of their own, each trimmed to
    its longest row; the loss and every gradient equal those of one padded pass."""
    from shoprank.config import ModelConfig
    from shoprank.models.encoder import load_encoder
    from shoprank.models.retriever import BiEncoder

    torch.manual_seed(2)
    b, g, length = 6, 2, 96  # rows of 3-96 tokens: passes trimmed to 32, 64 or 96

    def rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1000, 2000, (n, length))
        real = torch.randint(3, length + 1, (n,))  # every row padded to its own length
        mask = (torch.arange(length)[None, :] < real[:, None]).long()
        return ids * mask, mask

    ctx_ids, ctx_mask = rows(b)
    item_ids, item_mask = rows(b * g)
    batch = {
        "ctx_input_ids": ctx_ids,
        "ctx_attention_mask": ctx_mask,
        "item_input_ids": item_ids.view(b, g, length),
        "item_attention_mask": item_mask.view(b, g, length),
        "item_rows": torch.arange(b * g).view(b, g),
    }
    got = []
    for buckets in (1, 3):
        torch.manual_seed(0)
        encoder = load_encoder(ModelConfig(name=tiny_model_dir, dropout=0.0))
        model = BiEncoder(encoder, "mean", 0.05, True, length_buckets=buckets)
        loss = model(**batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        got.append((loss.detach(), grads))
    (one, grads_one), (three, grads_three) = got
    assert torch.allclose(one, three, atol=1e-5)
    assert grads_one.keys() == grads_three.keys() and len(grads_one) > 10
    for name, grad in grads_one.items():
        assert torch.allclose(grad, grads_three[name], atol=1e-5), name


def test_length_buckets_run_one_pass_when_rows_are_trimmed_alike(tiny_model_dir) -> None:
    from shoprank.config import ModelConfig
    from shoprank.models.encoder import encode, load_encoder

    encoder = load_encoder(ModelConfig(name=tiny_model_dir, dropout=0.0))
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(1000, 2000, (8, 64))
    full = torch.ones_like(ids)
    one = encode(encoder, ids, full, "mean", buckets=4)
    assert len(calls) == 1  # every row 64 tokens: nothing to save, one pass
    assert torch.allclose(one, encode(encoder, ids, full, "mean"), atol=1e-5)  # rows in order
    mixed = full.clone()
    mixed[:4, 20:] = 0  # half the rows trimmed to 32 tokens
    calls.clear()
    encode(encoder, ids * mixed, mixed, "mean", buckets=4)
    assert len(calls) == 2
