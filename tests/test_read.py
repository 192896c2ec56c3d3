"""Readers: local paths and pyarrow filesystem URIs give the same data; snapshots see changes."""

from __future__ import annotations

import pyarrow.parquet as pq

from shoprank.data import read


def test_uri_and_path_read_the_same(ray_local, tiny_shop):
    catalog = tiny_shop / "catalog.parquet"
    by_path = read.read_table(str(catalog))
    by_uri = read.read_table(catalog.resolve().as_uri())
    assert by_path.num_rows == by_uri.num_rows == pq.read_table(catalog).num_rows
    events = read.read_events((tiny_shop / "events").resolve().as_uri())
    # Day partitions become a column.
    assert "dt" in events.schema().names
    assert events.count() == pq.read_table(tiny_shop / "events").num_rows


def test_snapshot_changes_with_the_data(tmp_path):
    path = tmp_path / "events"
    (path / "dt=2024-01-01").mkdir(parents=True)
    (path / "dt=2024-01-01" / "a.parquet").write_bytes(b"x")
    first = read.snapshot([str(path)])
    (path / "dt=2024-01-02").mkdir()
    (path / "dt=2024-01-02" / "b.parquet").write_bytes(b"yy")
    second = read.snapshot([str(path)])
    assert first["n_files"] == 1 and second["n_files"] == 2
    assert first["digest"] != second["digest"]
