"""Synthetic shop: deterministic, in the contract, planted bad rows found by validation."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from shoprank.data import contract
from shoprank.data.synthetic import generate_shop
from shoprank.data.validate import (
    check_catalog,
    check_events,
    check_judgments,
    reason_counts,
    split_quarantine,
)

SMALL = {"n_items": 400, "n_users": 150, "days": 5}


def _read(out: Path) -> tuple[pa.Table, pa.Table, pa.Table]:
    catalog = pq.read_table(out / "catalog.parquet")
    events = ds.dataset(out / "events", format="parquet", partitioning="hive").to_table()
    judgments = pq.read_table(out / "judgments.parquet")
    return catalog, events, judgments


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shop")
    return out, generate_shop(out, seed=7, **SMALL)


def test_deterministic_for_a_seed(shop, tmp_path):
    out, summary = shop
    again = generate_shop(tmp_path / "again", seed=7, **SMALL)
    assert {k: v for k, v in again.items() if k not in ("out_dir", "seconds")} == {
        k: v for k, v in summary.items() if k not in ("out_dir", "seconds")
    }
    for first, second in zip(_read(out), _read(tmp_path / "again"), strict=True):
        assert first.equals(second)
    other = generate_shop(tmp_path / "other", seed=8, **SMALL)
    assert not _read(tmp_path / "other")[1].equals(_read(out)[1])
    assert other["items"] == summary["items"]


def test_day_partitions(shop):
    out, summary = shop
    parts = sorted(p.parent.name for p in (out / "events").glob("dt=*/part-0.parquet"))
    assert len(parts) == SMALL["days"] == summary["partitions"]
    assert parts[0] == "dt=2024-03-01"
    # Each partition holds only its own day's timestamps.
    for part in parts:
        ts = pq.read_table(out / "events" / part / "part-0.parquet").column("ts")
        days = pc.unique(pc.strftime(ts.drop_null(), format="%Y-%m-%d")).to_pylist()
        assert days == [part.removeprefix("dt=")]


def test_contract_columns_and_types(shop):
    catalog, events, judgments = _read(shop[0])
    for table, schema in [
        (catalog, contract.CATALOG_SCHEMA),
        (events, contract.EVENTS_SCHEMA),
        (judgments, contract.JUDGMENTS_SCHEMA),
    ]:
        for field in schema:
            assert table.schema.field(field.name).type == field.type, field.name
    assert set(pc.unique(events.column("event")).to_pylist()) >= set(contract.EVENT_TYPES)
    assert events.column("session_id").null_count == 0
    assert events.column("position").null_count == 0
    assert " > " in catalog.column("category")[0].as_py()


def test_planted_bad_rows_are_found(shop):
    _, summary = shop
    catalog, events, judgments = _read(shop[0])
    good_catalog, bad_catalog = split_quarantine(check_catalog(catalog))
    assert reason_counts(bad_catalog) == summary["planted"]["catalog"]
    ids = good_catalog.column("item_id")
    good_events, bad_events = split_quarantine(check_events(events, ids))
    counts = reason_counts(bad_events)
    assert counts == summary["planted"]["events"]
    assert set(counts) == {
        "missing_user_id",
        "unknown_item",
        "bad_event",
        "duplicate",
        "bad_timestamp",
    }
    assert all(n > 0 for n in counts.values())
    assert good_events.num_rows == summary["clean_events"]
    assert reason_counts(split_quarantine(check_judgments(judgments, ids))[1]) == {}


def test_judgments_graded(shop):
    judgments = _read(shop[0])[2]
    labels = set(judgments.column("label").to_pylist())
    assert labels == {0.0, 1.0, 2.0, 3.0}
    per_query = pc.value_counts(judgments.column("query_id")).field("counts")
    assert pc.min(per_query).as_py() >= 10 and pc.max(per_query).as_py() <= 30


def test_searches_carry_queries(shop):
    events = _read(shop[0])[1]
    sessions = events.group_by("session_id").aggregate([("query", "count")])
    searched = pc.mean(pc.greater(sessions.column("query_count"), 0)).as_py()
    assert 0.1 < searched < 0.3


def test_default_size_is_fast_and_in_range(tmp_path):
    start = time.perf_counter()
    summary = generate_shop(tmp_path / "default")
    assert time.perf_counter() - start < 30
    assert summary["events"] <= 200_000
    assert 15 <= summary["positives_per_user"] <= 30
    assert summary["judged_queries"] == 200
    assert summary["partitions"] == 14
