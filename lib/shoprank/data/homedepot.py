"""Import the Home Depot product search relevance file (Kaggle, 2016) into the contract.

`train.csv` (latin-1, comma-separated, quoted): id, product_uid, product_title, search_term,
relevance (1 irrelevant .. 3 perfect, averaged over raters). The dataset README
(shared/data/home-depot/README.md) fixes the protocol this importer writes:

- catalog: the distinct `product_uid`s in order of first appearance, each with the title of its
  first row (15 products appear with two titles); item_id = str(product_uid).
- split by search term, never by row: `split_of` (a stable blake2b hash of the stripped,
  lower-cased term), 80 / 10 / 10 %, so that no test term is seen in training or selection.
- judgments.parquet keeps EVERY judged pair, graded (gain = relevance - 1, 0..2), with the
  optional contract column `split`: the train queries' graded pairs are training data, the
  valid and test queries' are the held-out judgments (evaluation/search_catalog.py).
- events/: one `click` per train-query pair with gain > `min_click_gain`, as the ESCI and WANDS
  importers write them (data/search_sets.py), so `data.task=search` trains on them unchanged.

Bad rows are never dropped silently: each goes to quarantine.parquet with the first reason that
applies (REASONS), and the summary counts them by reason. A row whose grade or term is bad still
names a good product: that product stays in the catalog (its existence does not depend on the
grade); a row with a bad product_uid or title adds nothing anywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shoprank.data.contract import MAX_TITLE_CHARS, SPLIT_JUDGMENTS_SCHEMA
from shoprank.data.search_sets import _write

FILE = "train.csv"
ENCODING = "latin-1"
COLUMNS = ("product_uid", "product_title", "search_term", "relevance")  # `id` is optional
MIN_RELEVANCE, MAX_RELEVANCE = 1.0, 3.0
# A term's split from r = (hash % 1000) / 1000: train below 0.8, valid below 0.9, else test.
TRAIN_BELOW, VALID_BELOW = 0.8, 0.9

# Reason codes, in the order they are checked: a row gets the first one that applies.
REASONS = (
    "malformed_row",  # the CSV reader could not split it into the header's columns
    "missing_product_uid",
    "bad_product_uid",  # not a non-negative integer
    "empty_title",
    "text_too_long",  # title longer than contract.MAX_TITLE_CHARS
    "empty_term",
    "bad_relevance",  # empty, not a number, NaN or infinite
    "relevance_out_of_range",  # outside [1, 3]
    "duplicate_pair",  # the same (term, product) again: the first good row is kept
)
_PRODUCT_REASONS = ("missing_product_uid", "bad_product_uid", "empty_title", "text_too_long")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_UID = re.compile(r"^\d+$")


def term_key(term: str) -> str:
    """The form a term is split, grouped and deduplicated by ("Drill " and "drill" are one)."""
    return term.strip().lower()


def term_hash(term: str) -> int:
    """The README's stable 64-bit hash of a term (blake2b, 8 bytes, big-endian)."""
    digest = hashlib.blake2b(term_key(term).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split_of(term: str) -> str:
    """train / valid / test for a search term, exactly as the dataset README fixes it."""
    r = (term_hash(term) % 1000) / 1000
    return "train" if r < TRAIN_BELOW else "valid" if r < VALID_BELOW else "test"


def read_rows(path: str | Path) -> tuple[pa.Table, list[tuple[int | None, str]]]:
    """(rows as strings, malformed rows as (line, raw text)): the file as it is, nothing dropped.

    Every column is read as a string, so that a bad number is a counted row rather than a failed
    import; a row with the wrong number of fields is set aside by the reader and returned."""
    path = Path(path)
    malformed: list[tuple[int | None, str]] = []

    def keep_aside(row: pacsv.InvalidRow) -> str:
        malformed.append((row.number, row.text))
        return "skip"

    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(encoding=ENCODING, use_threads=False),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=keep_aside),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in ("id", *COLUMNS)},
            strings_can_be_null=False,
        ),
    )
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: columns {missing} are missing (found {table.column_names}); expected the "
            f"Kaggle Home Depot train.csv header: id, {', '.join(COLUMNS)}"
        )
    return table, sorted(malformed, key=lambda m: m[0] or 0)


def _strings(table: pa.Table, name: str) -> list[str]:
    if name not in table.column_names:
        return [""] * table.num_rows
    return ["" if v is None else v for v in table[name].to_pylist()]


def row_reasons(table: pa.Table) -> tuple[list[str | None], np.ndarray]:
    """(reason per row, None when good; relevance as float, nan where unparsable)."""
    uids = [u.strip() for u in _strings(table, "product_uid")]
    titles = _strings(table, "product_title")
    keys = [term_key(t) for t in _strings(table, "search_term")]
    rel_text = [r.strip() for r in _strings(table, "relevance")]
    rel = np.array([float(r) if _NUMBER.match(r) else np.nan for r in rel_text], np.float64)
    checks = [
        ("missing_product_uid", [u == "" for u in uids]),
        ("bad_product_uid", [not _UID.match(u) for u in uids]),
        ("empty_title", [t.strip() == "" for t in titles]),
        ("text_too_long", [len(t) > MAX_TITLE_CHARS for t in titles]),
        ("empty_term", [k == "" for k in keys]),
        ("bad_relevance", ~np.isfinite(rel)),
        ("relevance_out_of_range", (rel < MIN_RELEVANCE) | (rel > MAX_RELEVANCE)),
    ]
    reasons: list[str | None] = [None] * table.num_rows
    for code, mask in checks:
        reasons = [
            r if r is not None or not m else code for r, m in zip(reasons, mask, strict=True)
        ]
    seen: set[tuple[str, str]] = set()
    for i, r in enumerate(reasons):
        if r is None:
            pair = (keys[i], str(int(uids[i])))
            if pair in seen:
                reasons[i] = "duplicate_pair"
            seen.add(pair)
    return reasons, rel


def import_homedepot(src: str | Path, out: str | Path, min_click_gain: float = 0.0) -> dict:
    """Write catalog.parquet, judgments.parquet (with `split`), events/, quarantine.parquet and
    summary.json to `out`; return the summary. `src` is train.csv or the folder holding it."""
    src, out = Path(src), Path(out)
    path = src / FILE if src.is_dir() else src
    if not path.exists():
        raise FileNotFoundError(
            f"homedepot source {path} does not exist; pass the folder holding {FILE} "
            "(../shared/data/home-depot) or the file itself"
        )
    table, malformed = read_rows(path)
    reasons, rel = row_reasons(table)
    column = {name: _strings(table, name) for name in ("id", *COLUMNS)}
    items = [u.strip() for u in column["product_uid"]]
    items = [str(int(u)) if _UID.match(u) else u for u in items]
    terms = column["search_term"]

    # Catalog: every row naming a good product; first appearance and first title win.
    titles: dict[str, str] = {}
    several = set()
    for i, r in enumerate(reasons):
        if r in _PRODUCT_REASONS:
            continue
        title = column["product_title"][i]
        if titles.setdefault(items[i], title) != title:
            several.add(items[i])
    n_items = len(titles)
    catalog = pa.table(
        {
            "item_id": pa.array(list(titles), pa.string()),
            "title": pa.array(list(titles.values()), pa.string()),
            "description": pa.nulls(n_items, pa.string()),
            "brand": pa.nulls(n_items, pa.string()),
            "category": pa.nulls(n_items, pa.string()),
            "price": pa.nulls(n_items, pa.float64()),
            "in_stock": pa.nulls(n_items, pa.bool_()),
        }
    )

    # Judgments: one query per term key, its id the key's hash, its text the first form seen.
    good = [i for i, r in enumerate(reasons) if r is None]
    keys = [term_key(terms[i]) for i in good]
    text: dict[str, str] = {}
    for i, key in zip(good, keys, strict=True):
        text.setdefault(key, terms[i].strip())
    qid = {key: f"{term_hash(key):016x}" for key in text}
    split = {key: split_of(key) for key in text}
    gain = rel[good] - MIN_RELEVANCE
    judgments = pa.table(
        {
            "query_id": pa.array([qid[k] for k in keys], pa.string()),
            "query": pa.array([text[k] for k in keys], pa.string()),
            "item_id": pa.array([items[i] for i in good], pa.string()),
            "label": pa.array(gain, pa.float64()),
            "split": pa.array([split[k] for k in keys], pa.string()),
        },
        schema=SPLIT_JUDGMENTS_SCHEMA,
    )
    row_split = np.array([split[k] for k in keys], dtype=object)
    click = (row_split == "train") & (gain > min_click_gain)
    clicks = judgments.filter(pa.array(click)).select(["query_id", "query", "item_id"])

    # search_sets._write writes the catalog, the contract's judgments and the click events;
    # judgments.parquet is then rewritten with this source's `split` column.
    summary = _write(
        out, catalog, judgments.drop_columns(["split"]), clicks, "homedepot (Kaggle train.csv)"
    )
    pq.write_table(judgments, out / "judgments.parquet")

    bad = [i for i, r in enumerate(reasons) if r is not None]
    n_malformed = len(malformed)
    quarantine = pa.table(
        {
            "line": pa.array([None] * len(bad) + [m[0] for m in malformed], pa.int64()),
            **{
                name: pa.array([values[i] for i in bad] + [None] * n_malformed, pa.string())
                for name, values in column.items()
            },
            "raw": pa.array([None] * len(bad) + [m[1] for m in malformed], pa.string()),
            "reason": pa.array([reasons[i] for i in bad] + ["malformed_row"] * n_malformed),
        }
    )
    pq.write_table(quarantine, out / "quarantine.parquet")
    counts = dict.fromkeys(REASONS, 0)
    for code in quarantine["reason"].to_pylist():
        counts[code] += 1

    per_split = {}
    key_array = np.array(keys, dtype=object)
    for name in ("train", "valid", "test"):
        mask = row_split == name
        per_split[name] = {
            "queries": len(set(key_array[mask])),
            "queries_with_gain": len(set(key_array[mask & (gain > 0)])),
            "pairs": int(mask.sum()),
        }
    summary.update(
        {
            "rows": table.num_rows + n_malformed,
            "good_rows": len(good),
            "quarantined": quarantine.num_rows,
            "quarantined_by_reason": {k: v for k, v in counts.items() if v},
            "quarantine": str(out / "quarantine.parquet"),
            "products_with_several_titles": len(several),
            "splits": per_split,
            "min_click_gain": min_click_gain,
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
