"""Tokenization inside Ray Data (tasks, see `data.tasks`): example groups in, fixed-shape token
tensors out.

The ranker reads (context, item) pairs; the retriever reads contexts and items separately
(`TowerTokenizer`), and the catalog alone when it is embedded (`ItemTokenizer`).
"""

from __future__ import annotations

import numpy as np

from shoprank.data.tasks import as_tasks
from shoprank.models.encoder import load_tokenizer

# An optional column carried through tokenization and scoring, to line results up with inputs.
KEY = "key"


def pair_tokens(
    tokenizer, contexts: list[str], items: list[str], max_length: int, pad: bool = True
) -> dict[str, np.ndarray]:
    """`[CLS] context [SEP] item` token rows: THE pair encoding of the ranker, in training,
    evaluation and serving alike. `pad` pads to max_length (rectangular Ray Data columns);
    otherwise to the longest pair."""
    tok = tokenizer(
        contexts,
        items,
        padding="max_length" if pad else "longest",
        truncation="longest_first",
        max_length=max_length,
        return_tensors="np",
    )
    return {k: v.astype(np.int32) for k, v in tok.items()}


def text_tokens(
    tokenizer, texts: list[str], max_length: int, pad: bool = True
) -> dict[str, np.ndarray]:
    """One text a row (a context or an item, for a bi-encoder tower); padded as `pair_tokens`."""
    tok = tokenizer(
        [str(t) for t in texts],
        padding="max_length" if pad else "longest",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
        return_token_type_ids=False,
    )
    return {k: v.astype(np.int32) for k, v in tok.items()}


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
        tok = pair_tokens(self.tokenizer, contexts, items, self.max_length)
        n = len(batch["context"])
        out = {k: v.reshape(n, size, -1) for k, v in tok.items()}
        out["labels"] = np.stack(batch["labels"]).astype(np.float32)
        if KEY in batch:
            out[KEY] = batch[KEY]
        if self.keep_text:
            out["user_id"], out["context"] = batch["user_id"], batch["context"]
            for key in ("history_ids", "item_ids", "item_texts"):
                out[key] = list_column(batch[key])
        return out


class TowerTokenizer:
    """Context and items tokenized apart, for the bi-encoder, plus each item's catalog row.

    The rows let the contrastive loss recognise the same item in two groups of a batch, and
    full-catalog validation find each target among the embedded catalog.
    """

    def __init__(
        self,
        model_name: str,
        context_max_length: int,
        item_max_length: int,
        catalog_ids: list[str],
        keep_text: bool = False,
    ):
        self.tokenizer = load_tokenizer(model_name)
        self.context_max_length = context_max_length
        self.item_max_length = item_max_length
        self.rows = {item: i for i, item in enumerate(catalog_ids)}
        self.keep_text = keep_text

    def _tokens(self, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
        return text_tokens(self.tokenizer, texts, max_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        groups = {len(items) for items in batch["item_texts"]}
        if len(groups) != 1:
            raise ValueError(f"groups of unequal size in one batch: {sorted(groups)}")
        n, size = len(batch["context"]), groups.pop()
        ctx = self._tokens([str(c) for c in batch["context"]], self.context_max_length)
        items = self._tokens(
            [t for texts in batch["item_texts"] for t in texts], self.item_max_length
        )
        out = {f"ctx_{k}": v for k, v in ctx.items()}
        out.update({f"item_{k}": v.reshape(n, size, -1) for k, v in items.items()})
        out["item_rows"] = np.array(
            [[self.rows[i] for i in ids] for ids in batch["item_ids"]], dtype=np.int32
        )
        out["labels"] = np.stack(batch["labels"]).astype(np.float32)
        if self.keep_text:
            for key in ("user_id", "split", "context"):
                out[key] = batch[key]
            for key in ("history_ids", "item_ids", "item_texts"):
                out[key] = list_column(batch[key])
        return out


class ItemTokenizer:
    """Catalog rows {row, text} to item token arrays, for embedding the catalog."""

    def __init__(self, model_name: str, max_length: int):
        self.tokenizer = load_tokenizer(model_name)
        self.max_length = max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tok = text_tokens(self.tokenizer, list(batch["text"]), self.max_length)
        return {
            "row": batch["row"],
            "item_input_ids": tok["input_ids"],
            "item_attention_mask": tok["attention_mask"],
        }


def list_column(values: np.ndarray) -> np.ndarray:
    """Ragged lists as a 1-D object array of Python lists, which Arrow stores as list<string>."""
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value.tolist()
    return column


def _map(ds, tokenizer: type, kwargs: dict, batch_size: int):
    return ds.map_batches(
        **as_tasks(tokenizer, kwargs), batch_size=batch_size, batch_format="numpy"
    )


def tokenize(ds, model_name: str, max_length: int, keep_text: bool = False, batch_size: int = 64):
    """Tokenized copy of an example dataset for the ranker (context, item) pairs."""
    kwargs = {"model_name": model_name, "max_length": max_length, "keep_text": keep_text}
    return _map(ds, PairTokenizer, kwargs, batch_size)


def tokenize_towers(
    ds,
    model_name: str,
    context_max_length: int,
    item_max_length: int,
    catalog_ids: list[str],
    keep_text: bool = False,
    batch_size: int = 64,
):
    """Tokenized copy of an example dataset for the retriever's two towers."""
    kwargs = {
        "model_name": model_name,
        "context_max_length": context_max_length,
        "item_max_length": item_max_length,
        "catalog_ids": catalog_ids,
        "keep_text": keep_text,
    }
    return _map(ds, TowerTokenizer, kwargs, batch_size)


def tokenize_items(ds, model_name: str, max_length: int, batch_size: int = 256):
    """Tokenized catalog rows {row, text}."""
    return _map(ds, ItemTokenizer, {"model_name": model_name, "max_length": max_length}, batch_size)


def for_model(ds, cfg, catalog_ids: list[str], keep_text: bool = False):
    """Example groups tokenized the way `cfg.model.kind` reads them."""
    if cfg.model.kind == "retriever":
        return tokenize_towers(
            ds,
            cfg.model.name,
            cfg.retriever.context_max_length,
            cfg.model.max_length,
            catalog_ids,
            keep_text,
        )
    return tokenize(ds, cfg.model.name, cfg.model.max_length, keep_text)
