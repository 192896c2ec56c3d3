"""Parquet in, validated Arrow out: bad rows are quarantined with a reason and counted."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

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


def _check_events(batch: pa.Table, catalog_ids: pa.Array) -> pa.Table:
    return validate.check_events(batch, catalog_ids)


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


def load_validated(cfg: DataConfig, quarantine_dir: str) -> Validated:
    """Read catalog, events and judgments; stop on a wrong schema or too many bad rows."""
    counts = {}
    catalog, counts["catalog"] = load_catalog(cfg, quarantine_dir)
    ids = catalog["item_id"].combine_chunks()

    events = read.read_events(cfg.events)
    validate.check_schema(events.schema().base_schema, "events")
    checked = events.map_batches(
        _check_events, fn_kwargs={"catalog_ids": ids}, batch_format="pyarrow"
    ).materialize()
    bad = checked.filter(expr=col(REASON).is_not_null())
    # Bad rows are few: count them batch by batch rather than with a shuffle.
    reasons: Counter[str] = Counter()
    for batch in bad.select_columns([REASON]).iter_batches(batch_format="pyarrow"):
        reasons.update(validate.reason_counts(batch))
    total = checked.count()
    if reasons:
        bad.write_parquet(os.path.join(quarantine_dir, "events"))
    counts["events"] = _summary(total, dict(reasons))
    validate.enforce_bad_fraction("events", dict(reasons), total, cfg.max_bad_fraction)
    good_events = checked.filter(expr=col(REASON).is_null()).drop_columns([REASON])

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
