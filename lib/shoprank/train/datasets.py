"""Example groups -> the tokenized, materialised datasets the training loop streams."""

from __future__ import annotations

import ray

from shoprank.config import Config
from shoprank.data.examples import positive_only
from shoprank.data.text import render_items
from shoprank.data.tokenize import for_model, tokenize_items
from shoprank.retrieval.embed import text_rows


def training_datasets(
    cfg: Config, catalog, examples: dict[str, ray.data.Dataset]
) -> dict[str, ray.data.Dataset]:
    """ "train", "valid" (and the catalog for a retriever, validated on every item)."""
    ids = catalog["item_id"].to_pylist()
    valid = examples["valid"]
    if cfg.model.kind == "retriever":  # validated on the full catalog: the positive suffices
        valid = valid.map_batches(positive_only, batch_format="pyarrow")
    out = {
        "train": for_model(examples["train"], cfg, ids).materialize(),
        "valid": for_model(valid, cfg, ids).materialize(),
    }
    if cfg.model.kind == "retriever":
        items = text_rows(render_items(catalog, cfg.data.item_template))
        out["catalog"] = tokenize_items(items, cfg.model.name, cfg.model.max_length).materialize()
    for ds in out.values():
        # Streamed to the workers at every epoch and validation: the loop logs its own steps,
        # so a progress bar for each pass would only repeat them.
        ds.context.enable_progress_bars = False
    return out
