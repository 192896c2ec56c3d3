"""What the app served and what came of it, logged so that retraining sees both.

Every `/recommend` and `/search` answer becomes impression rows (one per item shown: user, item,
its 0-based position, the query or null, UTC time, the answer's `request_id`, the registry
versions that made it, and `explored`: whether its order was random), in the events contract
(`data/contract.py: SERVED_EVENTS_SCHEMA`), as files
`<impressions_dir>/dt=YYYY-MM-DD/part-<uuid>.parquet`: the hive partitions that `data/read.py`
and the training jobs read as any events folder.

Every `POST /feedback` becomes one outcome row (`OUTCOMES_SCHEMA`: request_id, item_id, event,
time) under `<impressions_dir>/_outcomes/dt=YYYY-MM-DD/`, written by whichever replica took it:
no replica needs to remember the answer. Who the user was, the item's position, the versions
and the exploration flag come from the answer's impressions when the two are joined by
`request_id` where training data is built (`data/outcomes.py`), which also decides what a
replica cannot: an unknown request, an item the answer did not show, a late or a duplicate
outcome (each counted and left out). Readers of the impressions folder as events skip
`_outcomes/` (pyarrow and Ray Data skip `_`-prefixed paths).

The request path never waits on storage and never fails because of it: rows go to a bounded
in-memory buffer that a background thread writes every `flush_s` seconds or `flush_rows` rows.
A full buffer drops the new rows and counts them; a failed write is logged once (until a write
succeeds again) and its rows counted as lost; the thread outlives any error. Closing (the app's
shutdown, a Serve replica's `__del__`, interpreter exit) writes what is left, best effort, and
counts it.

Users: `log_user_ids: raw` writes the id the caller sent (the shop's own id); `pseudonym` writes
`auth.hash_user` of it (HMAC under SHOPRANK_USER_HASH_KEY), and the shop must pseudonymize its
other event sources with the same secret for the rows to join: `pseudonymize_events`, or

    python -m shoprank.serving.impressions pseudonymize EVENTS_IN EVENTS_OUT
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shoprank.console import redact
from shoprank.data.contract import OUTCOMES_DIR, OUTCOMES_SCHEMA, SERVED_EVENTS_SCHEMA
from shoprank.data.read import resolve
from shoprank.serving.auth import USER_KEY_ENV, USER_KEY_FILE_ENV, hash_user

log = logging.getLogger("ray.serve")

IMPRESSION = "impression"
FEEDBACK_EVENTS = ("click", "add_to_cart", "purchase")
ANONYMOUS = "anon-"  # user column of an answer nobody was named for: "anon-<request_id>"
# What a replica decides about one /feedback: logged, or dropped (the buffer was full).
FEEDBACK_OUTCOMES = ("logged", "dropped")

Row = tuple  # the values of the log's schema, in its order


# -- request ids -------------------------------------------------------------------------------


def new_request_id(now: float | None = None) -> str:
    """A UUIDv7: random, and carrying its own time (`request_time`), so an id read anywhere
    says when its answer was made."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))


def request_time(request_id: str) -> float | None:
    """The Unix time a `new_request_id` was made at; None for anything else."""
    try:
        parsed = uuid.UUID(request_id)
    except ValueError:
        return None
    return (parsed.int >> 80) / 1000 if parsed.version == 7 else None


# -- users -------------------------------------------------------------------------------------


def require_user_key() -> None:
    """Pseudonyms under a per-process random secret would join nothing: refuse to start."""
    if not (os.environ.get(USER_KEY_ENV) or os.environ.get(USER_KEY_FILE_ENV)):
        raise ValueError(
            "pseudonymous user ids (log_user_ids: pseudonym, or pseudonymize) need the secret "
            "they are hashed with: set "
            f"{USER_KEY_ENV} (or {USER_KEY_FILE_ENV}, a file holding it) in the app's "
            "environment, the same secret the shop pseudonymizes its other events with "
            "(python -m shoprank.serving.impressions pseudonymize IN OUT); or set "
            "log_user_ids: raw to log the shop's own ids"
        )


def pseudonymize_events(src: str, dst: str) -> dict[str, int]:
    """Copy an events file or folder with each `user_id` replaced by `auth.hash_user` (the
    pseudonym the app logs under `log_user_ids: pseudonym`), keeping the relative paths
    (`dt=` partitions included) and every other column."""
    from shoprank.data.validate import check_schema

    require_user_key()
    fs_in, root_in = resolve(src)
    fs_out, root_out = resolve(dst)
    if root_out == root_in or root_out.startswith(root_in.rstrip("/") + "/"):
        raise ValueError(f"dst {redact(dst)} is src or inside it: write the copy elsewhere")
    info = fs_in.get_file_info(root_in)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"src {redact(src)} does not exist: give an events file or folder")
    if info.type == pafs.FileType.File:
        files = [(root_in, os.path.basename(root_in))]
    else:
        found = fs_in.get_file_info(pafs.FileSelector(root_in, recursive=True))
        files = [
            (f.path, os.path.relpath(f.path, root_in))
            for f in found
            if f.type == pafs.FileType.File
            and f.path.endswith(".parquet")
            and not any(
                p.startswith((".", "_")) for p in os.path.relpath(f.path, root_in).split("/")
            )
        ]
    counts = {"files": 0, "rows": 0}
    for path, rel in sorted(files):
        table = pq.read_table(path, filesystem=fs_in, partitioning=None)
        check_schema(table.schema, "events")  # names the column and the fix
        users = table["user_id"].combine_chunks().cast(pa.string())
        distinct = pc.unique(users)
        hashed = pa.array(
            [None if u is None else hash_user(u) for u in distinct.to_pylist()], pa.string()
        )
        column = pc.take(hashed, pc.index_in(users, value_set=distinct))
        table = table.set_column(table.schema.get_field_index("user_id"), "user_id", column)
        out = f"{root_out}/{rel}"
        fs_out.create_dir(os.path.dirname(out), recursive=True)
        pq.write_table(table, out, filesystem=fs_out)
        counts["files"] += 1
        counts["rows"] += table.num_rows
    return counts


# -- the buffer and its writer -----------------------------------------------------------------


class EventLog:
    """Rows in a bounded buffer, written as `dt=` partitioned Parquet by a background thread.

    `on_count(name, n)` is called for rows written, dropped and lost (the app's Ray metrics).
    Rows are tuples of `schema`'s values; its `ts` column picks each row's day.
    """

    def __init__(
        self,
        root: str,
        flush_s: float = 10.0,
        flush_rows: int = 5_000,
        max_rows: int = 100_000,
        on_count: Callable[[str, int], None] | None = None,
        schema: pa.Schema = SERVED_EVENTS_SCHEMA,
    ):
        self.where = redact(root)
        self.fs, self.root = resolve(root)
        self.schema, self._ts = schema, schema.get_field_index("ts")
        self.flush_s, self.flush_rows, self.max_rows = flush_s, flush_rows, max_rows
        self.on_count = on_count
        self.counts: Counter[str] = Counter()
        self.last_error: str | None = None
        self._rows: list[Row] = []
        self._lock = threading.Lock()  # the buffer and the counts
        self._writing = threading.Lock()  # one flush at a time (the thread, or close)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._failing: set[str] = set()  # what failed and was logged; a success clears "write"
        self._thread = threading.Thread(target=self._loop, name="shoprank-event-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a daemon thread is killed at exit, its buffer with it

    def count(self, name: str, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self.counts[name] += n
        if self.on_count is not None:
            try:
                self.on_count(name, n)
            except Exception as err:  # noqa: BLE001 - a metric must not fail a request
                self.failed("metric", err)

    def add(self, rows: list[Row]) -> bool:
        """Queue rows without waiting on storage; False (rows dropped and counted) when the
        buffer is full or the log closed."""
        with self._lock:
            full = self._closed or len(self._rows) + len(rows) > self.max_rows
            if not full:
                self._rows.extend(rows)
            pending = len(self._rows)
        if full:
            self.count("rows_dropped", len(rows))
            return False
        if pending >= self.flush_rows:
            self._wake.set()
        return True

    def buffered(self) -> int:
        with self._lock:
            return len(self._rows)

    def flush(self, timeout: float = -1) -> int:
        """Write what is buffered now, one file per day; rows written. A failure is counted
        (and logged once), never raised. `timeout`: how long to wait for a flush in progress."""
        if not self._writing.acquire(timeout=timeout):
            return 0
        try:
            with self._lock:
                rows, self._rows = self._rows, []
            return self._write(rows) if rows else 0
        finally:
            self._writing.release()

    def _write(self, rows: list[Row]) -> int:
        days: dict[str, list[Row]] = {}
        for row in rows:
            days.setdefault(row[self._ts].strftime("%Y-%m-%d"), []).append(row)
        written = 0
        for day, part in sorted(days.items()):
            try:
                columns = list(zip(*part, strict=True))
                table = pa.Table.from_arrays(
                    [pa.array(c, f.type) for c, f in zip(columns, self.schema, strict=True)],
                    schema=self.schema,
                )
                folder = f"{self.root}/dt={day}"
                name = f"part-{uuid.uuid4().hex}.parquet"
                self.fs.create_dir(folder, recursive=True)
                # Readers skip dot-files (pyarrow) and non-.parquet names (Ray Data): a
                # half-written file is never read; the rename publishes it whole.
                tmp = f"{folder}/.{name}.tmp"
                pq.write_table(table, tmp, filesystem=self.fs)
                self.fs.move(tmp, f"{folder}/{name}")
            except Exception as err:  # noqa: BLE001 - counted and logged; the app goes on
                self.count("write_errors")
                self.count("rows_lost", len(part))
                self.failed("write", err)
                continue
            written += len(part)
            self.count("files_written")
            self.count("rows_written", len(part))
            if "write" in self._failing:
                self._failing.discard("write")
                log.warning(f"event log {self.where}: writing again after failed writes")
        return written

    def failed(self, what: str, err: Exception) -> None:
        """Remember the error; log the first of its kind (the rest are only counted)."""
        self.last_error = f"{what}: {type(err).__name__}: {err}"
        if what not in self._failing:
            self._failing.add(what)
            log.error(
                f"event log {self.where}: {self.last_error}; counted in /version's "
                f"`impressions`, and further {what} failures are only counted"
                + (" until a write succeeds" if what == "write" else "")
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.flush()
            except Exception as err:  # noqa: BLE001 - the thread must outlive any error
                self.count("flush_errors")
                self.failed("flush", err)

    def close(self, timeout: float = 10.0) -> int:
        """Stop the thread and write what is left (counted as shutdown rows); rows written.
        Idempotent; rows added afterwards are dropped and counted."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            left = len(self._rows)
        atexit.unregister(self.close)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        written = self.flush(timeout)
        self.count("shutdown_flushes")
        self.count("shutdown_rows", written)
        self.count("shutdown_rows_lost", self.buffered())  # a flush still hung on storage
        if left:
            log.info(f"event log {self.where}: {written} of {left} buffered rows written at close")
        return written

    def info(self) -> dict:
        with self._lock:
            counts = dict(self.counts)
            buffered = len(self._rows)
        return {
            "dir": self.where,
            "buffered": buffered,
            "thread_alive": self._thread.is_alive(),
            **{
                k: counts.get(k, 0)
                for k in (
                    "rows_written",
                    "files_written",
                    "rows_dropped",
                    "write_errors",
                    "rows_lost",
                    "flush_errors",
                    "shutdown_flushes",
                    "shutdown_rows",
                    "shutdown_rows_lost",
                )
            },
            "last_error": self.last_error,
        }


# -- what the frontend calls -------------------------------------------------------------------


def _utc(now: float) -> datetime:
    """The contract's `ts`: naive UTC."""
    return datetime.fromtimestamp(now, UTC).replace(tzinfo=None)


class ImpressionLogger:
    """The app's served-events log: impressions of every answer, outcomes by /feedback."""

    def __init__(
        self,
        root: str,
        user_ids: str = "raw",
        flush_s: float = 10.0,
        flush_rows: int = 5_000,
        max_rows: int = 100_000,
        on_count: Callable[[str, int], None] | None = None,
    ):
        if user_ids not in ("raw", "pseudonym"):
            raise ValueError(f"log_user_ids={user_ids!r}: expected raw or pseudonym")
        if user_ids == "pseudonym":
            require_user_key()
        self.user_ids = user_ids
        self.log = EventLog(root, flush_s, flush_rows, max_rows, on_count)
        outcome_count = None
        if on_count is not None:
            outcome_count = lambda name, n: on_count(f"outcome_{name}", n)  # noqa: E731
        self.outcomes = EventLog(
            outcomes_root(root), flush_s, flush_rows, max_rows, outcome_count, OUTCOMES_SCHEMA
        )

    def user(self, user_id: str | None, request_id: str) -> str:
        if not user_id:
            return ANONYMOUS + request_id
        return hash_user(user_id) if self.user_ids == "pseudonym" else user_id

    def served(
        self,
        request_id: str,
        user_id: str | None,
        query: str | None,
        item_ids: list[str],
        versions: dict[str, int | None],
        now: float | None = None,
        explored: bool = False,
    ) -> None:
        """Log one answer's impressions; never raises. `explored`: the answer's order was
        random (exploration), flagged on every row."""
        try:
            ts = _utc(time.time() if now is None else now)
            user = self.user(user_id, request_id)
            v = (versions.get("retriever"), versions.get("ranker"))
            rows = [
                (user, item, ts, IMPRESSION, query, None, pos, request_id, *v, explored)
                for pos, item in enumerate(item_ids)
            ]
            if rows:
                self.log.add(rows)
        except Exception as err:  # noqa: BLE001 - logging must never fail the answer
            self.log.count("log_errors")
            self.log.failed("impressions", err)

    def feedback(self, request_id: str, item_id: str, event: str, now: float | None = None) -> str:
        """One outcome row: "logged", or "dropped" (the buffer was full); counted either way.
        Whether it belongs to an answer is decided at the join (`data/outcomes.py`)."""
        if event not in FEEDBACK_EVENTS:
            raise ValueError(f"event={event!r}: expected one of {', '.join(FEEDBACK_EVENTS)}")
        ts = _utc(time.time() if now is None else now)
        logged = self.outcomes.add([(request_id, item_id, event, ts)])
        outcome = "logged" if logged else "dropped"
        self.log.count(f"feedback_{outcome}")
        return outcome

    def info(self) -> dict:
        counts = self.log.info()
        with self.log._lock:
            feedback = {o: self.log.counts.get(f"feedback_{o}", 0) for o in FEEDBACK_OUTCOMES}
            log_errors = self.log.counts.get("log_errors", 0)
        return {
            **counts,
            "user_ids": self.user_ids,
            "log_errors": log_errors,
            "feedback": feedback,
            "outcomes": self.outcomes.info(),
        }

    def flush(self) -> int:
        return self.log.flush() + self.outcomes.flush()

    def close(self) -> int:
        return self.log.close() + self.outcomes.close()


def outcomes_root(impressions_dir: str) -> str:
    """Where the /feedback outcome rows of an impressions folder go."""
    return f"{impressions_dir.rstrip('/')}/{OUTCOMES_DIR}"


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Tools for the app's served-events log.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "pseudonymize",
        help=f"copy events with user_id replaced by the app's keyed pseudonym ({USER_KEY_ENV})",
    )
    p.add_argument("src", help="events Parquet file or folder (dt= partitions kept)")
    p.add_argument("dst", help="where the copy goes")
    cli = parser.parse_args()
    try:
        print(json.dumps(pseudonymize_events(cli.src, cli.dst)))
    except (ValueError, OSError) as err:  # bad paths, no secret, a wrong schema: say which
        parser.error(str(err))


if __name__ == "__main__":
    main()
