"""Readers for the Parquet contract: a local path or any pyarrow filesystem URI (s3://, gs://)."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and a path inside it; local paths become absolute so Ray workers agree."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def uri(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def exists(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_table(path: str) -> pa.Table:
    """A small table (catalog, judgments), read whole on the driver where it is used: pyarrow
    alone, since a Ray Data read of it costs seconds of task start-up for no parallelism."""
    fs, inner = resolve(path)
    return pq.read_table(inner, filesystem=fs)


def read_events(path: str | list[str]) -> ray.data.Dataset:
    """Events stay a distributed Dataset; `dt=YYYY-MM-DD/` partitions become a `dt` column.
    A list reads several folders or files as one (a retraining's day partitions)."""
    paths = [uri(p) for p in path] if isinstance(path, list) else uri(path)
    return ray.data.read_parquet(paths)  # Hive partitioning is the default


def snapshot(paths: list[str]) -> dict:
    """Names, sizes and times of every input file, and a digest of them: what a run read."""
    files = []
    for path in paths:
        fs, inner = resolve(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        else:
            infos = [info]
        for f in infos:
            if f.type == pafs.FileType.File:
                files.append({"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns})
    files.sort(key=lambda f: f["path"])
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    return {"digest": digest, "n_files": len(files), "bytes": sum(f["size"] for f in files)}
