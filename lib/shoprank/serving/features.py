"""The feature store the app reads users' recent histories from.

`FeatureStore` is the interface (a real online store implements `history`); the built-in
`ParquetFeatureStore` loads a Parquet snapshot of recent events at startup and re-reads it in the
background every `refresh_s` seconds, swapping the whole map at once. Events are validated as
training validates them (unknown items, bad timestamps, duplicates... are left out and counted);
a snapshot that fails to load, for whatever reason, leaves the last one serving.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from shoprank.console import log, redact
from shoprank.data.contract import POSITIVE_EVENTS
from shoprank.data.read import resolve
from shoprank.data.validate import check_events, reason_counts, split_quarantine


class FeatureStore(Protocol):
    def history(self, user_id: str) -> list[str] | None:
        """The user's recent item ids, newest first; None for a user the store has not seen."""

    def popular(self, n: int) -> list[str]:
        """The most interacted-with items, most first: the fallback for unknown users."""

    def info(self) -> dict: ...


class ParquetFeatureStore:
    def __init__(
        self,
        path: str,
        catalog_ids: pa.Array,
        max_history: int = 50,
        refresh_s: float | None = 300.0,
    ):
        self.path, self.catalog_ids, self.max_history = path, catalog_ids, max_history
        self.quarantined: dict[str, int] = {}
        self.error: str | None = None
        self._histories: dict[str, list[str]] = {}
        self._popular: list[str] = []
        self._loaded_at = 0.0
        self._rows = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh()
        if refresh_s:
            self._thread = threading.Thread(target=self._loop, args=(refresh_s,), daemon=True)
            self._thread.start()

    def refresh(self) -> None:
        fs, inner = resolve(self.path)
        table = pads.dataset(inner, filesystem=fs, partitioning="hive").to_table()
        table, bad = split_quarantine(check_events(table, self.catalog_ids))
        quarantined = reason_counts(bad)
        if bad.num_rows:
            log(f"feature store {redact(self.path)}: {bad.num_rows} events left out {quarantined}")
        table = table.filter(pc.is_in(table["event"], pa.array(sorted(POSITIVE_EVENTS))))
        table = table.sort_by([("user_id", "ascending"), ("ts", "ascending")])
        users = table["user_id"].to_pylist()
        items = table["item_id"].to_pylist()
        # Each item once, where the user first engaged with it (a cart after its click adds
        # nothing), then newest first: the histories training examples hold.
        firsts: dict[str, dict[str, None]] = {}
        for user, item in zip(users, items, strict=True):
            firsts.setdefault(user, {}).setdefault(item, None)
        histories = {u: list(seen)[::-1][: self.max_history] for u, seen in firsts.items()}
        popular = [item for item, _ in Counter(items).most_common()]
        # One assignment each: readers see the old maps or the new ones, never a mix.
        self._histories, self._popular = histories, popular
        self._loaded_at, self._rows = time.time(), table.num_rows
        self.quarantined, self.error = quarantined, None

    def stop(self) -> None:
        """Ends the refresh thread, waiting for the read in progress, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - any failure: keep serving the last snapshot
                self.error = f"{type(err).__name__}: {err}"
                log(f"feature store refresh failed, keeping the last snapshot: {self.error}")

    def history(self, user_id: str) -> list[str] | None:
        return self._histories.get(user_id)

    def popular(self, n: int) -> list[str]:
        return self._popular[:n]

    def users(self, n: int) -> list[str]:
        """Some users with a history (load generators need real ones)."""
        return list(self._histories)[:n]

    def info(self) -> dict:
        return {
            "source": redact(self.path),
            "users": len(self._histories),
            "events": self._rows,
            "loaded_at": self._loaded_at,
            "quarantined": self.quarantined,
            "refresh_error": self.error,
        }
