"""Parquet in, validated Arrow out: bad rows are quarantined with a reason and counted."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from shoprank.config import DataConfig
from shoprank.data import read, validate
from shoprank.data.contract import REASON


@dataclass
class Validated:
    catalog: pa.Table
    events: ray.data.Dataset
    judgments: pa.Table | None
    # kind -> {"rows": n, "bad": n, "reasons": {reason: n}}
    counts: dict[str, dict] = field(default_factory=dict)


def _summary(total: int, reasons: dict[str, int]) -> dict:
    return {"rows": total, "bad": sum(reasons.values()), "reasons": reasons}


def _small_table(kind: str, table: pa.Table, checker, quarantine_dir: str, max_bad: float, *args):
    validate.check_schema(table.schema, kind)
    good, bad = validate.split_quarantine(checker(table, *args))
    reasons = validate.reason_counts(bad)
    if bad.num_rows:
        pq.write_table(bad, os.path.join(quarantine_dir, f"{kind}.parquet"))
    validate.enforce_bad_fraction(kind, reasons, table.num_rows, max_bad)
    return good, _summary(table.num_rows, reasons)


KEY_HASH = "__event_key"


def _check_events(batch: pa.Table, catalog_ids: pa.Array) -> pa.Table:
    """check_events, plus a 64-bit hash of each row's event key for the cross-batch check."""
    checked = validate.check_events(batch, catalog_ids)
    keys = checked.select(list(validate.EVENT_KEY)).to_pandas()
    hashes = pd.util.hash_pandas_object(keys, index=False).to_numpy()
    return checked.append_column(KEY_HASH, pa.array(hashes, pa.uint64()))


def _cross_batch_repeats(good: ray.data.Dataset) -> tuple[ray.data.Dataset, pa.Table]:
    """(events with each key once, the later repeats) where a key repeats across batches
    (check_events sees one batch). The hashes go to the driver (8 bytes an event); the few rows
    whose hash repeats are compared exactly there, so a hash collision loses nothing."""
    hashes = [
        b[KEY_HASH].to_numpy()
        for b in good.select_columns([KEY_HASH]).iter_batches(
            batch_format="pyarrow", batch_size=None
        )
    ]
    values, counts = np.unique(
        np.concatenate(hashes or [np.empty(0, np.uint64)]), return_counts=True
    )
    repeated = values[counts > 1].tolist()
    if not repeated:
        return good.drop_columns([KEY_HASH]), pa.table({})
    suspects = good.filter(expr=col(KEY_HASH).is_in(repeated)).drop_columns([KEY_HASH])
    rest = good.filter(expr=col(KEY_HASH).not_in(repeated)).drop_columns([KEY_HASH])
    checked = validate.mark_repeats(suspects.to_arrow(), validate.EVENT_KEY, "duplicate")
    once, repeats = validate.split_quarantine(checked)
    return rest.union(ray.data.from_arrow(once)), repeats


def load_catalog(cfg: DataConfig, quarantine_dir: str) -> tuple[pa.Table, dict]:
    """The validated catalog alone (for jobs that need no events), and its counts."""
    os.makedirs(quarantine_dir, exist_ok=True)
    return _small_table(
        "catalog",
        read.read_table(cfg.catalog),
        validate.check_catalog,
        quarantine_dir,
        cfg.max_bad_fraction,
    )


def load_validated(
    cfg: DataConfig, quarantine_dir: str, events_from: list[str] | None = None
) -> Validated:
    """Read catalog, events and judgments; stop on a wrong schema or too many bad rows.
    `events_from`: folders or files read instead of `cfg.events` (a retraining's days)."""
    counts = {}
    catalog, counts["catalog"] = load_catalog(cfg, quarantine_dir)
    ids = catalog["item_id"].combine_chunks()

    events = read.read_events(events_from or cfg.events)
    validate.check_schema(events.schema().base_schema, "events")
    checked = events.map_batches(
        _check_events, fn_kwargs={"catalog_ids": ids}, batch_format="pyarrow"
    ).materialize()
    bad = checked.filter(expr=col(REASON).is_not_null()).drop_columns([KEY_HASH])
    # Bad rows are few: count them batch by batch rather than with a shuffle.
    reasons: Counter[str] = Counter()
    for batch in bad.select_columns([REASON]).iter_batches(batch_format="pyarrow"):
        reasons.update(validate.reason_counts(batch))
    total = checked.count()
    if reasons:
        bad.write_parquet(os.path.join(quarantine_dir, "events"))
    good_events, repeats = _cross_batch_repeats(
        checked.filter(expr=col(REASON).is_null()).drop_columns([REASON])
    )
    if repeats.num_rows:
        reasons.update(validate.reason_counts(repeats))
        pq.write_table(
            repeats, os.path.join(quarantine_dir, "events-cross-batch-duplicates.parquet")
        )
    counts["events"] = _summary(total, dict(reasons))
    validate.enforce_bad_fraction("events", dict(reasons), total, cfg.max_bad_fraction)

    judgments = None
    if cfg.judgments and read.exists(cfg.judgments):
        judgments, counts["judgments"] = _small_table(
            "judgments",
            read.read_table(cfg.judgments),
            validate.check_judgments,
            quarantine_dir,
            cfg.max_bad_fraction,
            ids,
        )
    return Validated(catalog, good_events, judgments, counts)


def counts_table(counts: dict[str, dict]) -> str:
    """The run summary's data-quality lines."""
    lines = []
    for kind, c in counts.items():
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(c["reasons"].items())) or "none"
        lines.append(f"{kind}: {c['rows']} rows, {c['bad']} quarantined ({reasons})")
    return "\n".join(lines)
