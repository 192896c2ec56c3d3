"""Validation: every reason code counted exactly on real Parquet, schema errors that say why."""

from __future__ import annotations

import datetime as dt
import math

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from shoprank.data import contract
from shoprank.data.validate import (
    DataQualityError,
    SchemaError,
    check_catalog,
    check_events,
    check_judgments,
    check_schema,
    enforce_bad_fraction,
    reason_counts,
    split_quarantine,
)

CATALOG_IDS = pa.array(["a", "b", "c"])


def _roundtrip(table: pa.Table, path) -> pa.Table:
    pq.write_table(table, path)
    return pq.read_table(path)


def _reasons(table: pa.Table) -> list[str | None]:
    return table.column(contract.REASON).to_pylist()


# ---------------------------------------------------------------------------------------------
# catalog


def test_catalog_counts_every_reason(tmp_path):
    rows = [
        ("a", "Good kettle", 10.0),
        ("b", "Good mug", None),  # price is optional
        (None, "No id", 1.0),  # missing_item_id
        ("  ", "Blank id", 1.0),  # missing_item_id
        ("c", "", 1.0),  # empty_title
        ("d", "   ", 1.0),  # empty_title
        ("e", None, 1.0),  # empty_title
        ("f", "Negative", -1.0),  # bad_price
        ("g", "NaN price", math.nan),  # bad_price
        ("a", "Second a", 12.0),  # duplicate_item_id
        ("a", "Third a", 12.0),  # duplicate_item_id
    ]
    table = pa.table(
        {
            "item_id": [r[0] for r in rows],
            "title": [r[1] for r in rows],
            "price": pa.array([r[2] for r in rows], pa.float64()),
            "supplier": ["x"] * len(rows),  # extra column, kept
        }
    )
    checked = check_catalog(_roundtrip(table, tmp_path / "catalog.parquet"))
    assert checked.num_rows == len(rows)
    good, bad = split_quarantine(checked)
    assert reason_counts(bad) == {
        "empty_title": 3,
        "bad_price": 2,
        "duplicate_item_id": 2,
        "missing_item_id": 2,
    }
    assert good.column("item_id").to_pylist() == ["a", "b"]
    assert contract.REASON not in good.column_names
    # Contract columns first, in contract order (missing optional ones added as nulls).
    assert good.schema.names[:7] == contract.CATALOG_SCHEMA.names
    assert "supplier" in good.column_names
    assert good.column("brand").null_count == 2


def test_catalog_first_good_occurrence_wins():
    table = pa.table({"item_id": ["a", "a", "a"], "title": ["", "Kettle", "Kettle again"]})
    assert _reasons(check_catalog(table)) == ["empty_title", None, "duplicate_item_id"]


# ---------------------------------------------------------------------------------------------
# events

_T0 = dt.datetime(2024, 3, 1, 10, 0)


def _event_rows():
    """(user, item, ts, event, query, split) with exactly one defect per bad row."""
    t = [_T0 + dt.timedelta(minutes=i) for i in range(20)]
    return [
        ("u1", "a", t[0], "impression", None, "train"),
        ("u1", "a", t[1], "click", None, "train"),
        ("u1", "b", t[2], "purchase", "mug", "valid"),
        ("u2", "c", t[3], "add_to_cart", None, "test"),
        (None, "a", t[4], "click", None, "train"),  # missing_user_id
        ("", "a", t[5], "click", None, "train"),  # missing_user_id
        ("u3", None, t[6], "click", None, "train"),  # missing_item_id
        ("u3", "zzz", t[7], "click", None, "train"),  # unknown_item
        ("u3", "nope", t[8], "click", None, "train"),  # unknown_item
        ("u3", "a", t[9], "view", None, "train"),  # bad_event
        ("u3", "a", t[10], "Click", None, "train"),  # bad_event
        ("u3", "a", None, "click", None, "train"),  # bad_timestamp
        ("u3", "b", t[11], "click", None, "holdout"),  # bad_split
        ("u1", "a", t[1], "click", None, "train"),  # duplicate of row 1
        ("u1", "b", t[2], "purchase", "mug", "valid"),  # duplicate of row 2
        ("u1", "a", t[1], "click", None, "train"),  # duplicate of row 1 again
        ("u1", "b", t[2], "purchase", "cup", "valid"),  # other query: not a duplicate
    ]


def _events_table(rows) -> pa.Table:
    names = ["user_id", "item_id", "ts", "event", "query", "split"]
    cols = {n: [r[i] for r in rows] for i, n in enumerate(names)}
    table = pa.table(cols)
    return table.set_column(2, "ts", pa.array(cols["ts"], pa.timestamp("us")))


def test_events_counts_every_reason(tmp_path):
    table = _events_table(_event_rows())
    checked = check_events(_roundtrip(table, tmp_path / "events.parquet"), CATALOG_IDS)
    good, bad = split_quarantine(checked)
    assert reason_counts(bad) == {
        "duplicate": 3,
        "bad_event": 2,
        "missing_user_id": 2,
        "unknown_item": 2,
        "bad_split": 1,
        "bad_timestamp": 1,
        "missing_item_id": 1,
    }
    assert good.num_rows == 5
    assert good.schema.field("ts").type == pa.timestamp("us")
    assert good.column("position").null_count == 5  # optional, added as nulls
    assert good.column("split").to_pylist() == ["train", "train", "valid", "test", "valid"]


def test_events_string_timestamps(tmp_path):
    ts = [
        "2024-03-01T10:00:00",
        "2024-03-01 10:00:00.250",
        "2024-03-01T12:00:00+02:00",  # offset: converted to UTC
        "2024-03-01T10:00:00Z",
        "2024-03-01",
        "yesterday",  # bad_timestamp
        "2024-02-30T10:00:00",  # ISO shape, not a date: bad_timestamp
        None,  # bad_timestamp
    ]
    n = len(ts)
    table = pa.table(
        {
            "user_id": [f"u{i}" for i in range(n)],
            "item_id": ["a"] * n,
            "ts": ts,
            "event": ["click"] * n,
        }
    )
    checked = check_events(_roundtrip(table, tmp_path / "e.parquet"), CATALOG_IDS)
    assert _reasons(checked) == [None] * 5 + ["bad_timestamp"] * 3
    assert checked.column("ts").to_pylist()[:5] == [
        dt.datetime(2024, 3, 1, 10),
        dt.datetime(2024, 3, 1, 10, 0, 0, 250000),
        dt.datetime(2024, 3, 1, 10),
        dt.datetime(2024, 3, 1, 10),
        dt.datetime(2024, 3, 1),
    ]


def test_events_conform_types():
    """tz-aware ns timestamps, large strings and dictionary columns come out in contract types."""
    table = pa.table(
        {
            "user_id": pa.array(["u1", "u2"], pa.large_string()),
            "item_id": pa.array(["a", "b"]).dictionary_encode(),
            "ts": pa.array([0, 1_000], pa.timestamp("ns", tz="Europe/Paris")),
            "event": ["click", "purchase"],
            "position": pa.array([1, 2], pa.int32()),
            "dt": ["2024-03-01", "2024-03-01"],
        }
    )
    checked = check_events(table, CATALOG_IDS)
    assert _reasons(checked) == [None, None]
    for field in contract.EVENTS_SCHEMA:
        assert checked.schema.field(field.name).type == field.type, field.name
    assert checked.column("ts").to_pylist()[0] == dt.datetime(1970, 1, 1)
    assert checked.column_names[-2:] == ["dt", contract.REASON]


def test_events_record_batch_and_empty():
    table = _events_table(_event_rows()[:2])
    assert check_events(table.to_batches()[0], CATALOG_IDS).num_rows == 2
    empty = check_events(table.slice(0, 0), CATALOG_IDS)
    assert empty.num_rows == 0 and contract.REASON in empty.column_names
    assert reason_counts(split_quarantine(empty)[1]) == {}


# ---------------------------------------------------------------------------------------------
# judgments


def test_judgments_counts_and_esci(tmp_path):
    table = pa.table(
        {
            "query_id": ["q1", "q1", "q1", "q1", "q2", "q2", "q2", "q2", "q3", "q3", "q3"],
            "query": ["mug", "mug", "mug", "mug", "pan", "pan", "pan", "pan", "", "x", "x"],
            "item_id": ["a", "b", "c", "zz", "a", "b", "c", "a", "a", "b", "c"],
            "label": ["E", "s", " C ", "E", "I", "2", "maybe", None, "E", "-1", "3.5"],
        }
    )
    checked = check_judgments(_roundtrip(table, tmp_path / "j.parquet"), CATALOG_IDS)
    assert _reasons(checked) == [
        None, None, None, "unknown_item",
        None, None, "bad_label", "bad_label",
        "missing_query", "bad_label", None,
    ]  # fmt: skip
    assert checked.column("label").to_pylist()[:6] == [1.0, 0.1, 0.01, 1.0, 0.0, 2.0]
    assert checked.schema.field("label").type == pa.float64()


def test_judgments_numeric_labels_and_duplicates():
    table = pa.table(
        {
            "query_id": ["q1", "q1", "q1"],
            "query": ["mug", "mug", "mug"],
            "item_id": ["a", "b", "a"],
            "label": pa.array([3, 0, 2], pa.int32()),
        }
    )
    checked = check_judgments(table, CATALOG_IDS)
    assert _reasons(checked) == [None, None, "duplicate"]
    assert checked.column("label").to_pylist() == [3.0, 0.0, 2.0]


# ---------------------------------------------------------------------------------------------
# schema


def test_schema_missing_column_is_named():
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("ts", pa.string())])
    with pytest.raises(SchemaError, match="events: required column 'event' is missing"):
        check_schema(schema, "events")


@pytest.mark.parametrize(
    ("kind", "column", "bad_type", "hint"),
    [
        ("events", "ts", pa.int64(), "expected timestamp or an ISO-8601 string"),
        ("events", "user_id", pa.int64(), "ids must be strings"),
        ("events", "position", pa.float64(), "expected an integer"),
        ("events", "split", pa.int8(), "expected one of train, valid, test"),
        ("catalog", "item_id", pa.int32(), "ids must be strings"),
        ("catalog", "price", pa.string(), "expected a number"),
        ("catalog", "in_stock", pa.string(), "expected bool"),
        ("judgments", "label", pa.bool_(), "ESCI letter"),
    ],
)
def test_schema_wrong_type_names_column_type_and_fix(kind, column, bad_type, hint):
    base = {
        "catalog": contract.CATALOG_SCHEMA,
        "events": contract.EVENTS_SCHEMA,
        "judgments": contract.JUDGMENTS_SCHEMA,
    }[kind]
    fields = [f for f in base if f.name != column] + [pa.field(column, bad_type)]
    with pytest.raises(SchemaError) as err:
        check_schema(pa.schema(fields), kind)
    message = str(err.value)
    assert f"{kind}: column '{column}' has type {bad_type}" in message
    assert hint in message and "cast it" in message


def test_schema_accepts_contract_and_variants():
    for kind, schema in [
        ("catalog", contract.CATALOG_SCHEMA),
        ("events", contract.EVENTS_SCHEMA),
        ("judgments", contract.JUDGMENTS_SCHEMA),
    ]:
        check_schema(schema.append(pa.field("extra", pa.int64())), kind)
    check_schema(
        pa.schema(
            [
                ("user_id", pa.large_string()),
                ("item_id", pa.dictionary(pa.int32(), pa.string())),
                ("ts", pa.timestamp("ms", tz="UTC")),
                ("event", pa.string()),
            ]
        ),
        "events",
    )
    with pytest.raises(ValueError, match="unknown kind"):
        check_schema(contract.EVENTS_SCHEMA, "clicks")


def test_check_functions_raise_schema_error():
    with pytest.raises(SchemaError, match="'item_id' has type int64"):
        check_catalog(pa.table({"item_id": [1, 2], "title": ["a", "b"]}))


# ---------------------------------------------------------------------------------------------
# quarantine and thresholds


def test_split_quarantine_needs_reason_column():
    with pytest.raises(ValueError, match="run a check_"):
        split_quarantine(pa.table({"item_id": ["a"]}))


def test_enforce_bad_fraction():
    counts = {"unknown_item": 30, "duplicate": 10, "bad_event": 5}
    enforce_bad_fraction("events", counts, total=1000, max_fraction=0.05)  # 4.5%: fine
    enforce_bad_fraction("events", counts, total=900, max_fraction=0.05)  # exactly 5%: fine
    enforce_bad_fraction("events", {}, total=0, max_fraction=0.0)
    with pytest.raises(DataQualityError) as err:
        enforce_bad_fraction("events", counts, total=800, max_fraction=0.05)  # 5.6%
    message = str(err.value)
    for part in ("events", "45 of 800", "5.62%", "data.max_bad_fraction=0.05", "unknown_item=30"):
        assert part in message
    assert isinstance(err.value, ValueError)


def test_reason_counts_order():
    bad = pa.table({contract.REASON: ["b", "a", "b", None]})
    assert list(reason_counts(bad).items()) == [("b", 2), ("a", 1)]
    assert pc.sum(pa.array(list(reason_counts(bad).values()))).as_py() == 3


def test_implausible_rows_are_quarantined():
    """Ids with stray whitespace, huge texts, absurd prices, and times before 1970 or in the
    future are not data a model should learn from."""
    catalog = pa.table(
        {
            "item_id": ["a", " a", "b\t", "c", "d", "e", "f"],
            "title": ["ok", "ok", "ok", "x" * 1001, "ok", "ok", "ok"],
            "description": [None, None, None, None, "y" * 100_001, None, None],
            "price": [1.0, 1.0, 1.0, 1.0, 1.0, 1e9, math.inf],
        }
    )
    assert _reasons(check_catalog(catalog)) == [
        None,
        "untrimmed_id",
        "untrimmed_id",
        "text_too_long",
        "text_too_long",
        "bad_price",
        "bad_price",
    ]
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    times = [_T0, dt.datetime(1969, 12, 31), now + dt.timedelta(days=30), now, _T0, _T0]
    rows = [("u1", "a", t, "click", None, "train") for t in times]
    rows[4] = ("u1 ", "a", _T0, "click", None, "train")
    rows[5] = ("u2", "a ", _T0, "click", None, "train")
    checked = check_events(_events_table(rows), CATALOG_IDS)
    assert _reasons(checked) == [
        None,
        "bad_timestamp",
        "bad_timestamp",
        None,
        "untrimmed_id",
        "untrimmed_id",
    ]


def test_duplicates_across_batches_are_quarantined(tmp_path, ray_local):
    """check_events sees one batch; the load finds the repeats that span batches (files)."""
    from shoprank.config import DataConfig
    from shoprank.data.load import load_validated

    pq.write_table(
        pa.table({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"]}), tmp_path / "c.parquet"
    )
    (tmp_path / "events").mkdir()
    rows = [("u1", "a", _T0 + dt.timedelta(minutes=i), "click", None, "train") for i in range(50)]
    pq.write_table(_events_table(rows), tmp_path / "events" / "part-0.parquet")
    again = rows[:5] + [("u9", "b", _T0, "purchase", None, "train")]
    pq.write_table(_events_table(again), tmp_path / "events" / "part-1.parquet")
    cfg = DataConfig(
        catalog=str(tmp_path / "c.parquet"),
        events=str(tmp_path / "events"),
        judgments=None,
        max_bad_fraction=0.5,
    )
    data = load_validated(cfg, str(tmp_path / "quarantine"))
    assert data.events.count() == 51
    assert data.counts["events"]["reasons"] == {"duplicate": 5}
    quarantined = pq.read_table(tmp_path / "quarantine" / "events")
    assert quarantined.num_rows == 5 and set(quarantined["reason"].to_pylist()) == {"duplicate"}


# ---------------------------------------------------------------------------------------------
# served columns (request_id, model versions): optional, typed when present


def test_events_without_served_columns_load_unchanged():
    table = _events_table(_event_rows()[:4])
    checked = check_events(table, CATALOG_IDS)
    names = [f.name for f in contract.EVENTS_SCHEMA]
    assert checked.column_names == [*names, "split", contract.REASON]
    for field in contract.EVENTS_SERVED_FIELDS:
        assert field.name not in checked.column_names


def test_served_columns_are_conformed_after_the_contract_columns(tmp_path):
    table = _events_table(_event_rows()[:2]).append_column(
        "ranker_version", pa.array([None, 3], pa.int32())
    )
    table = table.append_column("request_id", pa.array(["r1", "r1"], pa.large_string()))
    table = table.append_column("dt", pa.array(["2026-01-01"] * 2))  # a hive partition column
    checked = check_events(_roundtrip(table, tmp_path / "e.parquet"), CATALOG_IDS)
    assert _reasons(checked) == [None, None]
    names = [f.name for f in contract.EVENTS_SCHEMA]
    assert checked.column_names == [
        *names, "request_id", "ranker_version", "split", "dt", contract.REASON,
    ]  # fmt: skip
    assert checked.schema.field("request_id").type == pa.string()
    assert checked.schema.field("ranker_version").type == pa.int64()
    assert checked["ranker_version"].to_pylist() == [None, 3]
    served = contract.SERVED_EVENTS_SCHEMA
    assert served.names == [
        *names, "request_id", "retriever_version", "ranker_version", "explored",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("column", "bad_type", "hint"),
    [
        ("request_id", pa.int64(), "expected string"),
        ("retriever_version", pa.string(), "expected an integer"),
        ("ranker_version", pa.float64(), "expected an integer"),
        ("explored", pa.string(), "expected bool"),
    ],
)
def test_served_column_with_a_wrong_type_is_named(column, bad_type, hint):
    fields = [f for f in contract.SERVED_EVENTS_SCHEMA if f.name != column]
    with pytest.raises(SchemaError) as err:
        check_schema(pa.schema([*fields, pa.field(column, bad_type)]), "events")
    message = str(err.value)
    assert f"events: column '{column}' has type {bad_type}" in message
    assert hint in message and "cast it" in message
