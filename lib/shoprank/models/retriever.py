"""The retriever: a bi-encoder whose two towers (context, item) share one pretrained encoder.

Contexts and items are embedded separately, so the whole catalog can be embedded offline into
an ANN index and a request costs one context forward pass. Training is contrastive: each
context must pick its own positive among every item of the local batch (in-batch negatives,
plus any hard negatives in its group), with a softmax temperature that is learned or fixed.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from shoprank.config import Config
from shoprank.models.encoder import apply_lora, encode, load_encoder

SETTINGS = "retriever.json"
# CLIP's cap on the learned logit scale (1 / temperature): keeps training stable.
MAX_LOGIT_SCALE = 100.0


class BiEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, pooling: str, temperature: float, learn: bool):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        # Shape [1], not a scalar: DeepSpeed broadcasts parameters as byte views.
        self.log_scale = nn.Parameter(
            torch.tensor([math.log(1.0 / temperature)]), requires_grad=learn
        )

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, L] token rows -> [N, d] unit vectors (fp32)."""
        return encode(self.encoder, input_ids, attention_mask, self.pooling)

    def forward(
        self,
        ctx_input_ids: torch.Tensor,
        ctx_attention_mask: torch.Tensor,
        item_input_ids: torch.Tensor,
        item_attention_mask: torch.Tensor,
        item_rows: torch.Tensor,
    ) -> torch.Tensor:
        """The contrastive loss of a group batch.

        Computed inside forward so that a DeepSpeed engine's autocast and ZeRO-3 parameter
        gathering (the temperature included) apply to all of it.
        """
        ctx = self.embed(ctx_input_ids, ctx_attention_mask)
        b, g, length = item_input_ids.shape
        items = self.embed(
            item_input_ids.reshape(b * g, length), item_attention_mask.reshape(b * g, length)
        )
        return contrastive_loss(ctx, items, item_rows, self.scale())

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE).squeeze()

    def save_pretrained(self, directory: str) -> None:
        """The encoder in Hugging Face form (full weights or a peft adapter) + tower settings."""
        self.encoder.save_pretrained(directory)
        settings = {"pooling": self.pooling, "temperature": float(1.0 / self.scale().item())}
        with open(os.path.join(directory, SETTINGS), "w") as f:
            json.dump(settings, f)


def build_retriever(cfg: Config) -> BiEncoder:
    encoder = load_encoder(cfg.model)
    if cfg.lora.enabled:
        encoder = apply_lora(encoder, cfg.lora)
    r = cfg.retriever
    return BiEncoder(encoder, r.pooling, r.temperature, r.learn_temperature)


def contrastive_loss(
    ctx: torch.Tensor, items: torch.Tensor, item_rows: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """InfoNCE over the whole local batch: context b's positive is items[b * G].

    Every other item of the batch (other groups' positives and all hard negatives) is a
    negative, except copies of b's own positive (the same catalog row), which are masked out:
    a popular item bought by two users in one batch must not push itself away.
    """
    b = ctx.shape[0]
    g = items.shape[0] // b
    logits = scale * ctx.float() @ items.float().T  # [B, B*G]
    rows = item_rows.reshape(-1)
    target = torch.arange(b, device=ctx.device) * g
    same = rows[None, :] == rows[target][:, None]
    same[torch.arange(b, device=ctx.device), target] = False
    return F.cross_entropy(logits.masked_fill(same, float("-inf")), target)


LOSS_INPUTS = (
    "ctx_input_ids",
    "ctx_attention_mask",
    "item_input_ids",
    "item_attention_mask",
    "item_rows",
)


def retriever_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """`model` is the BiEncoder or the DeepSpeed engine wrapping it."""
    return model(**{k: batch[k] for k in LOSS_INPUTS})
