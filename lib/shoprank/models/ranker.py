"""The ranker: a cross-encoder reading `[CLS] context [SEP] item` and giving one logit.

r̂ = sigmoid(logit) is the probability of a click or purchase; training minimises binary
cross-entropy over the positive and its sampled negatives (docs/DESIGN.md), or, as the option for
ranking metrics, a softmax over each group with the positive first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shoprank.config import Config
from shoprank.models.encoder import apply_lora, load_sequence_scorer

PRECISIONS = ("fp32", "bf16", "int8")

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def build_ranker(cfg: Config) -> nn.Module:
    model = load_sequence_scorer(cfg.model.name, cfg.model)
    return apply_lora(model, cfg.lora) if cfg.lora.enabled else model


def flatten_groups(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[B, G, L] token tensors to [B*G, L'], trimmed to the longest row (padding is free)."""
    mask = batch["attention_mask"]
    length = int(mask.sum(-1).max())
    return {
        k: batch[k].reshape(-1, batch[k].shape[-1])[:, :length].long()
        for k in TOKEN_KEYS
        if k in batch
    }


def ranker_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits shaped like the labels, [B, G]."""
    b, g = batch["labels"].shape
    return model(**flatten_groups(batch)).logits.float().view(b, g)


def ranker_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "bce":
        # ℓ = −[r·log r̂ + (1−r)·log(1−r̂)], averaged over every (context, item) pair.
        return F.binary_cross_entropy_with_logits(logits, labels)
    if kind == "listwise":
        return F.cross_entropy(logits, labels.argmax(dim=1))
    raise ValueError(f"train.loss={kind!r}: use 'bce' or 'listwise'")


def load_for_inference(model_dir: str, precision: str) -> nn.Module:
    """An exported ranker ready to score: fp32, bf16 weights (the fastest batch throughput on
    AMX CPUs and GPUs), or int8 dynamic quantization of its linear layers (CPU)."""
    from transformers import AutoModelForSequenceClassification

    if precision not in PRECISIONS:
        raise ValueError(f"ranker precision {precision!r}: use one of {PRECISIONS}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).eval()
    if precision == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return model
