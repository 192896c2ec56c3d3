"""The canonical Parquet contract (docs/DESIGN.md): one place that names every column and type."""

from __future__ import annotations

import pyarrow as pa

EVENT_TYPES = ("impression", "click", "add_to_cart", "purchase")
# Events that count as a positive signal for ranking and retrieval. An impression (shown, no
# more) never is: builders that want shown-but-not-clicked negatives read it explicitly.
POSITIVE_EVENTS = ("click", "add_to_cart", "purchase")

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string()),
        pa.field("brand", pa.string()),
        pa.field("category", pa.string()),  # path joined by " > "
        pa.field("price", pa.float64()),
        pa.field("in_stock", pa.bool_()),
    ]
)
CATALOG_REQUIRED = ("item_id", "title")

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us")),
        pa.field("event", pa.string(), nullable=False),
        pa.field("query", pa.string()),  # null when browsing
        pa.field("session_id", pa.string()),
        pa.field("position", pa.int64()),  # the 0-based rank shown, where the source knows it
    ]
)
EVENTS_REQUIRED = ("user_id", "item_id", "ts", "event")
# Optional columns that the serving app's event log writes (serving/impressions.py): which
# answer an event belongs to and which registry versions made it. Type-checked and conformed
# when present; never added to sources without them (their tables load as before).
EVENTS_SERVED_FIELDS = (
    pa.field("request_id", pa.string()),
    pa.field("retriever_version", pa.int64()),
    pa.field("ranker_version", pa.int64()),  # null: no ranker deployed
    # True: the answer was served in a random order (the app's `explore_share`), so its clicks
    # carry no position bias of the model that served it: what a retraining is judged on.
    pa.field("explored", pa.bool_()),
)
# What the app writes: the contract's columns, then the served ones.
SERVED_EVENTS_SCHEMA = pa.schema([*EVENTS_SCHEMA, *EVENTS_SERVED_FIELDS])
# What the app's POST /feedback writes, whichever replica takes it: one outcome of one item of one
# answer. The rest of an event row (user, query, position, versions, exploration flag) comes
# from the answer's impressions at the join by request_id (data/outcomes.py).
OUTCOMES_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event", pa.string(), nullable=False),  # click, add_to_cart or purchase
        pa.field("ts", pa.timestamp("us")),
    ]
)
# The folder of outcome rows inside an impressions folder: "_" keeps events readers out of it.
OUTCOMES_DIR = "_outcomes"
# Optional column: `split` in {"train", "valid", "test"} pins a dataset's published split
# (the Amazon importer writes it); without it the leave-one-out split is derived from `ts`.
SPLITS = ("train", "valid", "test")

JUDGMENTS_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("label", pa.float64(), nullable=False),  # graded gain (0..3, or ESCI gains)
    ]
)
JUDGMENTS_REQUIRED = ("query_id", "query", "item_id", "label")
# Optional column: `split` in SPLITS, the split of the row's query where the source pins one
# (the Home Depot importer keeps every judged pair, train queries' graded pairs included).
# Type-checked and conformed when present, never added: without it every judged query is held
# out, as ESCI, WANDS and the synthetic shop write them.
JUDGMENTS_SPLIT_FIELD = pa.field("split", pa.string())
# The judgments of a source that pins a split: the contract's columns, then `split`.
SPLIT_JUDGMENTS_SCHEMA = pa.schema([*JUDGMENTS_SCHEMA, JUDGMENTS_SPLIT_FIELD])

# ESCI letters to gains, as docs/DESIGN.md states them.
ESCI_GAINS = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}

# Plausibility limits (data/validate.py quarantines rows outside them).
MAX_PRICE = 10_000_000.0  # in the catalog's currency: above this it is a unit or parsing error
MAX_TITLE_CHARS = 1_000
MAX_DESCRIPTION_CHARS = 100_000
FUTURE_SLACK_DAYS = 1  # an event may be stamped up to a day ahead (clock skew), not more

# Name of the column that validation adds to quarantined rows.
REASON = "reason"
