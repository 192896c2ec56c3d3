"""Import the Amazon Industrial & Scientific sequences (shared/data/amazon-scientific).

The source has no timestamps, only each user's order (`position`) and a published
leave-one-out `split`. The importer keeps both exactly: every interaction becomes a
"purchase" event whose `ts` is a fixed base date plus `position` days (an ordinal clock, not
real time: only the order within a user means anything), with `position` and `split` kept as
columns.

Item text is "title. category words. brand. " (UniSRec preprocessing). The catalog keeps that
string verbatim in an extra column `text` so that the published protocol's item text can be
reproduced exactly, and parses `title`, `category` and `brand` out of it best-effort (the
category stays the source's space-joined words, not a " > " path, because the level
boundaries are lost; it is null when the source has none).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shoprank.data import contract

TEXT = "text"  # extra catalog column: the source's item text, verbatim
BASE_DATE = dt.datetime(2018, 1, 1)
_DAY_US = 86_400_000_000


def _list_element(parts: pa.Array, index: pa.Array) -> pa.Array:
    """parts[i][index[i]], vectorised (pc.list_element takes one index for all rows)."""
    flat = pc.list_flatten(parts)
    offsets = parts.offsets.to_numpy()[:-1]
    return flat.take(pa.array(offsets + index.to_numpy(zero_copy_only=False)))


def build_catalog(items: pa.Table) -> pa.Table:
    """Contract catalog from items.parquet (item_id, text), plus the verbatim `text`."""
    text = pc.cast(items.column("text"), pa.string()).combine_chunks()
    body = pc.if_else(pc.ends_with(text, ". "), pc.utf8_slice_codeunits(text, 0, -2), text)
    parts = pc.split_pattern(body, ". ", max_splits=2, reverse=True)
    n_parts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    fields = {}
    for name, offset in (("title", 3), ("category", 2), ("brand", 1)):
        index = n_parts - offset
        value = _list_element(parts, pa.array(np.maximum(index, 0)))
        blank = pc.equal(pc.utf8_trim_whitespace(value), "").to_numpy(zero_copy_only=False)
        fields[name] = pc.if_else(pa.array((index < 0) | blank), None, value)
    n = items.num_rows
    return pa.table(
        {
            "item_id": pc.cast(items.column("item_id"), pa.string()),
            "title": pc.coalesce(fields["title"], text),
            "description": pa.nulls(n, pa.string()),
            "brand": fields["brand"],
            "category": fields["category"],
            "price": pa.nulls(n, pa.float64()),
            "in_stock": pa.nulls(n, pa.bool_()),
            TEXT: text,
        },
        schema=contract.CATALOG_SCHEMA.append(pa.field(TEXT, pa.string())),
    )


def build_events(interactions: pa.Table) -> pa.Table:
    """Purchase events in the source's row order; ts = BASE_DATE + position days."""
    position = pc.cast(interactions.column("position"), pa.int64())
    base_us = int(BASE_DATE.replace(tzinfo=dt.UTC).timestamp() * 1_000_000)
    ts = pc.cast(pc.add(pc.multiply(position, _DAY_US), base_us), pa.timestamp("us"))
    n = interactions.num_rows
    return pa.table(
        {
            "user_id": pc.cast(interactions.column("user_id"), pa.string()),
            "item_id": pc.cast(interactions.column("item_id"), pa.string()),
            "ts": ts,
            "event": pa.array(np.full(n, "purchase", dtype=object), pa.string()),
            "query": pa.nulls(n, pa.string()),
            "session_id": pa.nulls(n, pa.string()),
            "position": position,
            "split": pc.cast(interactions.column("split"), pa.string()),
        }
    )


def import_amazon(src_dir: str | Path, out_dir: str | Path) -> dict:
    """Write catalog.parquet and events/dt=YYYY-MM-DD/part-0.parquet; return a summary."""
    src, out = Path(src_dir), Path(out_dir)
    for name in ("items.parquet", "interactions.parquet"):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src / name} not found: point src_dir at amazon-scientific")
    catalog = build_catalog(pq.read_table(src / "items.parquet"))
    events = build_events(pq.read_table(src / "interactions.parquet"))

    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(catalog, out / "catalog.parquet")
    position = events.column("position").to_numpy()
    partitions = 0
    for p in np.unique(position):  # one day per position: at most ~80 small partitions
        day = (BASE_DATE + dt.timedelta(days=int(p))).date().isoformat()
        part = out / "events" / f"dt={day}"
        part.mkdir(parents=True, exist_ok=True)
        pq.write_table(events.filter(pa.array(position == p)), part / "part-0.parquet")
        partitions += 1

    splits = pc.value_counts(events.column("split")).to_pylist()
    return {
        "out_dir": str(out),
        "items": catalog.num_rows,
        "events": events.num_rows,
        "users": len(pc.unique(events.column("user_id"))),
        "splits": {s["values"]: s["counts"] for s in splits},
        "partitions": partitions,
        "items_without_category": catalog.column("category").null_count,
        "items_without_brand": catalog.column("brand").null_count,
        "text_column": TEXT,
    }
