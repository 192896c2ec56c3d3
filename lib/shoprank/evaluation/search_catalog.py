"""Whole-catalog search evaluation: every product ranked for every held-out query.

evaluation/judgments.py orders each query's few judged products, which is nearly saturated on
real data (a random order scores NDCG@10 0.907 on Home Depot); stage one has to find those
products among the whole catalog. The protocol is the Home Depot README's
(shared/data/home-depot/README.md), so that its reference figures can be reproduced:

- full catalog (primary): each query with a gain > 0 ranks all products by a stable sort of
  descending score (ties keep catalog order, NaN last); NDCG@10 with linear gains, a log2
  discount and the ideal from the query's own judged gains sorted; Recall@100 = the share of
  the query's gain > 0 products in the top 100; both averaged over those queries.
- judged candidates (secondary): each query with at least two distinct grades orders only its
  judged products (ties keep the judgments' order); NDCG@10.
- a hybrid sums its systems' per-query z-scores (population std) over the whole catalog, or
  over the query's judged products in the judged-candidates protocol.

Scores come a chunk of queries at a time ([chunk, n_items] float64), so memory stays a few tens
of MB whatever the number of queries.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from shoprank.console import log
from shoprank.evaluation.metrics import paired_difference

if TYPE_CHECKING:  # torch and transformers load only when a bi-encoder is asked for
    from shoprank.models.retriever import Encoder
    from shoprank.retrieval.bm25 import BM25
    from shoprank.run import Run

K, RECALL_K = 10, 100

# query indices -> [len(indices), n_items] scores
Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SearchSet:
    """One split's queries and their judged pairs as catalog rows (pairs in judgments order)."""

    query_ids: list[str]
    queries: list[str]
    pair_query: np.ndarray  # [P] int64: index into queries
    pair_item: np.ndarray  # [P] int64: catalog row
    pair_gain: np.ndarray  # [P] float64
    n_items: int


def search_set(catalog: pa.Table, judgments: pa.Table, split: str | None = "test") -> SearchSet:
    """The judged pairs of `split` (None: every judged pair, for judgments without `split`),
    queries in order of first appearance."""
    if split is not None:
        if "split" not in judgments.column_names:
            raise ValueError(
                f"judgments have no 'split' column, so split={split!r} cannot be chosen; "
                "import with jobs/prepare.py homedepot, or pass split=None to use every query"
            )
        judgments = judgments.filter(pc.equal(judgments["split"], split))
        if judgments.num_rows == 0:
            raise ValueError(f"no judgments with split={split!r}; expected train, valid or test")
    row = {item: i for i, item in enumerate(catalog["item_id"].to_pylist())}
    items = judgments["item_id"].to_pylist()
    missing = [i for i in items if i not in row]
    if missing:
        raise ValueError(
            f"judgments item_id {missing[0]!r} (and {len(missing) - 1} more) is not in the "
            "catalog; validate the judgments against this catalog (data.validate) first"
        )
    qids = judgments["query_id"].to_pylist()
    index: dict[str, int] = {}
    texts: list[str] = []
    for qid, text in zip(qids, judgments["query"].to_pylist(), strict=True):
        if qid not in index:
            index[qid] = len(index)
            texts.append(text)
    data = SearchSet(
        query_ids=list(index),
        queries=texts,
        pair_query=np.array([index[q] for q in qids], dtype=np.int64),
        pair_item=np.array([row[i] for i in items], dtype=np.int64),
        pair_gain=judgments["label"].to_numpy().astype(np.float64),
        n_items=catalog.num_rows,
    )
    keys = data.pair_query * data.n_items + data.pair_item
    if len(np.unique(keys)) != len(keys):
        raise ValueError("judgments repeat a (query_id, item_id) pair; deduplicate them first")
    return data


# ---------------------------------------------------------------------------------------------
# Metrics


def stable_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[Q, min(k, N)] columns of each row's best scores, best first, exactly as a stable sort of
    descending scores orders them: ties keep column (catalog) order, NaN ranks last."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    n_rows, n = scores.shape
    k = min(k, n)
    kth = np.partition(scores, n - k, axis=1)[:, n - k]  # each row's k-th largest score
    out = np.empty((n_rows, k), dtype=np.int64)
    for r in range(n_rows):
        s = scores[r]
        above = np.flatnonzero(s > kth[r])
        tied = np.flatnonzero(s == kth[r])[: k - len(above)]  # the first ones in column order
        idx = np.concatenate([above, tied])
        out[r] = idx[np.lexsort((idx, -s[idx]))]
    return out


def _discount(n: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(n) + 2.0)


def _positions(groups: np.ndarray) -> np.ndarray:
    """0-based position of each row within its run of equal (sorted) group ids."""
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(groups) else []
    return np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))


def ideal_dcg(pair_query: np.ndarray, pair_gain: np.ndarray, n_queries: int, k: int = K):
    """[n_queries] DCG@k of each query's own judged gains sorted (0 for a query without any)."""
    order = np.lexsort((-pair_gain, pair_query))
    pos = _positions(pair_query[order])
    weight = np.where(pos < k, 1.0 / np.log2(pos + 2.0), 0.0)
    return np.bincount(pair_query[order], pair_gain[order] * weight, minlength=n_queries)


def ndcg(ranked_gains: np.ndarray, idcg: np.ndarray, k: int = K) -> np.ndarray:
    """[Q] NDCG@k from [Q, >=k] gains in ranked order (unjudged = 0); nan where idcg is 0."""
    g = np.asarray(ranked_gains, dtype=np.float64)[:, :k]
    dcg = g @ _discount(g.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(idcg > 0, dcg / idcg, np.nan)


def recall(ranked_gains: np.ndarray, n_relevant: np.ndarray, k: int = RECALL_K) -> np.ndarray:
    """[Q] share of each query's gain > 0 products in its top k; nan where it has none."""
    hits = (np.asarray(ranked_gains)[:, :k] > 0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_relevant > 0, hits / n_relevant, np.nan)


def judged_ndcg(
    pair_query: np.ndarray, pair_gain: np.ndarray, pair_score: np.ndarray, n_queries: int, k=K
) -> np.ndarray:
    """[n_queries] NDCG@k of each query's judged products ordered by score (ties keep the pairs'
    order); nan for queries with fewer than two distinct grades (no order to get right)."""
    score = np.where(np.isnan(pair_score), -np.inf, pair_score)
    order = np.lexsort((np.arange(len(score)), -score, pair_query))
    pos = _positions(pair_query[order])
    weight = np.where(pos < k, 1.0 / np.log2(pos + 2.0), 0.0)
    dcg = np.bincount(pair_query[order], pair_gain[order] * weight, minlength=n_queries)
    idcg = ideal_dcg(pair_query, pair_gain, n_queries, k)
    grades = np.unique(np.stack([pair_query, pair_gain]), axis=1)[0]
    distinct = np.bincount(grades.astype(np.int64), minlength=n_queries)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((distinct >= 2) & (idcg > 0), dcg / idcg, np.nan)


def zscore(scores: np.ndarray) -> np.ndarray:
    """Each row's scores minus its mean over its population std (a constant row: zeros)."""
    scores = np.asarray(scores, dtype=np.float64)
    std = scores.std(axis=1, keepdims=True)
    centred = scores - scores.mean(axis=1, keepdims=True)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def group_zscore(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """`zscore` within each group (a query's judged products)."""
    values = np.asarray(values, dtype=np.float64)
    n = np.bincount(groups, minlength=n_groups).clip(min=1)
    mean = np.bincount(groups, values, minlength=n_groups) / n
    centred = values - mean[groups]
    std = np.sqrt(np.bincount(groups, centred**2, minlength=n_groups) / n)[groups]
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class PerQuery:
    """One system's per-query figures, nan where a query does not count for that figure."""

    ndcg: np.ndarray
    recall: np.ndarray
    judged_ndcg: np.ndarray

    def summary(self) -> dict[str, float | int]:
        return {
            f"ndcg@{K}": float(np.nanmean(self.ndcg)),
            f"recall@{RECALL_K}": float(np.nanmean(self.recall)),
            f"judged_ndcg@{K}": float(np.nanmean(self.judged_ndcg)),
            "queries": int(np.isfinite(self.ndcg).sum()),
            "judged_queries": int(np.isfinite(self.judged_ndcg).sum()),
        }


def evaluate(
    data: SearchSet,
    scorers: dict[str, Scorer],
    hybrids: dict[str, Sequence[str]] | None = None,
    chunk: int = 64,
    progress: bool = False,
) -> dict[str, PerQuery]:
    """Per-query figures of each scorer and each hybrid (name -> the scorers it sums).

    Only queries with a gain > 0 are scored (a query with two distinct grades has one too)."""
    hybrids = hybrids or {}
    for name, parts in hybrids.items():
        unknown = [p for p in parts if p not in scorers]
        if unknown:
            raise ValueError(f"hybrid {name!r} sums {unknown}, not among {sorted(scorers)}")
    n_q, n_items = len(data.queries), data.n_items
    relevant = data.pair_gain > 0
    n_relevant = np.bincount(data.pair_query, relevant, minlength=n_q)
    idcg = ideal_dcg(data.pair_query, data.pair_gain, n_q)
    keys = data.pair_query * n_items + data.pair_item
    by_key = np.argsort(keys)
    sorted_keys, sorted_gain = keys[by_key], data.pair_gain[by_key]

    names = [*scorers, *hybrids]
    out = {n: PerQuery(*(np.full(n_q, np.nan) for _ in range(3))) for n in names}
    pair_scores = {n: np.full(len(keys), np.nan) for n in scorers}
    local = np.full(n_q, -1, dtype=np.int64)
    eligible = np.flatnonzero(n_relevant > 0)
    bar = tqdm(total=len(eligible), desc="ranking the catalog", unit="query", disable=not progress)
    for start in range(0, len(eligible), chunk):
        qs = eligible[start : start + chunk]
        local[qs] = np.arange(len(qs))
        in_chunk = np.flatnonzero(local[data.pair_query] >= 0)
        matrices = {n: np.asarray(s(qs), dtype=np.float64) for n, s in scorers.items()}
        for n, m in matrices.items():
            pair_scores[n][in_chunk] = m[local[data.pair_query[in_chunk]], data.pair_item[in_chunk]]
        for n, parts in hybrids.items():
            matrices[n] = sum(zscore(matrices[p]) for p in parts)
        for n in names:
            top = stable_top_k(matrices[n], max(K, RECALL_K))
            wanted = qs[:, None] * n_items + top
            at = np.searchsorted(sorted_keys, wanted).clip(max=len(sorted_keys) - 1)
            gains = np.where(sorted_keys[at] == wanted, sorted_gain[at], 0.0)
            out[n].ndcg[qs] = ndcg(gains, idcg[qs])
            out[n].recall[qs] = recall(gains, n_relevant[qs])
        local[qs] = -1
        bar.update(len(qs))
    bar.close()

    for n in names:
        if n in scorers:
            score = pair_scores[n]
        else:
            parts = [group_zscore(pair_scores[p], data.pair_query, n_q) for p in hybrids[n]]
            score = np.sum(parts, axis=0)
        out[n].judged_ndcg = judged_ndcg(data.pair_query, data.pair_gain, score, n_q)
    return out


def paired(a: PerQuery, b: PerQuery, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """(mean, half-width) of a - b per figure, over the queries both count."""
    out = {}
    for figure in ("ndcg", "recall", "judged_ndcg"):
        x, y = getattr(a, figure), getattr(b, figure)
        both = np.isfinite(x) & np.isfinite(y)
        out[figure] = paired_difference(x[both], y[both], level)
    return out


# ---------------------------------------------------------------------------------------------
# The zero-shot bi-encoder


def zero_shot_encoder() -> Encoder:
    """The bi-encoder of the reference figures: the bundled all-MiniLM-L6-v2 as it is, mean
    pooled and normalised, texts cut at its 256-token limit (titles are far shorter), fp32."""
    from shoprank.models.retriever import EncoderSpec

    spec = EncoderSpec("minilm", "mean", context_max_length=256, item_max_length=256)
    return spec.load(bf16=False)


def embed_texts(
    encoder: Encoder, texts: Sequence[str], kind: str, batch: int = 2048, desc: str = ""
) -> np.ndarray:
    """[len(texts), d] unit vectors, in input order, with a progress bar: texts go shortest
    first in batches, so each of Encoder.embed's passes holds texts of like length."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    with tqdm(total=len(texts), desc=desc or f"embedding {kind}s", unit="text") as bar:
        for start in range(0, len(texts), batch):
            rows = order[start : start + batch]
            emb = encoder.embed([texts[i] for i in rows], kind)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[rows] = emb
            bar.update(len(rows))
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def bm25_scorer(index: BM25, queries: Sequence[str]) -> Scorer:
    """BM25 scores of the whole catalog for query rows."""
    return lambda qs: index.scores([queries[i] for i in qs])


def cosine_scorer(query_emb: np.ndarray, item_emb: np.ndarray) -> Scorer:
    """Cosine of unit vectors: query rows against the whole catalog."""
    return lambda qs: query_emb[qs] @ item_emb.T


def markdown(
    title: str,
    figures: dict[str, dict],
    intervals: dict[str, dict[str, tuple[float, float]]],
    labels: dict[str, str],
    reference: dict[str, Sequence[float]] | None = None,
) -> str:
    """The figures of `evaluate` (PerQuery.summary) and `paired` intervals as Markdown tables;
    `reference`: figures to print beside them (NDCG@10, Recall@100, judged NDCG@10)."""
    head = "| system | NDCG@10 | Recall@100 | judged NDCG@10 |"
    rule = "|---|---:|---:|---:|"
    if reference:
        head, rule = head + " reference |", rule + "---|"
    lines = [f"# {title}", "", head, rule]
    for name, label in labels.items():
        f = figures[name]
        row = f"| {label} | {f['ndcg@10']:.4f} | {f['recall@100']:.4f} | "
        row += f"{f['judged_ndcg@10']:.4f} |"
        if reference:
            row += " " + " / ".join(f"{v:.4f}" for v in reference.get(name, ())) + " |"
        lines.append(row)
    lines += ["", "Paired differences, mean ± 95% half-width over the same queries:", ""]
    lines += ["| difference | NDCG@10 | Recall@100 | judged NDCG@10 |", "|---|---:|---:|---:|"]
    for name, diff in intervals.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:+.4f} ± {h:.4f}" for m, h in diff.values()))
        lines[-1] += " |"
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The protocol inside a run: `data.task=search eval.protocol=full_catalog`


def evaluate_run(run: Run, retriever_dir: str | None) -> tuple[dict[str, dict], str]:
    """Whole-catalog search for a run: BM25 on the item texts, the zero-shot bi-encoder, the
    fine-tuned one (a retriever export) and each bi-encoder z-summed with BM25, over the
    `eval.split` queries of split-pinned judgments; report.md with paired 95% intervals."""
    from shoprank.data.load import counts_table
    from shoprank.data.text import render_items
    from shoprank.evaluation import report
    from shoprank.evaluation.scorers import precision_words
    from shoprank.models.export_meta import read_export
    from shoprank.models.retriever import EncoderSpec
    from shoprank.retrieval.bm25 import BM25
    from shoprank.retrieval.embed import embed_text_list

    cfg, data = run.cfg, run.data
    if data.judgments is None or "split" not in data.judgments.column_names:
        raise ValueError(
            f"data.task=search with eval.protocol=full_catalog needs judgments with a `split` "
            f"column (data.judgments={cfg.data.judgments!r}); import with jobs/prepare.py "
            "homedepot, or use eval.protocol=sampled (each query's judged items)"
        )
    if retriever_dir and read_export(retriever_dir).kind != "retriever":
        raise ValueError(
            f"{retriever_dir} is a ranker: the whole-catalog search protocol ranks the catalog "
            "with a retriever export (model.kind=retriever)"
        )
    queries = search_set(data.catalog, data.judgments, cfg.eval.split)
    texts = render_items(data.catalog, cfg.data.item_template)
    log(
        f"search over the whole catalog: {len(queries.queries)} {cfg.eval.split} queries, "
        f"{queries.n_items} items"
    )
    scorers: dict[str, Scorer] = {"bm25": bm25_scorer(BM25(texts), queries.queries)}
    labels = {"bm25": "BM25"}
    specs = {}  # name -> (the encoder, its label)
    if cfg.eval.zero_shot:
        specs["zero-shot"] = (
            EncoderSpec.zero_shot(cfg),
            f"zero-shot bi-encoder ({cfg.model.name})",
        )
    if retriever_dir:
        specs["fine-tuned"] = (EncoderSpec.from_export(retriever_dir), "fine-tuned bi-encoder")
    hybrids = {}
    for name, (spec, label) in specs.items():
        items = embed_text_list(texts, spec, "item", cfg)
        contexts = embed_text_list(queries.queries, spec, "context", cfg)
        scorers[name] = cosine_scorer(contexts, items)
        hybrids[f"bm25 + {name}"] = ("bm25", name)
        labels[name] = label
        labels[f"bm25 + {name}"] = f"BM25 + {name} (z-scores summed)"
    per_query = evaluate(queries, scorers, hybrids, progress=True)
    figures = {name: per_query[name].summary() for name in labels}
    pairs = [(a, "bm25") for a in labels if a != "bm25"]
    if "fine-tuned" in specs and "zero-shot" in specs:
        pairs += [("fine-tuned", "zero-shot"), ("bm25 + fine-tuned", "bm25 + zero-shot")]
    intervals = {f"{a} - {b}": paired(per_query[a], per_query[b]) for a, b in pairs}

    folder = run.out / "report_search_catalog"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(
        json.dumps({"split": cfg.eval.split, "metrics": figures, "paired_95": intervals}, indent=2)
    )
    shown = [f"ndcg@{K}", f"recall@{RECALL_K}"]
    table = {labels[n]: {m: figures[n][m] for m in shown} for n in labels}
    images = {"Whole-catalog search": report.bar_chart(table, shown, folder / "metrics.png")}
    if run.history or run.steps:
        images["Training"] = report.training_curve(
            run.history, run.steps, ["val_ndcg@10"], folder / "training.png"
        )
    title = f"{cfg.eval.split}: {figures['bm25']['queries']} queries, {queries.n_items} items"
    body = markdown(title, figures, intervals, labels).split("\n", 2)[2]  # its own heading off
    protocol = (
        "Each query with a gain > 0 ranks every catalog item (a stable sort of descending score, "
        "ties in catalog order); NDCG@10 with linear gains and the ideal from the query's own "
        "judgments, Recall@100 the share of its gain > 0 items in the top 100; judged NDCG@10 "
        "orders only the query's judged items (queries with two grades or more). A hybrid sums "
        "its systems' per-query z-scores over the whole catalog."
    )
    sections = [
        ("Results", body),
        ("Protocol", protocol),
        ("Data quality", counts_table(data.counts)),
        ("Training time", report.training_time(run.timing, run.steps) or "–"),
    ]
    path = report.write_report(
        folder,
        f"shoprank search, whole catalog: {cfg.run.name}",
        sections,
        images,
        precision_words(cfg),
    )
    report.print_table(table, shown)
    for name, diff in intervals.items():
        mean, half = diff["ndcg"]
        log(f"{name}: {mean:+.4f} ndcg@{K} ±{half:.4f} (95% paired interval)")
    return figures, str(path)
