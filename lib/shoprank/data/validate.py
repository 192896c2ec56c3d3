"""Validation of catalog, events and judgments against the Parquet contract (docs/DESIGN.md).

Bad rows are never dropped silently: every `check_*` function returns all input rows, conformed
to the contract's types, plus a string column `contract.REASON` that is null for good rows and
a short reason code for bad ones. `split_quarantine` then separates them so that a job can
write the bad rows to a quarantine Parquet and count them by reason.

Everything here is plain pyarrow (no Ray), so that the jobs can run these functions inside Ray
Data `map_batches(..., batch_format="pyarrow")` and the tests can run them without a cluster.
Checks that compare rows with each other (duplicates) only see the rows of one call, i.e. one
batch under Ray Data; data/load.py then finds the repeats across batches.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.data import contract

KINDS = ("catalog", "events", "judgments")

# Reason codes, in the order they are checked: a row gets the first one that applies.
CATALOG_REASONS = (
    "missing_item_id",
    "untrimmed_id",
    "empty_title",
    "text_too_long",
    "bad_price",
    "duplicate_item_id",
)
EVENTS_REASONS = (
    "missing_user_id",
    "missing_item_id",
    "untrimmed_id",
    "unknown_item",
    "bad_event",
    "bad_timestamp",
    "bad_split",
    "duplicate",
)
JUDGMENTS_REASONS = (
    "missing_query_id",
    "missing_query",
    "missing_item_id",
    "unknown_item",
    "bad_label",
    "bad_split",
    "duplicate",
)

# Columns whose exact repeat makes an event row a duplicate.
EVENT_KEY = ("user_id", "item_id", "ts", "event", "query")
JUDGMENT_KEY = ("query_id", "item_id")

_SCHEMAS = {
    "catalog": (contract.CATALOG_SCHEMA, contract.CATALOG_REQUIRED),
    "events": (contract.EVENTS_SCHEMA, contract.EVENTS_REQUIRED),
    "judgments": (contract.JUDGMENTS_SCHEMA, contract.JUDGMENTS_REQUIRED),
}

_ISO_NAIVE = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?$"
_ISO_OFFSET = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)$"
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


class SchemaError(ValueError):
    """A column is missing or has a type the contract cannot take: the job must stop."""


class DataQualityError(ValueError):
    """Too many rows failed validation: the job stops rather than train on broken data."""


# ---------------------------------------------------------------------------------------------
# Schema


def _is_stringish(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_stringish(t.value_type)
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_null(t)
    )


def _is_numeric(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_decimal(t)
        or pa.types.is_null(t)
    )


def _rule(kind: str, name: str, target: pa.DataType) -> tuple[Callable[[pa.DataType], bool], str]:
    """(accepts, 'expected ...; fix') for one contract column."""
    if name == "ts":
        return (
            lambda t: pa.types.is_timestamp(t) or _is_stringish(t),
            "expected timestamp or an ISO-8601 string; cast it before writing",
        )
    if kind == "judgments" and name == "label":
        return (
            lambda t: _is_numeric(t) or _is_stringish(t),
            "expected a number (graded gain) or an ESCI letter E/S/C/I; cast it before writing",
        )
    if pa.types.is_string(target):
        fix = "cast it to string before writing"
        if name.endswith("_id"):
            fix = "ids must be strings: cast it to string before writing"
        return _is_stringish, f"expected string; {fix}"
    if pa.types.is_floating(target):
        return _is_numeric, "expected a number; cast it to float64 before writing"
    if pa.types.is_integer(target):
        return (
            lambda t: pa.types.is_integer(t) or pa.types.is_null(t),
            "expected an integer; cast it to int64 before writing",
        )
    if pa.types.is_boolean(target):
        return (
            lambda t: pa.types.is_boolean(t) or pa.types.is_null(t),
            "expected bool; cast it to bool before writing",
        )
    raise AssertionError(f"no rule for {kind}.{name} ({target})")  # contract changed


# Optional columns per kind: type-checked and conformed when present, left absent otherwise.
_OPTIONAL_FIELDS = {
    "events": contract.EVENTS_SERVED_FIELDS,
    "judgments": (contract.JUDGMENTS_SPLIT_FIELD,),
}


def _typed_fields(kind: str) -> list[pa.Field]:
    """The contract's columns, then the optional ones (served events, judgments' split),
    checked when present."""
    target, _ = _SCHEMAS[kind]
    return [*target, *_OPTIONAL_FIELDS.get(kind, ())]


def check_schema(schema: pa.Schema, kind: str) -> None:
    """Raise SchemaError naming the first missing required column or mistyped column.

    Extra columns are allowed; missing optional contract columns are allowed (filled with nulls
    by the `check_*` functions); the served columns (contract.EVENTS_SERVED_FIELDS) and the
    judgments' `split` are type-checked when present and left absent when absent.
    """
    if kind not in _SCHEMAS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    target, required = _SCHEMAS[kind]
    names = set(schema.names)
    for name in required:
        if name not in names:
            seen = ", ".join(schema.names) or "none"
            raise SchemaError(
                f"{kind}: required column '{name}' is missing (columns seen: {seen}); "
                f"add it or rename the source column to '{name}'"
            )
    for field in _typed_fields(kind):
        if field.name not in names:
            continue
        accepts, expected = _rule(kind, field.name, field.type)
        seen_type = schema.field(field.name).type
        if not accepts(seen_type):
            raise SchemaError(f"{kind}: column '{field.name}' has type {seen_type}; {expected}")
    if kind == "events" and "split" in names and not _is_stringish(schema.field("split").type):
        raise SchemaError(
            f"events: column 'split' has type {schema.field('split').type}; expected one of "
            f"{', '.join(contract.SPLITS)} as a string; cast it before writing"
        )


# ---------------------------------------------------------------------------------------------
# Conforming columns to the contract's types


def _as_table(data: pa.Table | pa.RecordBatch) -> pa.Table:
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    return data


def _to_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return values


def _to_string(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    if pa.types.is_string(col.type):
        return col
    return pc.cast(col, pa.string())  # large_string, string_view, dictionary, null


def _parse_iso(strings: pa.Array) -> pa.Array:
    """ISO-8601 strings to naive UTC timestamp[us]; anything unparsable becomes null."""
    s = pc.utf8_trim_whitespace(strings)
    naive_ok = pc.fill_null(pc.match_substring_regex(s, _ISO_NAIVE), False)
    offset_ok = pc.fill_null(pc.match_substring_regex(s, _ISO_OFFSET), False)
    naive_s = pc.if_else(naive_ok, s, pa.scalar(None, pa.string()))
    offset_s = pc.if_else(offset_ok, s, pa.scalar(None, pa.string()))
    try:
        naive = pc.cast(naive_s, pa.timestamp("us"))
        aware = pc.cast(pc.cast(offset_s, pa.timestamp("us", tz="UTC")), pa.timestamp("us"))
    except pa.ArrowInvalid:
        # The shape is ISO but some value is not a real date (2024-02-30): let pandas coerce
        # those values to null, vectorised, instead of failing the whole batch.
        import pandas as pd

        both = pc.if_else(pc.or_kleene(naive_ok, offset_ok), s, pa.scalar(None, pa.string()))
        parsed = pd.to_datetime(
            both.to_pandas(), format="ISO8601", utc=True, errors="coerce"
        ).dt.tz_localize(None)
        return pa.array(parsed.to_numpy(dtype="datetime64[us]"), pa.timestamp("us"))
    return pc.coalesce(naive, aware)


def _conform_ts(col: pa.ChunkedArray) -> pa.Array:
    if pa.types.is_timestamp(col.type):
        # tz-aware values are stored as UTC; casting to naive keeps that UTC wall time.
        return _to_array(pc.cast(col, pa.timestamp("us"), safe=False))
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), pa.timestamp("us"))
    return _parse_iso(_to_array(_to_string(col)))


def _conform_label(col: pa.ChunkedArray) -> pa.Array:
    """Numbers stay gains; ESCI letters map to contract.ESCI_GAINS; numeric strings parse."""
    if not _is_stringish(col.type) or pa.types.is_null(col.type):
        return _to_array(pc.cast(col, pa.float64()))
    s = pc.utf8_upper(pc.utf8_trim_whitespace(_to_array(_to_string(col))))
    letters = list(contract.ESCI_GAINS)
    esci = pc.take(
        pa.array([contract.ESCI_GAINS[k] for k in letters], pa.float64()),
        pc.index_in(s, value_set=pa.array(letters)),
    )
    is_number = pc.fill_null(pc.match_substring_regex(s, _NUMBER), False)
    number = pc.cast(pc.if_else(is_number, s, pa.scalar(None, pa.string())), pa.float64())
    return pc.coalesce(esci, number)


def _conform(table: pa.Table, kind: str) -> pa.Table:
    """Contract columns first (cast, or all-null when absent), the optional columns that are
    present (cast), then the extra columns."""
    target, _ = _SCHEMAS[kind]
    n = table.num_rows
    columns, fields = [], []
    present = table.column_names
    for field in _typed_fields(kind):
        if field.name not in target.names and field.name not in present:
            continue  # an optional served column this source does not have: stays absent
        if field.name not in present:
            col = pa.nulls(n, field.type)
        elif field.name == "ts":
            col = _conform_ts(table.column("ts"))
        elif kind == "judgments" and field.name == "label":
            col = _conform_label(table.column("label"))
        elif pa.types.is_string(field.type):
            col = _to_string(table.column(field.name))
        else:
            col = pc.cast(table.column(field.name), field.type)
        columns.append(col)
        fields.append(pa.field(field.name, field.type))  # nullable: bad rows may hold nulls
    done = {f.name for f in fields}
    for name in table.column_names:
        if name in done or name == contract.REASON:
            continue
        col = table.column(name)
        if kind == "events" and name == "split":
            col = _to_string(col)
        columns.append(col)
        fields.append(pa.field(name, col.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


# ---------------------------------------------------------------------------------------------
# Row checks


def _missing(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Null or blank."""
    blank = pc.equal(pc.utf8_trim_whitespace(col), "")
    return pc.fill_null(pc.or_kleene(pc.is_null(col), blank), True)


def _untrimmed(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Ids with leading or trailing whitespace: " A1" and "A1" would be two items (or users)."""
    return pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(col), col), False)


def _longer(col: pa.ChunkedArray | pa.Array, chars: int) -> pa.ChunkedArray | pa.Array:
    return pc.fill_null(pc.greater(pc.utf8_length(col), chars), False)


def _bad_time(ts: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Null, before 1970 or more than FUTURE_SLACK_DAYS ahead of now."""
    now = datetime.now(UTC).replace(tzinfo=None)
    latest = pa.scalar(now + timedelta(days=contract.FUTURE_SLACK_DAYS), pa.timestamp("us"))
    earliest = pa.scalar(datetime(1970, 1, 1), pa.timestamp("us"))
    out_of_range = pc.or_kleene(pc.less(ts, earliest), pc.greater(ts, latest))
    return pc.or_kleene(pc.is_null(ts), pc.fill_null(out_of_range, False))


def _not_in(col: pa.ChunkedArray | pa.Array, values: pa.Array) -> pa.ChunkedArray | pa.Array:
    return pc.invert(pc.fill_null(pc.is_in(col, value_set=values), False))


def _catalog_set(catalog_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    return _to_array(_to_string(catalog_ids))


def _assign(n: int, checks: list[tuple[str, pa.ChunkedArray | pa.Array]]) -> pa.Array:
    """One reason per row: the first check in `checks` whose mask is true."""
    reason = pa.nulls(n, pa.string())
    for code, mask in reversed(checks):
        reason = pc.if_else(_to_array(pc.fill_null(mask, False)), code, reason)
    return _to_array(reason)


def _repeats(table: pa.Table, keys: tuple[str, ...], eligible: pa.Array) -> pa.Array:
    """True for the 2nd and later occurrence of a key among eligible rows (input order)."""
    idx = pa.array(np.arange(table.num_rows, dtype=np.int64))
    sub = table.select(list(keys)).append_column("__row", idx).filter(eligible)
    first = sub.group_by(list(keys), use_threads=False).aggregate([("__row", "min")])
    is_first = pc.is_in(idx, value_set=_to_array(first.column("__row_min")))
    return pc.and_(eligible, pc.invert(is_first))


def mark_repeats(table: pa.Table, keys: tuple[str, ...], code: str) -> pa.Table:
    """All rows with REASON: `code` for the 2nd and later occurrence of a key, else null."""
    dup = _repeats(table, keys, pa.array(np.ones(table.num_rows, dtype=bool)))
    reason = pc.if_else(dup, code, pa.scalar(None, pa.string()))
    return table.append_column(pa.field(contract.REASON, pa.string()), reason)


def _with_reason(
    table: pa.Table,
    checks: list[tuple[str, pa.ChunkedArray | pa.Array]],
    dup_code: str,
    dup_keys: tuple[str, ...],
) -> pa.Table:
    reason = _assign(table.num_rows, checks)
    dup = _repeats(table, dup_keys, pc.is_null(reason))
    reason = pc.if_else(dup, dup_code, reason)
    return table.append_column(pa.field(contract.REASON, pa.string()), reason)


def check_catalog(table: pa.Table) -> pa.Table:
    """All rows, conformed, with REASON. Of repeated item_ids, the first otherwise-good row wins."""
    table = _as_table(table)
    check_schema(table.schema, "catalog")
    t = _conform(table, "catalog")
    price = t.column("price")
    # NaN, negative, infinite or past MAX_PRICE (nulls are fine: price is optional).
    bad_price = pc.or_kleene(
        pc.or_kleene(pc.is_nan(price), pc.less(price, 0.0)),
        pc.greater(price, contract.MAX_PRICE),  # infinity included
    )
    too_long = pc.or_kleene(
        _longer(t.column("title"), contract.MAX_TITLE_CHARS),
        _longer(t.column("description"), contract.MAX_DESCRIPTION_CHARS),
    )
    checks = [
        ("missing_item_id", _missing(t.column("item_id"))),
        ("untrimmed_id", _untrimmed(t.column("item_id"))),
        ("empty_title", _missing(t.column("title"))),
        ("text_too_long", too_long),
        ("bad_price", bad_price),
    ]
    return _with_reason(t, checks, "duplicate_item_id", ("item_id",))


def check_events(batch: pa.Table, catalog_ids: pa.Array) -> pa.Table:
    """All rows, conformed (ts -> naive UTC timestamp[us]), with REASON.

    `catalog_ids` are the item ids of the good catalog rows. Duplicates are exact repeats of
    (user_id, item_id, ts, event, query) within this batch; the first one is kept.
    """
    table = _as_table(batch)
    check_schema(table.schema, "events")
    t = _conform(table, "events")
    checks = [
        ("missing_user_id", _missing(t.column("user_id"))),
        ("missing_item_id", _missing(t.column("item_id"))),
        (
            "untrimmed_id",
            pc.or_kleene(_untrimmed(t.column("user_id")), _untrimmed(t.column("item_id"))),
        ),
        ("unknown_item", _not_in(t.column("item_id"), _catalog_set(catalog_ids))),
        ("bad_event", _not_in(t.column("event"), pa.array(contract.EVENT_TYPES))),
        ("bad_timestamp", _bad_time(t.column("ts"))),
    ]
    if "split" in t.column_names:
        checks.append(("bad_split", _not_in(t.column("split"), pa.array(contract.SPLITS))))
    return _with_reason(t, checks, "duplicate", EVENT_KEY)


def check_judgments(table: pa.Table, catalog_ids: pa.Array) -> pa.Table:
    """All rows, conformed (ESCI letters -> gains), with REASON.

    A label is bad when null, unparsable, NaN, infinite or negative; a `split`, where the
    column is present, when it is not one of contract.SPLITS. A repeated (query_id, item_id)
    pair is a duplicate: its first good row is kept.
    """
    table = _as_table(table)
    check_schema(table.schema, "judgments")
    t = _conform(table, "judgments")
    label = t.column("label")
    bad_label = pc.or_kleene(
        pc.or_kleene(pc.is_null(label), pc.is_nan(label)),
        pc.or_kleene(pc.is_inf(label), pc.less(label, 0.0)),
    )
    checks = [
        ("missing_query_id", _missing(t.column("query_id"))),
        ("missing_query", _missing(t.column("query"))),
        ("missing_item_id", _missing(t.column("item_id"))),
        ("unknown_item", _not_in(t.column("item_id"), _catalog_set(catalog_ids))),
        ("bad_label", bad_label),
    ]
    if "split" in t.column_names:
        checks.append(("bad_split", _not_in(t.column("split"), pa.array(contract.SPLITS))))
    return _with_reason(t, checks, "duplicate", JUDGMENT_KEY)


# ---------------------------------------------------------------------------------------------
# Quarantine and thresholds


def split_quarantine(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(good rows without REASON, bad rows with REASON) from a `check_*` result."""
    if contract.REASON not in table.column_names:
        raise ValueError(
            f"table has no '{contract.REASON}' column; run a check_* function on it first"
        )
    reason = table.column(contract.REASON)
    good = table.filter(pc.is_null(reason)).drop_columns([contract.REASON])
    bad = table.filter(pc.is_valid(reason))
    return good, bad


def reason_counts(bad: pa.Table) -> dict[str, int]:
    """Rows per reason code, most frequent first."""
    if bad.num_rows == 0:
        return {}
    counts = pc.value_counts(bad.column(contract.REASON).drop_null()).to_pylist()
    pairs = sorted(((c["values"], c["counts"]) for c in counts), key=lambda p: (-p[1], p[0]))
    return dict(pairs)


def enforce_bad_fraction(
    kind: str, counts: dict[str, int], total: int, max_fraction: float
) -> None:
    """Raise DataQualityError when more than `max_fraction` of `total` rows are bad."""
    bad = sum(counts.values())
    if total <= 0 or bad / total <= max_fraction:
        return
    fraction = bad / total
    top = sorted(counts.items(), key=lambda p: (-p[1], p[0]))[:3]
    reasons = ", ".join(f"{code}={n}" for code, n in top)
    raise DataQualityError(
        f"{kind}: {bad} of {total} rows failed validation ({fraction:.2%}), above the threshold "
        f"data.max_bad_fraction={max_fraction:g} ({max_fraction:.2%}); top reasons: {reasons}. "
        f"Fix the source data (the bad rows are in the quarantine Parquet) or, if these rows "
        f"are expected, raise data.max_bad_fraction."
    )
