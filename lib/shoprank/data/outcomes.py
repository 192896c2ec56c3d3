"""The join of the app's /feedback outcomes with the answers they are about.

Any replica logs an outcome row (`contract.OUTCOMES_SCHEMA`: request_id, item_id, event, time)
under `<impressions_dir>/_outcomes/`, and no replica remembers answers: an answer's impressions
carry who it was for, each item's position, the model versions and the exploration flag. This
join, run where training data is built, turns each outcome into an events row with those, and
decides what a replica could not, counting each outcome once, in this order:

- `invalid`: no request_id or item_id, or an event other than click, add_to_cart, purchase;
- `unknown_request`: no impression carries its request_id (another app's, a made-up one, or an
  answer older than the impressions read);
- `not_served`: the answer did not show that item;
- `late`: more than `late_after_s` after the answer;
- `duplicate`: the same request, item and event again (the earliest one is kept);
- `joined`: the rest, as rows of `contract.SERVED_EVENTS_SCHEMA` at the outcome's time.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shoprank.data.contract import (
    OUTCOMES_DIR,
    OUTCOMES_SCHEMA,
    POSITIVE_EVENTS,
    SERVED_EVENTS_SCHEMA,
)
from shoprank.data.read import resolve

COUNTS = ("invalid", "unknown_request", "not_served", "late", "duplicate", "joined")
# What an outcome takes from its answer's impression row.
FROM_ANSWER = [
    "user_id",
    "query",
    "session_id",
    "position",
    "retriever_version",
    "ranker_version",
    "explored",
]


def join_outcomes(
    impressions: pa.Table, outcomes: pa.Table, late_after_s: float = 1_800.0
) -> tuple[pa.Table, dict[str, int]]:
    """Outcomes joined to their answers' impressions: the event rows and every outcome's count.

    `impressions`: served events (other events and rows without a request_id are ignored);
    `outcomes`: rows of `OUTCOMES_SCHEMA`."""
    counts = dict.fromkeys(COUNTS, 0)
    loose = pa.schema([f.with_nullable(True) for f in OUTCOMES_SCHEMA])  # nulls are counted
    out = outcomes.select(OUTCOMES_SCHEMA.names).cast(loose)
    valid = pc.and_kleene(
        pc.and_kleene(pc.is_valid(out["request_id"]), pc.is_valid(out["item_id"])),
        pc.is_in(out["event"], value_set=pa.array(POSITIVE_EVENTS)),
    )
    valid = pc.fill_null(valid, False)
    counts["invalid"] = len(out) - pc.sum(valid).as_py() if len(out) else 0
    out = out.filter(valid)

    shown = impressions.filter(
        pc.fill_null(
            pc.and_kleene(
                pc.equal(impressions["event"], "impression"),
                pc.is_valid(impressions["request_id"]),
            ),
            False,
        )
    )
    shown = shown.select(["request_id", "item_id", "ts", *FROM_ANSWER])
    shown = shown.rename_columns(["request_id", "item_id", "served_ts", *FROM_ANSWER])
    # One row an (answer, item): a copied file must not double an outcome.
    shown = shown.group_by(["request_id", "item_id"], use_threads=False).aggregate(
        [(c, "first") for c in ["served_ts", *FROM_ANSWER]]
    )
    shown = shown.rename_columns(["request_id", "item_id", "served_ts", *FROM_ANSWER])

    known = pc.is_in(out["request_id"], value_set=pc.unique(shown["request_id"]))
    counts["unknown_request"] = len(out) - pc.sum(known).as_py() if len(out) else 0
    out = out.filter(known)

    out = out.append_column("_row", pa.array(range(len(out)), pa.int64()))
    joined = out.join(shown, keys=["request_id", "item_id"], join_type="inner")
    counts["not_served"] = len(out) - len(joined)

    lag = pc.divide(pc.cast(pc.subtract(joined["ts"], joined["served_ts"]), pa.int64()), 1_000_000)
    on_time = pc.less_equal(lag, late_after_s)
    counts["late"] = len(joined) - pc.sum(on_time).as_py() if len(joined) else 0
    joined = joined.filter(on_time).sort_by([("ts", "ascending"), ("_row", "ascending")])

    first = joined.group_by(["request_id", "item_id", "event"], use_threads=False).aggregate(
        [("_row", "first")]
    )
    keep = pc.is_in(joined["_row"], value_set=first["_row_first"])
    counts["duplicate"] = len(joined) - pc.sum(keep).as_py() if len(joined) else 0
    joined = joined.filter(keep).sort_by([("ts", "ascending"), ("_row", "ascending")])
    counts["joined"] = len(joined)
    rows = pa.table(
        {f.name: joined[f.name].cast(f.type) for f in SERVED_EVENTS_SCHEMA},
        schema=SERVED_EVENTS_SCHEMA,
    )
    return rows, counts


def outcome_folders(roots: list[str]) -> list[str]:
    """The `_outcomes` folders of the events roots that have one (the app's impressions_dir)."""
    found = []
    for root in roots:
        fs, base = resolve(root)
        inner = f"{base.rstrip('/')}/{OUTCOMES_DIR}"
        if fs.get_file_info(inner).type == pafs.FileType.Directory:
            found.append(f"{root.rstrip('/')}/{OUTCOMES_DIR}")
    return found


def read_parquet_folder(path: str, columns: list[str] | None = None) -> pa.Table | None:
    """Every Parquet file under a folder (dt= partitions included), or None when it has none."""
    fs, base = resolve(path)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return None
    files = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(base, recursive=True))
        if f.type == pafs.FileType.File
        and f.path.endswith(".parquet")
        and not any(part.startswith((".", "_")) for part in f.path[len(base) :].split("/"))
    ]
    if not files:
        return None
    tables = [pq.read_table(f, filesystem=fs, columns=columns, partitioning=None) for f in files]
    return pa.concat_tables(tables, promote_options="permissive")


def write_days(rows: pa.Table, folder: str) -> list[str]:
    """Rows as `<folder>/dt=YYYY-MM-DD/part-0.parquet`, the day of each row's `ts`; the day
    folders written."""
    fs, base = resolve(folder)
    days = pc.strftime(rows["ts"], format="%Y-%m-%d")
    written = []
    for day in sorted(pc.unique(days).to_pylist()):
        part = rows.filter(pc.equal(days, day))
        where = f"{base.rstrip('/')}/dt={day}"
        fs.create_dir(where, recursive=True)
        pq.write_table(part, f"{where}/part-0.parquet", filesystem=fs)
        written.append(f"{folder.rstrip('/')}/dt={day}")
    return written


def summary(counts: dict[str, int]) -> str:
    """The join's counts in one line."""
    total = sum(counts.values())
    if not total:
        return "feedback: no /feedback outcome rows in the days read"
    left = ", ".join(f"{k} {counts[k]}" for k in COUNTS if k != "joined" and counts[k])
    return f"feedback: {counts['joined']} of {total} outcomes joined to their answers" + (
        f"; left out: {left}" if left else ""
    )


def join_logged(
    roots: list[str], days: list[str], out: str, late_after_s: float = 1_800.0
) -> tuple[list[str], dict[str, int]]:
    """For each events root holding an `_outcomes` folder (an app's impressions_dir): its
    outcomes of `days` joined to its impressions of `days`, written under `out` as dt= day
    folders. Returns those folders (to read as events beside the roots') and the counts."""
    counts = dict.fromkeys(COUNTS, 0)
    folders: list[str] = []
    columns = ["request_id", "item_id", "ts", "event", *FROM_ANSWER]
    for n, logged in enumerate(outcome_folders(roots)):
        root = logged[: -len(OUTCOMES_DIR) - 1]
        outcomes = [read_parquet_folder(f"{logged}/dt={d}") for d in days]
        outcomes = [t for t in outcomes if t is not None]
        if not outcomes:
            continue
        shown = [read_parquet_folder(f"{root}/dt={d}", columns) for d in days]
        shown = [t for t in shown if t is not None]
        impressions = (
            pa.concat_tables(shown, promote_options="permissive")
            if shown
            else SERVED_EVENTS_SCHEMA.empty_table()
        )
        rows, got = join_outcomes(impressions, pa.concat_tables(outcomes), late_after_s)
        for k, v in got.items():
            counts[k] += v
        if rows.num_rows:
            folders += write_days(rows, f"{out.rstrip('/')}/{n}")
    return folders, counts
