"""The retriever: a bi-encoder whose two towers (context, item) share one pretrained encoder.

Contexts and items are embedded separately, so the whole catalog can be embedded offline into
an ANN index and a request costs one context forward pass. Training is contrastive: each
context must pick its own positive among every item of the local batch (in-batch negatives,
plus any hard negatives in its group), with a softmax temperature that is learned or fixed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoprank.config import Config, ModelConfig
from shoprank.data.tokenize import text_tokens
from shoprank.models.encoder import apply_lora, encode, encode_pass, load_encoder, load_tokenizer
from shoprank.models.export_meta import METADATA, read_export

SETTINGS = "retriever.json"
# CLIP's cap on the learned logit scale (1 / temperature): keeps training stable.
MAX_LOGIT_SCALE = 100.0
# Inference passes are trimmed in steps this fine (training's batches: encoder.LENGTH_MULTIPLE,
# 32): embedding the Amazon catalog, 8-token steps ran ~10% faster than 32 (RESULTS.md,
# "Catalog embedding"), their few more shapes costing no more than they saved.
EMBED_LENGTH_STEP = 8


class BiEncoder(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        pooling: str,
        temperature: float,
        learn: bool,
        length_buckets: int = 1,
    ):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.length_buckets = length_buckets
        # Shape [1], not a scalar: DeepSpeed broadcasts parameters as byte views.
        self.log_scale = nn.Parameter(
            torch.tensor([math.log(1.0 / temperature)]), requires_grad=learn
        )

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, L] token rows -> [N, d] unit vectors (fp32), in `length_buckets` passes."""
        return encode(self.encoder, input_ids, attention_mask, self.pooling, self.length_buckets)

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
    return BiEncoder(encoder, r.pooling, r.temperature, r.learn_temperature, r.length_buckets)


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


class Encoder:
    """Bi-encoder inference: L2-normalised embeddings of contexts and items, pooled as trained.

    The one embedder behind training-time validation (around the engine's encoder), catalog
    and context embedding in Ray Data (`retrieval/embed.py`), evaluation and the Serve app:
    the same text encoding (`data.tokenize.text_tokens`), pooling, lengths and precision.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        pooling: str,
        context_max_length: int | None = None,  # None: embeds tokens only (training's view)
        item_max_length: int | None = None,
        bf16: bool = False,
        pass_tokens: int = 4096,
    ):
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.max_length = {"context": context_max_length, "item": item_max_length}
        # Rows a pass = pass_tokens // max_length: 64 items of 64 tokens, 32 contexts of 128
        # (index.embed_pass_tokens; bigger and smaller passes were slower on 2 cores).
        self.bf16, self.pass_tokens = bf16, pass_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int | None = None
    ) -> torch.Tensor:
        """[N, L] token rows -> [N, d] fp32 unit vectors, over the first `length` columns
        (None: the batch's longest row, `encoder.trimmed_length`)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if length is None:
                return encode(self.model, input_ids, attention_mask, self.pooling)
            return encode_pass(self.model, input_ids, attention_mask, self.pooling, length)

    @torch.inference_mode()
    def embed(self, texts: list[str], kind: Literal["context", "item"]) -> np.ndarray:
        """[N, d] unit vectors, in the given order.

        Items: tokenized at once, then run shortest first in passes of at most `pass_tokens`
        tokens, each trimmed to its longest row in steps of EMBED_LENGTH_STEP: a pass of short
        rows holds more of them, and a pass of like rows computes almost no padding.

        Contexts: each row is a pass of its own, at its own length. A row's vector then does
        not depend on the rows it was embedded with (BLAS kernels round differently for other
        padding and batch shapes), so a context embedded in an evaluation batch and the same
        context in a served request, alone or coalesced with others, are equal bit for bit:
        the fusion's trees see the same inputs on both sides (tests/test_parity.py). Measured
        on MiniLM contexts of 10-200 words, 2 cores: 0.68x the throughput of packed passes."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        tok = text_tokens(self.tokenizer, texts, self.max_length[kind], False)
        ids, mask = (torch.from_numpy(tok[k]) for k in ("input_ids", "attention_mask"))
        order = torch.argsort(mask.sum(-1), stable=True)
        step = 1 if kind == "context" else EMBED_LENGTH_STEP
        lengths = (-(-mask.sum(-1)[order] // step) * step).clamp(max=mask.shape[1]).tolist()
        budget = 0 if kind == "context" else self.pass_tokens
        out = np.empty((len(texts), 0), dtype=np.float32)
        start = 0
        while start < len(texts):
            end = start + 1  # rows sorted by length: a pass's last row is its longest
            while end < len(texts) and (end + 1 - start) * lengths[end] <= budget:
                end += 1
            rows = order[start:end]
            emb = self.embed_tokens(
                ids[rows].to(self.device), mask[rows].to(self.device), lengths[end - 1]
            )
            if out.shape[1] == 0:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[rows.numpy()] = emb.cpu().numpy()
            start = end
        return out


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder embeds texts, and how: an exported retriever or a pretrained model."""

    model: str
    pooling: str
    context_max_length: int
    item_max_length: int
    attn_implementation: str | None = None

    @classmethod
    def from_export(cls, directory: str) -> EncoderSpec:
        meta = read_export(directory, kind="retriever")
        return cls(
            str(Path(directory).resolve()),
            meta.pooling,
            meta.context_max_length,
            meta.item_max_length,
        )

    @classmethod
    def zero_shot(cls, cfg: Config) -> EncoderSpec:
        """The pretrained encoder as it is: the baseline every fine-tuned retriever must beat."""
        return cls(
            cfg.model.name,
            cfg.retriever.pooling,
            cfg.retriever.context_max_length,
            cfg.model.max_length,
            cfg.model.attn_implementation,
        )

    def load(self, bf16: bool = False) -> Encoder:
        """The encoder this describes, ready to embed (on a GPU when the process has one).
        bf16: bf16 weights, no autocast (autocast re-casts the fp32 weights at every call:
        15-30% slower on the CPU, bench/bench_embed.py; cosine to fp32 above 0.9999)."""
        model_cfg = ModelConfig(attn_implementation=self.attn_implementation, dropout=None)
        model = load_encoder(model_cfg, self.model).eval()
        if bf16:
            model = model.to(torch.bfloat16)
        if torch.cuda.is_available():
            model = model.to("cuda")
        tokenizer = load_tokenizer(self.model)
        return Encoder(
            model, tokenizer, self.pooling, self.context_max_length, self.item_max_length
        )

    def fingerprint(self) -> dict:
        """Changes whenever the weights or the way texts are embedded change (not when the
        export is copied elsewhere, e.g. into the registry)."""
        info = asdict(self)
        folder = Path(self.model)
        if (folder / METADATA).exists():
            digest = hashlib.sha256()
            for weights in sorted(folder.glob("*.safetensors")):
                with open(weights, "rb") as f:
                    for chunk in iter(lambda f=f: f.read(1 << 24), b""):
                        digest.update(chunk)
            info["model"] = "export"
            info["weights_sha256"] = digest.hexdigest()
        return info
