"""Business rules applied to a model's ranking: filters, boosts, diversity caps, with reasons.

The rules live in a YAML file (serve/rules.yaml) that the serving app re-reads when it changes:

    filters:
      out_of_stock: true            # drop items whose catalog `in_stock` is false
      already_purchased: true       # drop items in the user's history
      blocked_categories: ["Hazardous"]   # drop items whose category path starts with one
    boosts:
      - {name: promotion, field: promoted, weight: 0.5}        # a boolean catalog column
      - {name: spring-sale, items: [B0001, B0002], weight: 1.0}
      - {name: freshness, field: released_at, weight: 0.3, half_life_days: 30}
    diversity:
      - {field: brand, max_per: 2, top_n: 10}

Boost weights are in standard deviations of the request's candidate scores (the model's scores
are z-scored per request first), so one file works for any model. A diversity cap keeps at most
`max_per` items with the same value of `field` in the first `top_n`; the rest move down behind
them, in score order.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger("ray.serve")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Filters(_Strict):
    out_of_stock: bool = True
    already_purchased: bool = True
    blocked_categories: list[str] = []


class Boost(_Strict):
    name: str
    weight: float
    field: str | None = None  # a boolean column, or a timestamp column with half_life_days
    items: list[str] | None = None  # explicit item ids
    half_life_days: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> Boost:
        if (self.field is None) == (self.items is None):
            raise ValueError(f"boost {self.name!r}: give either `field` or `items`, not both")
        return self


class Diversity(_Strict):
    field: str
    max_per: int = Field(ge=1)
    top_n: int = Field(10, ge=1)


class Rules(_Strict):
    filters: Filters = Filters()
    boosts: list[Boost] = []
    diversity: list[Diversity] = []


class RulesError(ValueError):
    pass


def load_rules(path: str | Path) -> Rules:
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
        return Rules.model_validate(tree)
    except (OSError, yaml.YAMLError) as err:
        raise RulesError(f"rules file {path}: {err}") from None
    except ValidationError as err:
        lines = [
            f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        ]
        raise RulesError(f"rules file {path} is invalid:\n" + "\n".join(lines)) from None


@dataclass
class Ranked:
    """The final order (catalog rows, best first), its scores and, on request, the reasons."""

    rows: np.ndarray
    scores: np.ndarray
    removed: dict[str, int] = field(default_factory=dict)  # filter -> items dropped
    changes: dict[int, list[str]] = field(default_factory=dict)  # row -> what moved it


class RuleEngine:
    """Rules bound to one catalog: the columns they read, as arrays indexed by catalog row."""

    def __init__(self, rules: Rules, catalog: pa.Table, now: datetime | None = None):
        self.rules = rules
        self.ids = catalog["item_id"].to_numpy(zero_copy_only=False)
        n = catalog.num_rows
        columns = set(catalog.column_names)

        def column(name: str, why: str) -> pa.ChunkedArray:
            if name not in columns:
                raise RulesError(
                    f"{why} reads catalog column {name!r}, which the catalog does not have "
                    f"(it has {sorted(columns)}); add the column or change the rule"
                )
            return catalog[name]

        self.blocked = np.zeros(n, dtype=bool)
        for prefix in rules.filters.blocked_categories:
            cats = column("category", "filters.blocked_categories")
            self.blocked |= pc.fill_null(pc.starts_with(cats, prefix), False).to_numpy()
        self.out_of_stock = np.zeros(n, dtype=bool)
        if rules.filters.out_of_stock and "in_stock" in columns:  # absent = all in stock
            self.out_of_stock = ~pc.fill_null(catalog["in_stock"], True).to_numpy(
                zero_copy_only=False
            )
        row_of = {item: i for i, item in enumerate(self.ids)}
        now = now or datetime.now(UTC)
        self.boosts: list[tuple[str, np.ndarray]] = []
        for boost in rules.boosts:
            gain = np.zeros(n, dtype=np.float32)
            if boost.items is not None:
                gain[[row_of[i] for i in boost.items if i in row_of]] = 1.0
            elif boost.half_life_days is not None:
                ts = column(boost.field, f"boost {boost.name!r}").cast(pa.timestamp("s", "UTC"))
                age = (np.datetime64(now.replace(tzinfo=None), "s") - ts.to_numpy(False)) / (
                    np.timedelta64(1, "D")
                )
                gain = np.nan_to_num(0.5 ** (np.maximum(age, 0) / boost.half_life_days)).astype(
                    np.float32
                )
            else:
                values = column(boost.field, f"boost {boost.name!r}")
                gain = (
                    pc.fill_null(values.cast(pa.bool_()), False).to_numpy(False).astype(np.float32)
                )
            self.boosts.append((boost.name, boost.weight * gain))
        self.groups = [
            (d, column(d.field, f"diversity on {d.field!r}").to_numpy(zero_copy_only=False))
            for d in rules.diversity
        ]

    def apply(
        self,
        rows: np.ndarray,
        scores: np.ndarray,
        k: int,
        history: np.ndarray | None = None,
        explain: bool = False,
        tier: np.ndarray | None = None,
    ) -> Ranked:
        """The top `k` of the candidates `rows` (catalog rows, any order) scored `scores`.
        `tier` (0, 1, ...) orders candidates scored by different models: every tier-0 item
        (the reranked head) stays ahead of tier 1 (the retriever's rest), scores are
        standardised within their tier, and boosts reorder within a tier."""
        rows, scores = np.asarray(rows), np.asarray(scores, dtype=np.float32)
        tier = np.zeros(len(rows), np.int64) if tier is None else np.asarray(tier, np.int64)
        removed: dict[str, int] = {}
        keep = np.ones(len(rows), dtype=bool)
        drops = [
            ("blocked_category", self.blocked[rows]),
            ("out_of_stock", self.out_of_stock[rows]),
        ]
        if self.rules.filters.already_purchased and history is not None and len(history):
            drops.append(("already_purchased", np.isin(rows, history)))
        for name, drop in drops:
            hit = keep & drop
            if hit.any():
                removed[name] = int(hit.sum())
            keep &= ~drop
        rows, scores, tier = rows[keep], scores[keep], tier[keep]
        if not len(rows):
            return Ranked(rows, scores, removed, {})
        model_order = rows[np.lexsort((-scores, tier))]  # stable: ties keep the given order

        # Boosts on the z-scored model score: weights are in the standard deviations of the
        # candidates' scores (of the same tier).
        final = np.empty_like(scores)
        for t in np.unique(tier):
            mine = tier == t
            s = scores[mine]
            std = float(s.std()) if len(s) > 1 else 0.0
            final[mine] = (s - s.mean()) / (std if std > 0 else 1.0)
        boosted: dict[int, list[str]] = {}
        for name, gain in self.boosts:
            g = gain[rows]
            final = final + g
            if explain:
                for i in np.flatnonzero(g):
                    boosted.setdefault(int(rows[i]), []).append(f"boost {name} {g[i]:+.3g}")
        order = np.lexsort((-final, tier))
        rows, final = rows[order], final[order]

        capped: dict[int, list[str]] = {}
        for rule, values in self.groups:
            rows, final, pushed = _cap(rows, final, values, rule)
            for r in pushed:
                capped.setdefault(int(r), []).append(
                    f"diversity: {rule.max_per} with {rule.field}={values[r]!r} already in the "
                    f"top {rule.top_n}"
                )
        rows, final = rows[:k], final[:k]

        changes: dict[int, list[str]] = {}
        if explain:
            before = {int(r): i for i, r in enumerate(model_order)}
            for i, r in enumerate(rows.tolist()):
                reasons = boosted.get(r, []) + capped.get(r, [])
                if before[r] != i:
                    reasons.append(f"model rank {before[r] + 1} -> {i + 1}")
                if reasons:
                    changes[r] = reasons
        return Ranked(rows, final, removed, changes)


def _cap(rows: np.ndarray, scores: np.ndarray, values: np.ndarray, rule: Diversity):
    """At most `max_per` of each value in the first `top_n`; the overflow moves right behind
    them, in order. Returns the new order and the rows that were pushed down."""
    kept: list[int] = []
    overflow: list[int] = []
    counts: dict = {}
    for i, r in enumerate(rows):
        if len(kept) >= rule.top_n:
            break
        v = values[r]
        if v is not None and counts.get(v, 0) >= rule.max_per:
            overflow.append(i)
            continue
        counts[v] = counts.get(v, 0) + 1
        kept.append(i)
    seen = set(kept) | set(overflow)
    order = np.array(kept + overflow + [i for i in range(len(rows)) if i not in seen], np.int64)
    return rows[order], scores[order], rows[overflow]


class RulesFile:
    """The rules of a YAML file bound to a catalog, re-read when the file changes. Whatever goes
    wrong with a new version (invalid rules, a value the catalog cannot take, an unreadable or
    deleted file) is kept in `error` and logged once; the last good rules stay in force until a
    version loads."""

    def __init__(self, path: str | Path, catalog: pa.Table):
        self.path, self.catalog = Path(path), catalog
        self._lock = threading.Lock()
        self._stamp = _stamp(self.path)
        self.engine = RuleEngine(load_rules(self.path), catalog)
        self.error: str | None = None

    def current(self) -> RuleEngine:
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._reload(stamp)
        return self.engine

    def _reload(self, stamp: tuple | None) -> None:
        # The stamp is taken before reading: an edit landing during the read is seen next time.
        self._stamp = stamp
        try:
            if stamp is None:
                raise RulesError(f"{self.path}: the rules file is gone; restore it")
            engine = RuleEngine(load_rules(self.path), self.catalog)
        except Exception as err:  # noqa: BLE001 - any bad edit: keep serving the last good rules
            self.error = f"{type(err).__name__}: {err}"
            log.warning(
                f"rules {self.path}: the new version did not load, keeping the last good "
                f"rules: {self.error}"
            )
            return
        self.engine, self.error = engine, None
        log.info(f"rules {self.path}: reloaded")


def _stamp(path: Path) -> tuple | None:
    """(mtime, size, inode) of the file, None when it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
