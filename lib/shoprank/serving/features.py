"""The feature store the app reads users' recent histories from.

`FeatureStore` is the interface (a real online store implements `history`); the built-in
`ParquetFeatureStore` loads a Parquet snapshot of recent events at startup and re-reads it in the
background every `refresh_s` seconds, swapping the whole map at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from shoprank.console import log
from shoprank.data.contract import POSITIVE_EVENTS
from shoprank.data.read import resolve


class FeatureStore(Protocol):
    def history(self, user_id: str) -> list[str] | None:
        """The user's recent item ids, newest first; None for a user the store has not seen."""

    def popular(self, n: int) -> list[str]:
        """The most interacted-with items, most first: the fallback for unknown users."""

    def info(self) -> dict: ...


class ParquetFeatureStore:
    def __init__(self, path: str, max_history: int = 50, refresh_s: float | None = 300.0):
        self.path, self.max_history = path, max_history
        self._histories: dict[str, list[str]] = {}
        self._popular: list[str] = []
        self._loaded_at = 0.0
        self._rows = 0
        self.refresh()
        if refresh_s:
            thread = threading.Thread(target=self._loop, args=(refresh_s,), daemon=True)
            thread.start()

    def refresh(self) -> None:
        fs, inner = resolve(self.path)
        table = pads.dataset(inner, filesystem=fs, partitioning="hive").to_table(
            columns=["user_id", "item_id", "ts", "event"]
        )
        table = table.filter(pc.is_in(table["event"], pa.array(sorted(POSITIVE_EVENTS))))
        table = table.sort_by([("user_id", "ascending"), ("ts", "descending")])
        users = table["user_id"].to_pylist()
        items = table["item_id"].to_pylist()
        histories: dict[str, list[str]] = {}
        for user, item in zip(users, items, strict=True):
            seen = histories.setdefault(user, [])
            if len(seen) < self.max_history:
                seen.append(item)
        popular = [item for item, _ in Counter(items).most_common()]
        # One assignment each: readers see the old maps or the new ones, never a mix.
        self._histories, self._popular = histories, popular
        self._loaded_at, self._rows = time.time(), table.num_rows

    def _loop(self, every: float) -> None:
        while True:
            time.sleep(every)
            try:
                self.refresh()
            except (OSError, pa.ArrowException) as err:  # keep serving the last snapshot
                log(f"feature store refresh failed, keeping the last one: {err}")

    def history(self, user_id: str) -> list[str] | None:
        return self._histories.get(user_id)

    def popular(self, n: int) -> list[str]:
        return self._popular[:n]

    def users(self, n: int) -> list[str]:
        """Some users with a history (load generators need real ones)."""
        return list(self._histories)[:n]

    def info(self) -> dict:
        return {
            "source": self.path,
            "users": len(self._histories),
            "events": self._rows,
            "loaded_at": self._loaded_at,
        }
