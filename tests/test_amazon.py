"""Amazon importer: counts, split and order preserved exactly, clean under validation."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from shoprank.data import contract
from shoprank.data.amazon import TEXT, import_amazon
from shoprank.data.validate import check_catalog, check_events, reason_counts, split_quarantine

SRC = Path(__file__).parents[2] / "shared/data/amazon-scientific"

pytestmark = pytest.mark.skipif(
    not (SRC / "interactions.parquet").exists(),
    reason=f"Amazon Industrial & Scientific data not found at {SRC}",
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("amazon")
    summary = import_amazon(SRC, out)
    catalog = pq.read_table(out / "catalog.parquet")
    events = ds.dataset(out / "events", format="parquet", partitioning="hive").to_table()
    return summary, catalog, events


def test_counts(imported):
    summary, catalog, events = imported
    assert catalog.num_rows == summary["items"] == 4_385
    assert events.num_rows == summary["events"] == 59_427
    assert summary["users"] == 8_442
    assert summary["splits"] == {"train": 42_543, "valid": 8_442, "test": 8_442}
    assert set(pc.unique(events.column("event")).to_pylist()) == {"purchase"}


def test_split_and_order_preserved(imported):
    _, _, events = imported
    source = pq.read_table(SRC / "interactions.parquet").cast(
        pa.schema(
            [
                ("user_id", pa.string()),
                ("item_id", pa.string()),
                ("position", pa.int64()),
                ("split", pa.string()),
            ]
        )
    )
    keys = [("user_id", "ascending"), ("position", "ascending")]
    ours = events.sort_by([("user_id", "ascending"), ("ts", "ascending")])
    theirs = source.sort_by(keys)
    for name in ("user_id", "item_id", "position", "split"):
        assert ours.column(name).equals(theirs.column(name)), name
    # ts strictly increases with position within each user.
    same_user = pc.equal(ours.column("user_id")[1:], ours.column("user_id")[:-1])
    ts = ours.column("ts")
    later = pc.greater(ts[1:], ts[:-1])
    assert pc.all(pc.or_kleene(pc.invert(same_user), later)).as_py()


def test_text_kept_verbatim(imported):
    _, catalog, _ = imported
    items = pq.read_table(SRC / "items.parquet")
    by_id = dict(
        zip(items.column("item_id").to_pylist(), items.column("text").to_pylist(), strict=True)
    )
    ours = dict(
        zip(catalog.column("item_id").to_pylist(), catalog.column(TEXT).to_pylist(), strict=True)
    )
    assert ours == by_id
    # The parsed fields rebuild the text exactly: "title. category. brand. ".
    rows = catalog.select(["title", "category", "brand", TEXT]).to_pylist()
    for row in rows:
        rebuilt = f"{row['title']}. {row['category'] or ''}. {row['brand'] or ''}. "
        assert rebuilt == row[TEXT]


def test_zero_validation_failures(imported):
    _, catalog, events = imported
    good_catalog, bad_catalog = split_quarantine(check_catalog(catalog))
    assert reason_counts(bad_catalog) == {}
    good, bad = split_quarantine(check_events(events, good_catalog.column("item_id")))
    assert reason_counts(bad) == {}
    assert good.num_rows == 59_427
    assert good.schema.names[: len(contract.EVENTS_SCHEMA)] == contract.EVENTS_SCHEMA.names
