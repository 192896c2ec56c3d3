"""Examples: (context, candidate items, labels) groups built per user with Ray Data.

Each output row is one group: the positive item first, then sampled negatives. The context is
the user's history (recommendation) or the query of the search that led to the positive
(search). Training groups
hold 1 + `negatives` items; validation and test groups hold 1 + (eval_candidates - 1), the
sampled-candidate protocol. Keeping a group in one row lets Ray Data shuffle rows freely while
BCE and the listwise softmax both see whole groups.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col

from shoprank.config import DataConfig
from shoprank.data.contract import POSITIVE_EVENTS, SPLITS
from shoprank.data.sampling import sample_negatives, user_rng
from shoprank.data.text import render_context, render_items

EXAMPLE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("split", pa.string()),
        ("context", pa.string()),
        ("history_ids", pa.list_(pa.string())),
        ("item_ids", pa.list_(pa.string())),
        ("item_texts", pa.list_(pa.string())),
        ("labels", pa.list_(pa.float32())),
    ]
)


def leave_one_out(n: int) -> list[str]:
    """The split of each of a user's n time-ordered positives: last test, one before valid."""
    if n < 3:
        return ["train"] * n
    return ["train"] * (n - 2) + ["valid", "test"]


class ExampleBuilder:
    """Builds one user's groups; a class so the catalog lookup is built once per Ray actor."""

    def __init__(self, catalog: pa.Table, cfg: DataConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.item_ids = catalog["item_id"].to_pylist()
        self.texts = render_items(catalog, cfg.item_template)
        self.text_of = dict(zip(self.item_ids, self.texts, strict=True))
        self.index = {item: i for i, item in enumerate(self.item_ids)}

    def __call__(self, events: pa.Table) -> pa.Table:
        sort_keys = [("ts", "ascending")]
        if "position" in events.column_names:
            sort_keys.append(("position", "ascending"))
        events = events.sort_by(sort_keys)
        user = events["user_id"][0].as_py()
        seq = [self.index[i] for i in events["item_id"].to_pylist()]
        if "split" in events.column_names:
            splits = events["split"].to_pylist()
        else:
            splits = leave_one_out(len(seq))
        search = self.cfg.task == "search"
        queries = events["query"].to_pylist() if search else None
        rng = user_rng(self.seed, user)
        exclude = np.asarray(seq)
        rows: dict[str, list] = {name: [] for name in EXAMPLE_SCHEMA.names}
        for i, (target, split) in enumerate(zip(seq, splits, strict=True)):
            if i == 0 and not search:
                continue  # no history to predict from
            history = [self.item_ids[h] for h in seq[:i][::-1]]  # newest first
            n_neg = self.cfg.negatives if split == "train" else self.cfg.eval_candidates - 1
            candidates = [target, *sample_negatives(rng, len(self.item_ids), exclude, n_neg)]
            rows["user_id"].append(user)
            rows["split"].append(split)
            rows["context"].append(
                queries[i]  # search: the query the user typed
                if search
                else render_context(history, self.text_of, self.cfg)
            )
            rows["history_ids"].append(history)
            rows["item_ids"].append([self.item_ids[c] for c in candidates])
            rows["item_texts"].append([self.texts[c] for c in candidates])
            rows["labels"].append([1.0] + [0.0] * n_neg)
        return pa.table(rows, schema=EXAMPLE_SCHEMA)


def positive_only(batch: pa.Table) -> pa.Table:
    """Keep each group's positive: the full-catalog protocol needs no sampled candidates."""
    for name in ("item_ids", "item_texts", "labels"):
        i = batch.schema.get_field_index(name)
        batch = batch.set_column(i, name, pc.list_slice(batch[name], 0, 1))
    return batch


def positive_events(events: ray.data.Dataset, task: str) -> ray.data.Dataset:
    """Clicks, carts and purchases; browsing ones for recommendation, searches for search."""

    def keep(batch: pa.Table) -> pa.Table:
        mask = pc.is_in(batch["event"], pa.array(POSITIVE_EVENTS))
        if "query" in batch.column_names:
            browsing = pc.is_null(batch["query"])
            mask = pc.and_(mask, browsing if task == "recommend" else pc.invert(browsing))
        return batch.filter(mask)

    return events.map_batches(keep, batch_format="pyarrow")


_ORDER = "_user_order"


def _user_order(batch: pa.Table) -> pa.Array:
    """A stable pseudo-random order of users (Ray Data's group order changes run to run)."""
    ids = batch["user_id"].to_pylist()
    return pa.array([zlib.crc32(u.encode()) for u in ids], pa.int64())


def build_examples(
    events: ray.data.Dataset, catalog: pa.Table, cfg: DataConfig, seed: int
) -> dict[str, ray.data.Dataset]:
    """Per-split example datasets, materialised in the object store (not on the driver)."""
    positives = positive_events(events, cfg.task)
    # A few hash partitions suffice for small logs; big ones get one per ~20k events.
    partitions = int(min(200, max(2, positives.count() // 20_000)))
    grouped = positives.groupby("user_id", num_partitions=partitions)
    examples = grouped.map_groups(
        ExampleBuilder,
        fn_constructor_kwargs={"catalog": catalog, "cfg": cfg, "seed": seed},
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
    ).materialize()
    out = {}
    for split in SPLITS:
        part = examples.filter(expr=col("split") == split)
        if split == "train":
            part = part.random_shuffle(seed=seed)
            if cfg.max_train_positives:
                part = part.limit(cfg.max_train_positives)
        else:
            users = cfg.val_users if split == "valid" else cfg.test_users
            if users is not None:  # the same users every run: the first N by a hash of the id
                part = part.add_column(_ORDER, _user_order, batch_format="pyarrow")
                part = part.sort(_ORDER).limit(users).drop_columns([_ORDER])
        out[split] = part.materialize()
    return out
