"""ESCI and WANDS loaders on small fixtures written here: label letters map to the gains."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shoprank.data.contract import CATALOG_SCHEMA, EVENTS_SCHEMA, JUDGMENTS_SCHEMA
from shoprank.data.search_sets import import_esci, import_wands


def _esci(src, labels=("E", "S", "C", "I")):
    src.mkdir()
    n = len(labels)
    pq.write_table(
        pa.table(
            {
                "example_id": list(range(2 * n)),
                "query": ["red drill"] * n + ["usb cable"] * n,
                "query_id": [1] * n + [2] * n,
                "product_id": [f"p{i}" for i in range(n)] * 2,
                "product_locale": ["us"] * (2 * n),
                "esci_label": list(labels) * 2,
                "small_version": [1] * (2 * n),
                "large_version": [1] * (2 * n),
                "split": ["test"] * n + ["train"] * n,
            }
        ),
        src / "shopping_queries_dataset_examples.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "product_id": [f"p{i}" for i in range(n)] + ["jp0"],
                "product_title": [f"Product {i}" for i in range(n)] + ["JP product"],
                "product_description": [None] * (n + 1),
                "product_bullet_point": [None] * (n + 1),
                "product_brand": ["Acme"] * (n + 1),
                "product_color": [None] * (n + 1),
                "product_locale": ["us"] * n + ["jp"],
            }
        ),
        src / "shopping_queries_dataset_products.parquet",
    )


def test_esci_maps_letters_to_gains(tmp_path) -> None:
    _esci(tmp_path / "esci")
    summary = import_esci(tmp_path / "esci", tmp_path / "out")
    judgments = pq.read_table(tmp_path / "out" / "judgments.parquet")
    assert judgments.schema.equals(JUDGMENTS_SCHEMA, check_metadata=False)
    # Test split only, query 1: E/S/C/I -> 1 / 0.1 / 0.01 / 0.
    assert judgments["query_id"].to_pylist() == ["1"] * 4
    pairs = zip(judgments["item_id"].to_pylist(), judgments["label"].to_pylist(), strict=True)
    assert dict(pairs) == {
        "p0": 1.0,
        "p1": 0.1,
        "p2": 0.01,
        "p3": 0.0,
    }
    catalog = pq.read_table(tmp_path / "out" / "catalog.parquet")
    assert catalog.schema.equals(CATALOG_SCHEMA, check_metadata=False)
    assert catalog["item_id"].to_pylist() == ["p0", "p1", "p2", "p3"]  # other locales dropped
    # Training clicks: the exactly relevant pairs of the training queries, with their query.
    events = pq.read_table(tmp_path / "out" / "events")
    assert events.select(EVENTS_SCHEMA.names).schema.equals(EVENTS_SCHEMA, check_metadata=False)
    assert events["item_id"].to_pylist() == ["p0"] and events["query"].to_pylist() == ["usb cable"]
    assert summary["judged_queries"] == 1 and summary["training_clicks"] == 1


def test_esci_unknown_label_is_named(tmp_path) -> None:
    _esci(tmp_path / "esci", labels=("E", "X"))
    with pytest.raises(ValueError, match=r"\['X'\]"):
        import_esci(tmp_path / "esci", tmp_path / "out")


def test_wands_maps_words_to_gains(tmp_path) -> None:
    src = tmp_path / "wands"
    src.mkdir()
    (src / "product.csv").write_text(
        "product_id\tproduct_name\tproduct_class\tcategory hierarchy\tproduct_description\n"
        "0\tsolid wood desk\tDesks\tFurniture / Office / Desks\ta desk\n"
        "1\toak chair\tChairs\tFurniture / Chairs\ta chair\n"
        "2\tlamp\tLamps\tLighting\t\n"
    )
    (src / "query.csv").write_text("query_id\tquery\tquery_class\n0\twood desk\tDesks\n")
    (src / "label.csv").write_text(
        "id\tquery_id\tproduct_id\tlabel\n0\t0\t0\tExact\n1\t0\t1\tPartial\n2\t0\t2\tIrrelevant\n"
    )
    import_wands(src, tmp_path / "held", train_fraction=0.0)  # every query held out
    judgments = pq.read_table(tmp_path / "held" / "judgments.parquet")
    assert judgments["label"].to_pylist() == [2.0, 1.0, 0.0]
    assert judgments["query"].to_pylist() == ["wood desk"] * 3
    catalog = pq.read_table(tmp_path / "held" / "catalog.parquet")
    assert catalog["category"].to_pylist()[0] == "Furniture > Office > Desks"

    summary = import_wands(src, tmp_path / "train", train_fraction=1.0)  # every query trains
    assert summary["judgments"] == 0 and summary["training_clicks"] == 1
