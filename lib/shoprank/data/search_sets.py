"""Import public search-relevance datasets into the contract: ESCI (Amazon) and WANDS (Wayfair).

Each import writes `catalog.parquet`, `judgments.parquet` (held-out queries, graded gains) and
`events/` with one `click` per exactly-relevant (query, item) pair of the training queries, so
that the search ranker and retriever can be fine-tuned on them (data.task=search).

ESCI (github.com/amazon-science/esci-data): `shopping_queries_dataset_examples.parquet`
(query_id, query, product_id, product_locale, esci_label E/S/C/I, split train/test) and
`shopping_queries_dataset_products.parquet` (product_id, product_title, product_description,
product_brand, product_color, product_locale). Gains E 1, S 0.1, C 0.01, I 0 (docs/DESIGN.md).

WANDS (github.com/wayfair/WANDS): tab-separated `product.csv` (product_id, product_name,
product_class, category hierarchy, product_description, ...), `query.csv` (query_id, query,
query_class) and `label.csv` (id, query_id, product_id, label Exact/Partial/Irrelevant).
Gains Exact 2, Partial 1, Irrelevant 0. WANDS has no split: queries go to training by a
stable hash of their id (`train_fraction`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shoprank.data.contract import CATALOG_SCHEMA, ESCI_GAINS, EVENTS_SCHEMA, JUDGMENTS_SCHEMA

WANDS_GAINS = {"Exact": 2.0, "Partial": 1.0, "Irrelevant": 0.0}

# The day stamped on imported clicks: these datasets have no timestamps.
_DAY = dt.datetime(2022, 1, 1)


def gains(labels: pa.Array, mapping: dict[str, float], dataset: str) -> pa.Array:
    """Label letters/words to gains; an unknown label stops the import, naming it."""
    unknown = sorted(set(pc.unique(labels).to_pylist()) - set(mapping))
    if unknown:
        raise ValueError(
            f"{dataset} label values {unknown[:5]} are not in {sorted(mapping)}; "
            "is this the right file?"
        )
    keys = pa.array(list(mapping))
    values = pa.array(list(mapping.values()), pa.float64())
    return pc.take(values, pc.index_in(labels, keys))


def _require(table: pa.Table, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found {table.column_names}")


def _write(
    out: Path, catalog: pa.Table, judgments: pa.Table, clicks: pa.Table, source: str
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(catalog.cast(CATALOG_SCHEMA), out / "catalog.parquet")
    pq.write_table(judgments.cast(JUDGMENTS_SCHEMA), out / "judgments.parquet")
    n = clicks.num_rows
    events = pa.table(
        {
            # One pseudo-user per query: each training query is an independent session.
            "user_id": pc.binary_join_element_wise("q", clicks["query_id"], ""),
            "item_id": clicks["item_id"],
            "ts": pa.array([_DAY] * n, pa.timestamp("us")),
            "event": pa.array(["click"] * n, pa.string()),
            "query": clicks["query"],
            "session_id": pc.binary_join_element_wise("q", clicks["query_id"], ""),
            "position": pa.array(range(n), pa.int64()),
        }
    )
    part = out / "events" / f"dt={_DAY:%Y-%m-%d}"
    part.mkdir(parents=True, exist_ok=True)
    pq.write_table(events.cast(EVENTS_SCHEMA), part / "part-0.parquet")
    return {
        "source": source,
        "items": catalog.num_rows,
        "judgments": judgments.num_rows,
        "judged_queries": len(pc.unique(judgments["query_id"])),
        "training_clicks": n,
        "out": str(out),
    }


def import_esci(src: str | Path, out: str | Path, locale: str = "us") -> dict:
    src, out = Path(src), Path(out)
    examples_path = src / "shopping_queries_dataset_examples.parquet"
    products_path = src / "shopping_queries_dataset_products.parquet"
    examples = pq.read_table(examples_path)
    products = pq.read_table(products_path)
    _require(
        examples,
        ["query_id", "query", "product_id", "product_locale", "esci_label", "split"],
        examples_path,
    )
    _require(products, ["product_id", "product_title", "product_locale"], products_path)
    examples = examples.filter(pc.equal(examples["product_locale"], locale))
    products = products.filter(pc.equal(products["product_locale"], locale))

    def column(name: str) -> pa.Array:
        return products[name] if name in products.column_names else pa.nulls(products.num_rows)

    catalog = pa.table(
        {
            "item_id": products["product_id"],
            "title": products["product_title"],
            "description": column("product_description"),
            "brand": column("product_brand"),
            "category": pa.nulls(products.num_rows, pa.string()),
            "price": pa.nulls(products.num_rows, pa.float64()),
            "in_stock": pa.nulls(products.num_rows, pa.bool_()),
        }
    )
    examples = examples.append_column(
        "gain", gains(examples["esci_label"], ESCI_GAINS, "ESCI esci_label")
    )
    examples = examples.set_column(
        examples.schema.get_field_index("query_id"),
        "query_id",
        pc.cast(examples["query_id"], pa.string()),
    )
    test = examples.filter(pc.equal(examples["split"], "test"))
    judgments = pa.table(
        {
            "query_id": test["query_id"],
            "query": test["query"],
            "item_id": test["product_id"],
            "label": test["gain"],
        }
    )
    train = examples.filter(
        pc.and_(pc.equal(examples["split"], "train"), pc.equal(examples["esci_label"], "E"))
    )
    clicks = pa.table(
        {"query_id": train["query_id"], "query": train["query"], "item_id": train["product_id"]}
    )
    return _write(out, catalog, judgments, clicks, f"esci ({locale})")


def _in_train(query_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(query_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def import_wands(src: str | Path, out: str | Path, train_fraction: float = 0.5) -> dict:
    src, out = Path(src), Path(out)
    opts = pacsv.ParseOptions(delimiter="\t")
    strings = pacsv.ConvertOptions(
        column_types={"product_id": pa.string(), "query_id": pa.string()}
    )
    products = pacsv.read_csv(src / "product.csv", parse_options=opts, convert_options=strings)
    queries = pacsv.read_csv(src / "query.csv", parse_options=opts, convert_options=strings)
    labels = pacsv.read_csv(src / "label.csv", parse_options=opts, convert_options=strings)
    _require(products, ["product_id", "product_name"], src / "product.csv")
    _require(queries, ["query_id", "query"], src / "query.csv")
    _require(labels, ["query_id", "product_id", "label"], src / "label.csv")

    def column(name: str) -> pa.Array:
        if name not in products.column_names:
            return pa.nulls(products.num_rows, pa.string())
        return pc.cast(products[name], pa.string())

    hierarchy = column("category hierarchy")
    catalog = pa.table(
        {
            "item_id": products["product_id"],
            "title": products["product_name"],
            "description": column("product_description"),
            "brand": pa.nulls(products.num_rows, pa.string()),
            # WANDS writes the path with " / "; the contract joins it with " > ".
            "category": pc.replace_substring(hierarchy, " / ", " > "),
            "price": pa.nulls(products.num_rows, pa.float64()),
            "in_stock": pa.nulls(products.num_rows, pa.bool_()),
        }
    )
    text = dict(zip(queries["query_id"].to_pylist(), queries["query"].to_pylist(), strict=True))
    qids = labels["query_id"].to_pylist()
    labels = labels.append_column("query", pa.array([text[q] for q in qids], pa.string()))
    labels = labels.append_column("gain", gains(labels["label"], WANDS_GAINS, "WANDS label"))
    train_mask = pa.array([_in_train(q, train_fraction) for q in qids])
    held = labels.filter(pc.invert(train_mask))
    judgments = pa.table(
        {
            "query_id": held["query_id"],
            "query": held["query"],
            "item_id": held["product_id"],
            "label": held["gain"],
        }
    )
    train = labels.filter(pc.and_(train_mask, pc.equal(labels["label"], "Exact")))
    clicks = pa.table(
        {"query_id": train["query_id"], "query": train["query"], "item_id": train["product_id"]}
    )
    return _write(out, catalog, judgments, clicks, "wands")
