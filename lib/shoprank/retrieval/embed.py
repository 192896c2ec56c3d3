"""Stage one with Ray Data: embed the catalog and contexts, keep the ANN index fresh, fetch top N.

Embedding is Ray Data batch inference: a pool of `TextEmbedder` actors, each holding
`eval.num_cpus` cores, tokenizes its batch of texts and embeds them with the one `Encoder`
(length-sorted sub-batches, each trimmed to its longest row, bf16 autocast). Tokenizing inside
the embedding actor keeps one pool on the cores: a separate tokenizer pool could not run beside
it on a 2-core machine, and the two took turns. The same code embeds the catalog for the index
(jobs/embed.py), contexts for evaluation, and training contexts for hard-negative mining.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from shoprank import console  # noqa: F401  (Ray Data actors: foreign warnings filtered)
from shoprank.config import Config
from shoprank.data.examples import positive_only
from shoprank.data.read import snapshot
from shoprank.data.text import render_items
from shoprank.data.tokenize import list_column
from shoprank.models.retriever import EncoderSpec
from shoprank.retrieval import index as ann


class TextEmbedder:
    """Ray Data actor: the text column `column` -> `embedding`, the other columns kept."""

    def __init__(self, spec: EncoderSpec, column: str, kind: str, bf16: bool, pass_tokens: int):
        self.encoder = spec.load(bf16)
        self.encoder.pass_tokens = pass_tokens
        self.column, self.kind = column, kind

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: list_column(v) if _ragged(v) else v for k, v in batch.items()}
        out["embedding"] = self.encoder.embed([str(t) for t in batch[self.column]], self.kind)
        return out


def _ragged(column: np.ndarray) -> bool:
    """A column of arrays (list<string> read back by Ray Data), to be written back as lists."""
    return column.dtype == object and len(column) > 0 and isinstance(column[0], np.ndarray)


def embed(
    ds: ray.data.Dataset, spec: EncoderSpec, column: str, kind: str, cfg: Config
) -> ray.data.Dataset:
    """`ds` with an `embedding` column: the texts of `column` embedded as `kind` texts."""
    return ds.map_batches(
        TextEmbedder,
        fn_constructor_kwargs={
            "spec": spec,
            "column": column,
            "kind": kind,
            "bf16": cfg.train.bf16,
            "pass_tokens": cfg.index.embed_pass_tokens,
        },
        batch_size=cfg.index.embed_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.index.embed_actors),
        num_cpus=cfg.eval.num_cpus,  # Ray sets each actor's torch threads to this
    )


def text_rows(texts: list[str]) -> ray.data.Dataset:
    """Texts as {row, text} rows, the row keeping each result in place."""
    return ray.data.from_arrow(
        pa.table({"row": pa.array(range(len(texts)), pa.int32()), "text": pa.array(texts)})
    )


def embed_text_list(texts: list[str], spec: EncoderSpec, kind: str, cfg: Config) -> np.ndarray:
    """[len(texts), d] embeddings in input order: in this process for a short list, else by
    Ray Data batch inference (index.embed_in_process_below)."""
    if len(texts) <= cfg.index.embed_in_process_below:
        encoder = spec.load(cfg.train.bf16)
        encoder.pass_tokens = cfg.index.embed_pass_tokens
        return encoder.embed(texts, kind)
    order, embs = [], []
    for batch in embed(text_rows(texts), spec, "text", kind, cfg).iter_batches(
        batch_format="numpy", batch_size=None
    ):
        order.append(batch["row"])
        embs.append(batch["embedding"])
    out = np.empty((len(texts), embs[0].shape[1]), dtype=np.float32)
    out[np.concatenate(order)] = np.concatenate(embs)
    return out


def embed_catalog(catalog: pa.Table, spec: EncoderSpec, cfg: Config) -> tuple[np.ndarray, float]:
    """[n_items, d] embeddings in catalog row order, and the seconds it took."""
    started = time.perf_counter()
    texts = render_items(catalog, cfg.data.item_template)
    out = embed_text_list(texts, spec, "item", cfg)
    return out, time.perf_counter() - started


def index_fingerprint(cfg: Config, spec: EncoderSpec) -> dict:
    return {
        "catalog": snapshot([cfg.data.catalog]),
        "item_template": cfg.data.item_template,
        "model": spec.fingerprint(),
    }


def ensure_index(
    export_dir: str, catalog: pa.Table, cfg: Config, force: bool = False
) -> tuple[ann.ItemIndex, str]:
    """The retriever's index over `catalog`, (re)built only when something changed.

    Returns the index and what happened: "unchanged" (loaded), "reindexed" (same embeddings,
    new index parameters) or "embedded" (the catalog or the model changed, or `force`).
    """
    directory = Path(export_dir) / ann.INDEX_DIR
    spec = EncoderSpec.from_export(export_dir)
    fingerprint = index_fingerprint(cfg, spec)
    params = ann.params(cfg.index, catalog.num_rows)
    info = ann.read_info(directory)
    if info and info.get("fingerprint") == fingerprint and not force:
        if info["params"] == params:
            return ann.ItemIndex.load(directory), "unchanged"
        ids, emb = ann.read_embeddings(directory)
        built = ann.ItemIndex.build(ids, emb, params, {k: info[k] for k in ("fingerprint",)})
        built.save(directory)
        return built, "reindexed"
    emb, seconds = embed_catalog(catalog, spec, cfg)
    meta = {
        "fingerprint": fingerprint,
        "embed_s": round(seconds, 2),
        "items_per_s": round(catalog.num_rows / seconds, 1),
    }
    built = ann.ItemIndex.build(catalog["item_id"].to_pylist(), emb, params, meta)
    built.save(directory)
    return built, "embedded"


@dataclass
class Contexts:
    """One row per example, sorted by user id so that passes over them line up."""

    user_id: np.ndarray
    embedding: np.ndarray  # [U, d]
    target: np.ndarray  # catalog row of the held-out item
    history_ids: list[list[str]]


def embed_contexts(
    examples: ray.data.Dataset, spec: EncoderSpec, cfg: Config, catalog_ids: list[str]
) -> Contexts:
    # Materialised before the embedding pool starts: its actors may hold every CPU of the
    # cluster (eval.num_cpus), and an upstream task would then wait for them forever.
    contexts = (
        examples.map_batches(positive_only, batch_format="pyarrow")
        .select_columns(["user_id", "context", "history_ids", "item_ids"])
        .materialize()
    )
    rows = {item: i for i, item in enumerate(catalog_ids)}
    parts: dict[str, list] = {k: [] for k in ("user_id", "embedding", "target")}
    history: list[list[str]] = []
    for batch in embed(contexts, spec, "context", "context", cfg).iter_batches(
        batch_format="numpy", batch_size=None
    ):
        parts["user_id"].append(batch["user_id"])
        parts["embedding"].append(batch["embedding"])
        parts["target"].append(np.array([rows[ids[0]] for ids in batch["item_ids"]]))
        history.extend(list(h) for h in batch["history_ids"])
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols["user_id"], kind="stable")
    return Contexts(
        cols["user_id"][order],
        cols["embedding"][order],
        cols["target"][order].astype(np.int64),
        [history[i] for i in order],
    )
