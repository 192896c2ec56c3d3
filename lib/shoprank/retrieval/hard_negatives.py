"""Hard negatives for training: items stage one ranks high that the user did not buy.

A ranker trained only on random negatives learns to tell a microscope from a glove; stage two
must tell apart the items stage one already found similar, so its training groups get some of
those (Ray Data: embed the training contexts, then an actor samples from stage one's results).
Stage one is the retriever export's own (`StageOne`: its blend and fusion when it has them,
else the retriever alone), so the ranker trains on the distribution it will rerank.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from shoprank.config import Config
from shoprank.data.text import render_items
from shoprank.data.tokenize import list_column
from shoprank.evaluation.metrics import top_n
from shoprank.models.retriever import EncoderSpec
from shoprank.retrieval import index as ann
from shoprank.retrieval.embed import embed, index_fingerprint
from shoprank.retrieval.stage_one import StageOne


class HardNegativeSampler:
    """Ray Data actor: add `n` hard negatives to each training group from stage one's results.

    Negatives are drawn from ranks [lo, hi) of the retriever export's stage one, skipping the
    positive and the user's history: leaving out the very top (lo > 0) keeps items the user
    might well have liked as much as the one bought out of the negatives.
    """

    def __init__(
        self,
        retriever_dir: str,
        catalog: pa.Table,
        texts: list[str],
        n: int,
        ranks: tuple[int, int],
        seed: int,
    ):
        self.stage = StageOne.from_export(retriever_dir, catalog)
        self.item_ids = self.stage.item_ids
        self.rows = {item: i for i, item in enumerate(self.item_ids)}
        self.texts, self.n, self.ranks, self.seed = texts, n, ranks, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lo, hi = self.ranks
        histories = [list(h) for h in batch["history_ids"]]
        found = top_n(self.stage.scores(batch["embedding"], histories), hi)
        ids, texts, labels = [], [], []
        for i, row in enumerate(found):
            group = [*batch["history_ids"][i], *batch["item_ids"][i]]
            skip = {self.rows[x] for x in group if x in self.rows}
            pool = [int(r) for r in row[lo:] if int(r) not in skip]
            if len(pool) < self.n:  # a tiny catalog: fall back to any other item
                pool = [r for r in range(len(self.texts)) if r not in skip]
            rng = np.random.default_rng([self.seed, zlib.crc32(str(batch["context"][i]).encode())])
            picked = rng.choice(pool, size=self.n, replace=False).tolist()
            ids.append([*batch["item_ids"][i], *(self.item_ids[r] for r in picked)])
            texts.append([*batch["item_texts"][i], *(self.texts[r] for r in picked)])
            labels.append([*batch["labels"][i], *([0.0] * self.n)])
        return {
            "user_id": batch["user_id"],
            "split": batch["split"],
            "context": batch["context"],
            "history_ids": list_column(batch["history_ids"]),
            "item_ids": _lists(ids),
            "item_texts": _lists(texts),
            "labels": _lists(labels),
        }


def _lists(values: list[list]) -> np.ndarray:
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def mine_hard_negatives(
    train: ray.data.Dataset, cfg: Config, catalog: pa.Table
) -> ray.data.Dataset:
    """Training groups with `data.hard_negatives` more negatives from a previous retriever."""
    source = cfg.data.hard_negatives_from
    if not source:
        raise ValueError(
            "data.hard_negatives > 0 needs data.hard_negatives_from=<retriever export>"
        )
    spec = EncoderSpec.from_export(source)
    index_dir = Path(source) / ann.INDEX_DIR
    info = ann.read_info(index_dir)
    if info is None or info["fingerprint"] != index_fingerprint(cfg, spec):
        raise ValueError(
            f"{index_dir} is missing or covers another catalog; run "
            f"python jobs/embed.py --model {source} with this config first"
        )
    # Materialised first, so that the embedding actors (holding eval.num_cpus each) are gone
    # before the sampler needs a CPU: a 2-CPU laptop cannot hold both pools at once.
    contexts = embed(train, spec, "context", "context", cfg).materialize()
    return contexts.map_batches(
        HardNegativeSampler,
        fn_constructor_kwargs={
            "retriever_dir": str(source),
            "catalog": catalog,
            "texts": render_items(catalog, cfg.data.item_template),
            "n": cfg.data.hard_negatives,
            "ranks": tuple(cfg.data.hard_negative_ranks),
            "seed": cfg.run.seed,
        },
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
    )
