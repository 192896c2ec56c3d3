"""Stage one with Ray Data: embed the catalog and contexts, keep the ANN index fresh, fetch top N.

Embedding is Ray Data batch inference: text -> tokens (`data/tokenize.py`) -> an actor pool of
`TokenEmbedder`s -> unit vectors. The same code embeds the catalog for the index
(jobs/embed.py), contexts for evaluation, and training contexts for hard-negative mining.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from shoprank import console  # noqa: F401  (Ray Data actors: foreign warnings filtered)
from shoprank.config import Config
from shoprank.data.examples import positive_only
from shoprank.data.read import snapshot
from shoprank.data.text import render_items
from shoprank.data.tokenize import list_column, tokenize_items, tokenize_towers
from shoprank.models.retriever import EncoderSpec
from shoprank.retrieval import index as ann

TOKEN_PREFIXES = ("ctx_input", "ctx_attention", "item_input", "item_attention")


class TokenEmbedder:
    """Ray Data actor: token columns `<prefix>input_ids/attention_mask` -> `embedding`."""

    def __init__(self, spec: EncoderSpec, prefix: str, bf16: bool):
        self.encoder = spec.load(bf16)
        self.prefix = prefix

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        device = self.encoder.device
        ids = torch.from_numpy(batch[f"{self.prefix}input_ids"]).to(device)
        mask = torch.from_numpy(batch[f"{self.prefix}attention_mask"]).to(device)
        emb = self.encoder.embed_tokens(ids, mask).cpu()
        out = {
            k: list_column(v) if v.dtype == object and v.ndim == 1 and _ragged(v) else v
            for k, v in batch.items()
            if not k.startswith(TOKEN_PREFIXES)
        }
        out["embedding"] = emb.numpy()
        return out


def _ragged(column: np.ndarray) -> bool:
    """A column of arrays (list<string> read back by Ray Data), to be written back as lists."""
    return len(column) > 0 and isinstance(column[0], np.ndarray)


def embed(ds: ray.data.Dataset, spec: EncoderSpec, prefix: str, cfg: Config) -> ray.data.Dataset:
    return ds.map_batches(
        TokenEmbedder,
        fn_constructor_kwargs={"spec": spec, "prefix": prefix, "bf16": cfg.train.bf16},
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


def embed_text_list(
    texts: list[str], spec: EncoderSpec, max_length: int, cfg: Config
) -> np.ndarray:
    """[len(texts), d] embeddings in input order, by Ray Data batch inference."""
    tokens = tokenize_items(text_rows(texts), spec.model, max_length, cfg.index.embed_batch_size)
    order, embs = [], []
    for batch in embed(tokens, spec, "item_", cfg).iter_batches(
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
    out = embed_text_list(texts, spec, spec.item_max_length, cfg)
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
    tokens = tokenize_towers(
        examples.map_batches(positive_only, batch_format="pyarrow"),
        spec.model,
        spec.context_max_length,
        spec.item_max_length,
        catalog_ids,
        keep_text=True,
    )
    parts: dict[str, list] = {k: [] for k in ("user_id", "embedding", "target")}
    history: list[list[str]] = []
    for batch in embed(tokens, spec, "ctx_", cfg).iter_batches(
        batch_format="numpy", batch_size=None
    ):
        parts["user_id"].append(batch["user_id"])
        parts["embedding"].append(batch["embedding"])
        parts["target"].append(batch["item_rows"][:, 0])
        history.extend(list(h) for h in batch["history_ids"])
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols["user_id"], kind="stable")
    return Contexts(
        cols["user_id"][order],
        cols["embedding"][order],
        cols["target"][order].astype(np.int64),
        [history[i] for i in order],
    )
