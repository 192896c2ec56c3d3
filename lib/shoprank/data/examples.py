"""Examples: (context, candidate items, labels) groups built per user with Ray Data.

Each output row is one group: the positive item first, then sampled negatives. The context is
the user's history (recommendation) or the query of the search that led to the positive
(search). Training groups
hold 1 + `negatives` items; validation and test groups hold 1 + (eval_candidates - 1), the
sampled-candidate protocol. Keeping a group in one row lets Ray Data shuffle rows freely while
BCE and the listwise softmax both see whole groups.

With `data.shown_negatives` the events keep their impressions, and a training group's
negatives come first from the items shown in the same request (`request_id`, else
`session_id`) and not engaged with: the click model's own negatives (docs/DESIGN.md), which
the served-events log provides for every answer. Sampled items fill the rest of the group.
`data.shown_candidates` builds validation and test groups the same way. With
`data.explored_only` only answers served in a random order (`explored`) count as shown lists,
and validation and test keep only their positives.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col

from shoprank.config import DataConfig
from shoprank.data.contract import POSITIVE_EVENTS, SPLITS
from shoprank.data.sampling import sample_negatives, user_rng
from shoprank.data.tasks import as_tasks
from shoprank.data.text import history_texts, render_context, render_items

IMPRESSION = "impression"

EXAMPLE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("split", pa.string()),
        ("context", pa.string()),
        ("history_ids", pa.list_(pa.string())),
        ("item_ids", pa.list_(pa.string())),
        ("item_texts", pa.list_(pa.string())),
        ("labels", pa.list_(pa.float32())),
    ]
)


def leave_one_out(n: int) -> list[str]:
    """The split of each of a user's n time-ordered positives: last test, one before valid."""
    if n < 3:
        return ["train"] * n
    return ["train"] * (n - 2) + ["valid", "test"]


class ExampleBuilder:
    """Builds one user's groups; a class so the catalog lookup is built once per worker."""

    def __init__(
        self, catalog: pa.Table, cfg: DataConfig, seed: int, pool: list[str] | None = None
    ):
        self.cfg = cfg
        self.seed = seed
        self.item_ids = catalog["item_id"].to_pylist()
        self.texts = render_items(catalog, cfg.item_template)
        self.text_of = history_texts(catalog, cfg, self.texts)  # as read inside a context
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        # The catalog rows negatives are sampled from (None: all; data.negatives_from)
        self.pool = (
            None
            if pool is None
            else np.asarray(sorted(self.index[i] for i in pool if i in self.index), np.int64)
        )

    def __call__(self, events: pa.Table) -> pa.Table:
        sort_keys = [("ts", "ascending")]
        if "position" in events.column_names:
            sort_keys.append(("position", "ascending"))
        events = events.sort_by(sort_keys)
        shown: dict[str, list[int]] = {}
        if self.cfg.shown_negatives or self.cfg.shown_candidates:
            impression = pc.equal(events["event"], IMPRESSION)
            lists = events.filter(impression)
            if self.cfg.explored_only:  # only lists shown in a random order teach or judge
                flag = lists["explored"] if "explored" in lists.column_names else None
                lists = (
                    lists.slice(0, 0) if flag is None else lists.filter(pc.fill_null(flag, False))
                )
            shown = self._shown(lists)
            events = events.filter(pc.invert(impression))
            if events.num_rows == 0:  # shown, never engaged with: no group
                return EXAMPLE_SCHEMA.empty_table()
        if self.cfg.repeat_positives == "first":  # each item once, at its first engagement
            firsts = first_engagements(events["item_id"].to_pylist())
            events = events.filter(pa.array(firsts))
        user = events["user_id"][0].as_py()
        seq = [self.index[i] for i in events["item_id"].to_pylist()]
        if "split" in events.column_names:
            splits = events["split"].to_pylist()
        else:
            splits = leave_one_out(len(seq))
        search = self.cfg.task == "search"
        queries = events["query"].to_pylist() if search else None
        rng = user_rng(self.seed, user)
        exclude = np.asarray(seq)
        requests = request_keys(events) if shown else [None] * len(seq)
        explored = (
            events["explored"].to_pylist()
            if self.cfg.explored_only and "explored" in events.column_names
            else [None] * len(seq)
        )
        rows: dict[str, list] = {name: [] for name in EXAMPLE_SCHEMA.names}
        for i, (target, split) in enumerate(zip(seq, splits, strict=True)):
            if (i == 0 and not search) or split not in SPLITS:
                continue  # no history to predict from, or an event kept for histories only
            if split != "train" and self.cfg.explored_only and explored[i] is not True:
                continue  # judged only where the order shown was random
            history = [self.item_ids[h] for h in seq[:i][::-1]]  # newest first
            n_neg = self.cfg.negatives if split == "train" else self.cfg.eval_candidates - 1
            use = self.cfg.shown_negatives if split == "train" else self.cfg.shown_candidates
            seen = shown.get(requests[i], []) if use else []
            if split == "train" and self.cfg.shown_above and target in seen:
                seen = seen[: seen.index(target)]
            most = int(np.ceil(n_neg * self.cfg.shown_share)) if split == "train" else n_neg
            negatives = self.negatives(rng, exclude, n_neg, seen, most)
            candidates = [target, *negatives]
            rows["user_id"].append(user)
            rows["split"].append(split)
            rows["context"].append(
                queries[i]  # search: the query the user typed
                if search
                else render_context(history, self.text_of, self.cfg)
            )
            rows["history_ids"].append(history)
            rows["item_ids"].append([self.item_ids[c] for c in candidates])
            rows["item_texts"].append([self.texts[c] for c in candidates])
            rows["labels"].append([1.0] + [0.0] * n_neg)
        return pa.table(rows, schema=EXAMPLE_SCHEMA)

    def _shown(self, impressions: pa.Table) -> dict[str, list[int]]:
        """Catalog rows shown per request, in the order shown."""
        out: dict[str, list[int]] = {}
        items = impressions["item_id"].to_pylist()
        for key, item in zip(request_keys(impressions), items, strict=True):
            if key is not None and item in self.index:
                out.setdefault(key, []).append(self.index[item])
        return out

    def negatives(
        self,
        rng: np.random.Generator,
        exclude: np.ndarray,
        n: int,
        shown: list[int],
        most: int | None = None,
    ) -> np.ndarray:
        """n negatives: items of `shown` (the request's impressions) that the user never
        engaged with, at most `most` (default n) of them drawn at random, then sampled items
        for the rest."""
        pool = sorted(set(shown) - set(exclude.tolist()))
        take = min(n if most is None else most, len(pool))
        picked = rng.choice(pool, size=take, replace=False) if pool else []
        picked = np.asarray(picked, dtype=np.int64)
        rest = sample_negatives(
            rng, len(self.item_ids), np.concatenate([exclude, picked]), n - len(picked), self.pool
        )
        return np.concatenate([picked, rest])


def first_engagements(items: list[str]) -> list[bool]:
    """True where an item (in time order) appears for the first time."""
    seen: set[str] = set()
    firsts = []
    for item in items:
        firsts.append(item not in seen)
        seen.add(item)
    return firsts


def request_keys(events: pa.Table) -> list[str | None]:
    """The answer each event belongs to: its `request_id` (the served-events log), else its
    `session_id` (a shop's own sessions), else None."""
    n = events.num_rows
    keys: list[str | None] = [None] * n
    for column in ("session_id", "request_id"):  # request_id wins where both are set
        if column in events.column_names:
            values = events[column].to_pylist()
            keys = [v if v is not None else k for k, v in zip(keys, values, strict=True)]
    return keys


def positive_only(batch: pa.Table) -> pa.Table:
    """Keep each group's positive: the full-catalog protocol needs no sampled candidates."""
    for name in ("item_ids", "item_texts", "labels"):
        i = batch.schema.get_field_index(name)
        batch = batch.set_column(i, name, pc.list_slice(batch[name], 0, 1))
    return batch


def positive_events(
    events: ray.data.Dataset, task: str, impressions: bool = False
) -> ray.data.Dataset:
    """Clicks, carts and purchases (and impressions, when asked for: the shown negatives);
    browsing ones for recommendation, searches for search."""
    kinds = pa.array([*POSITIVE_EVENTS, IMPRESSION] if impressions else POSITIVE_EVENTS)

    def keep(batch: pa.Table) -> pa.Table:
        mask = pc.is_in(batch["event"], kinds)
        if "query" in batch.column_names:
            browsing = pc.is_null(batch["query"])
            mask = pc.and_(mask, browsing if task == "recommend" else pc.invert(browsing))
        return batch.filter(mask)

    return events.map_batches(keep, batch_format="pyarrow")


_ORDER = "_user_order"


def _user_order(batch: pa.Table) -> pa.Array:
    """A stable pseudo-random order of users (Ray Data's group order changes run to run)."""
    ids = batch["user_id"].to_pylist()
    return pa.array([zlib.crc32(u.encode()) for u in ids], pa.int64())


def example_groups(
    events: ray.data.Dataset, catalog: pa.Table, cfg: DataConfig, seed: int
) -> ray.data.Dataset:
    """Every user's groups, of every split, materialised in the object store."""
    if cfg.explored_only and "explored" not in events.schema().names:
        raise ValueError(
            "data.explored_only=true, but the events have no `explored` column: only the "
            "serving app's log (impressions_dir, with explore_share above 0) flags answers "
            "shown in a random order; read it too, or set data.explored_only=false"
        )
    shown = cfg.shown_negatives or cfg.shown_candidates
    positives = positive_events(events, cfg.task, impressions=shown)
    # A few hash partitions suffice for small logs; big ones get one per ~20k events.
    partitions = int(min(200, max(2, positives.count() // 20_000)))
    grouped = positives.groupby("user_id", num_partitions=partitions)
    pool = None
    if cfg.negatives_from == "events":
        known = events  # what was shown or engaged with before the held-out day, if there is one
        if "split" in events.schema().names:
            known = events.filter(expr=col("split") != "test")
        pool = known.unique("item_id")
    builder = as_tasks(ExampleBuilder, {"catalog": catalog, "cfg": cfg, "seed": seed, "pool": pool})
    return grouped.map_groups(**builder, batch_format="pyarrow").materialize()


def _group_order(seed: int):
    """A stable pseudo-random order of groups, keyed by user and history length (unique per
    group), so that a run trains on the same groups in the same order every time: Ray Data's
    group order, and with it what a seeded shuffle returns, changes from run to run."""

    def order(batch: pa.Table) -> pa.Array:
        users = batch["user_id"].to_pylist()
        lengths = pc.list_value_length(batch["history_ids"]).to_pylist()
        keys = [
            hashlib.blake2b(f"{seed}|{u}|{n}".encode(), digest_size=8).digest()
            for u, n in zip(users, lengths, strict=True)
        ]
        return pa.array([int.from_bytes(k, "little", signed=True) for k in keys], pa.int64())

    return order


def _first_by(groups: ray.data.Dataset, order, n: int | None) -> ray.data.Dataset:
    """The groups sorted by `order` (a batch -> int64 keys function), the first n of them."""
    groups = groups.add_column(_ORDER, order, batch_format="pyarrow").sort(_ORDER)
    return (groups.limit(n) if n is not None else groups).drop_columns([_ORDER])


def first_by_user_hash(groups: ray.data.Dataset, n: int | None) -> ray.data.Dataset:
    """The first n groups in a stable order of users (the same users every run)."""
    return groups if n is None else _first_by(groups, _user_order, n)


def build_examples(
    events: ray.data.Dataset, catalog: pa.Table, cfg: DataConfig, seed: int
) -> dict[str, ray.data.Dataset]:
    """Per-split example datasets, materialised in the object store (not on the driver)."""
    examples = example_groups(events, catalog, cfg, seed)
    out = {}
    for split in SPLITS:
        part = examples.filter(expr=col("split") == split)
        if split == "train":
            part = _first_by(part, _group_order(seed), cfg.max_train_positives or None)
        else:
            part = first_by_user_hash(part, cfg.val_users if split == "valid" else cfg.test_users)
        out[split] = part.materialize()
    return out
