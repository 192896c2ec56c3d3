"""Tokenization inside Ray Data: example groups in, fixed-shape token tensors out."""

from __future__ import annotations

import numpy as np

from shoprank.models.encoder import load_tokenizer


class PairTokenizer:
    """`[CLS] context [SEP] item` for every candidate of a group, as [group, length] arrays.

    Padding to `max_length` keeps tensor columns rectangular for Ray Data; the training loop
    trims each batch back to its longest row, so short texts cost no compute.
    """

    def __init__(self, model_name: str, max_length: int, keep_text: bool = False):
        self.tokenizer = load_tokenizer(model_name)
        self.max_length = max_length
        self.keep_text = keep_text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        groups = [len(items) for items in batch["item_texts"]]
        if len(set(groups)) != 1:
            raise ValueError(f"groups of unequal size in one batch: {sorted(set(groups))}")
        size = groups[0]
        contexts = [c for c in batch["context"] for _ in range(size)]
        items = [t for texts in batch["item_texts"] for t in texts]
        tok = self.tokenizer(
            contexts,
            items,
            padding="max_length",
            truncation="longest_first",
            max_length=self.max_length,
            return_tensors="np",
        )
        n = len(batch["context"])
        out = {k: v.astype(np.int32).reshape(n, size, -1) for k, v in tok.items()}
        out["labels"] = np.stack(batch["labels"]).astype(np.float32)
        if self.keep_text:
            out["user_id"], out["context"] = batch["user_id"], batch["context"]
            for key in ("history_ids", "item_ids", "item_texts"):
                out[key] = _list_column(batch[key])
        return out


def _list_column(values: np.ndarray) -> np.ndarray:
    """Ragged lists as a 1-D object array of Python lists, which Arrow stores as list<string>."""
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value.tolist()
    return column


def tokenize(ds, model_name: str, max_length: int, keep_text: bool = False, batch_size: int = 64):
    """Tokenized copy of an example dataset (one tokenizer per Ray actor)."""
    return ds.map_batches(
        PairTokenizer,
        fn_constructor_kwargs={
            "model_name": model_name,
            "max_length": max_length,
            "keep_text": keep_text,
        },
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=1,
    )
