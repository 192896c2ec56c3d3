"""The approximate-nearest-neighbour index over catalog embeddings (faiss).

Saved as a folder beside the exported retriever: the embeddings as Parquet, the faiss index,
and `index.json` with the index parameters and the fingerprint of what it covers (catalog
snapshot, item template, model), so an unchanged catalog is never embedded twice.
Inner product on unit vectors = cosine similarity.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shoprank.config import IndexConfig

INDEX_DIR = "index"
INFO = "index.json"
FAISS_FILE = "faiss.index"
EMBEDDINGS_DIR = "embeddings"


def index_kind(cfg: IndexConfig, n_items: int) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    return "flat" if n_items < cfg.exact_below else "hnsw"


def params(cfg: IndexConfig, n_items: int) -> dict:
    """What determines the index built from given embeddings."""
    kind = index_kind(cfg, n_items)
    if kind == "flat":
        return {"kind": "flat"}
    return {
        "kind": "hnsw",
        "m": cfg.hnsw_m,
        "ef_construction": cfg.ef_construction,
        "ef_search": cfg.ef_search,
    }


def _faiss_index(embeddings: np.ndarray, p: dict) -> faiss.Index:
    d = embeddings.shape[1]
    if p["kind"] == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, p["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = p["ef_search"]
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


@dataclass
class ItemIndex:
    item_ids: list[str]
    embeddings: np.ndarray  # [n_items, d] unit vectors, row i = item_ids[i]
    index: faiss.Index
    info: dict

    @classmethod
    def build(cls, item_ids: list[str], embeddings: np.ndarray, p: dict, info: dict) -> ItemIndex:
        if len(item_ids) != len(embeddings):
            raise ValueError(f"{len(item_ids)} item ids but {len(embeddings)} embeddings")
        started = time.perf_counter()
        index = _faiss_index(embeddings, p)
        info = {**info, "params": p, "n_items": len(item_ids), "dim": int(embeddings.shape[1])}
        info["build_s"] = round(time.perf_counter() - started, 3)
        return cls(list(item_ids), embeddings, index, info)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores [U, k], catalog rows [U, k]) per query; rows are -1 past the end."""
        k = min(k, len(self.item_ids))
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows

    def save(self, directory: str | Path) -> Path:
        """Write the folder atomically: built aside, then renamed into place."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".index-", dir=directory.parent))
        table = pa.table(
            {
                "row": pa.array(np.arange(len(self.item_ids)), pa.int32()),
                "item_id": pa.array(self.item_ids, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(self.embeddings.ravel(), pa.float32()), self.embeddings.shape[1]
                ),
            }
        )
        (tmp / EMBEDDINGS_DIR).mkdir()
        pq.write_table(table, tmp / EMBEDDINGS_DIR / "part-0.parquet")
        faiss.write_index(self.index, str(tmp / FAISS_FILE))
        (tmp / INFO).write_text(json.dumps(self.info, indent=2))
        if directory.exists():
            old = directory.with_name(f".{directory.name}-old-{os.getpid()}")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ItemIndex:
        directory = Path(directory)
        if not (directory / INFO).exists():
            raise FileNotFoundError(f"{directory} holds no index; run jobs/embed.py first")
        info = json.loads((directory / INFO).read_text())
        table = read_embeddings(directory)
        index = faiss.read_index(str(directory / FAISS_FILE))
        if info.get("params", {}).get("kind") == "hnsw":
            index.hnsw.efSearch = info["params"]["ef_search"]
        return cls(table[0], table[1], index, info)


def read_embeddings(directory: str | Path) -> tuple[list[str], np.ndarray]:
    """(item ids, [n, d] embeddings) in catalog row order."""
    table = pq.read_table(Path(directory) / EMBEDDINGS_DIR).sort_by("row")
    emb = table["embedding"].combine_chunks()
    dim = emb.type.list_size
    values = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    return table["item_id"].to_pylist(), values.astype(np.float32, copy=False)


def read_info(directory: str | Path) -> dict | None:
    path = Path(directory) / INFO
    return json.loads(path.read_text()) if path.exists() else None


def exact_search(
    queries: np.ndarray, embeddings: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product: the reference the ANN index is checked against."""
    scores = queries @ embeddings.T
    k = min(k, embeddings.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)
