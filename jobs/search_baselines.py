"""Whole-catalog search figures of the zero-shot stage one: BM25, MiniLM and their hybrid.

    python jobs/search_baselines.py --data data/home-depot [--split test|valid ...] [--out DIR]

Reads what `jobs/prepare.py homedepot` wrote, ranks the whole catalog for each query of the
split with BM25 on titles, the bundled all-MiniLM-L6-v2 (zero-shot, titles alone) and their
per-query z-score sum, and writes <out>/search_baselines_<split>.md (one .json for the splits
asked for): NDCG@10, Recall@100, judged-candidates NDCG@10 and paired 95% intervals against
BM25 (evaluation/search_catalog.py states the protocol; the dataset README its reference figures).
No Ray needed; the catalog embedding takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from shoprank.data.validate import check_catalog, check_judgments, reason_counts, split_quarantine
from shoprank.evaluation import search_catalog as sc
from shoprank.retrieval.bm25 import BM25

SYSTEMS = {"bm25": "BM25 (titles)", "minilm": "MiniLM zero-shot", "hybrid": "BM25 + MiniLM z"}
# The dataset README's test figures (NDCG@10, Recall@100, judged NDCG@10), printed beside ours.
REFERENCE = {
    "bm25": (0.3363, 0.6547, 0.9198),
    "minilm": (0.2800, 0.6223, 0.9245),
    "hybrid": (0.3586, 0.7094, 0.9237),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder written by jobs/prepare.py")
    parser.add_argument("--split", nargs="+", default=["test"], choices=["test", "valid"])
    parser.add_argument("--out", help="where the reports go (default: DATA/search_baselines)")
    args = parser.parse_args(argv)
    data, out = Path(args.data), Path(args.out or Path(args.data) / "search_baselines")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    # 1. The imported data, validated: a bad row stops the job rather than skew a figure.
    catalog, bad_items = split_quarantine(check_catalog(pq.read_table(data / "catalog.parquet")))
    judgments, bad_pairs = split_quarantine(
        check_judgments(pq.read_table(data / "judgments.parquet"), catalog["item_id"])
    )
    if bad_items.num_rows or bad_pairs.num_rows:
        raise SystemExit(
            f"{data}: bad catalog rows {reason_counts(bad_items)}, bad judgments "
            f"{reason_counts(bad_pairs)}; re-import with jobs/prepare.py homedepot"
        )
    titles = catalog["title"].to_pylist()

    # 2. Stage one's two systems over the whole catalog: BM25 and the MiniLM item embeddings.
    started = time.perf_counter()
    bm25 = BM25(titles)
    seconds["bm25_index"] = time.perf_counter() - started
    encoder = sc.zero_shot_encoder()  # fp32
    started = time.perf_counter()
    items = sc.embed_texts(encoder, titles, "item", desc="embedding titles")
    seconds["embed_catalog"] = time.perf_counter() - started

    # 3. Each split: its queries embedded, the catalog ranked, figures and paired intervals.
    results = {}
    for split in args.split:
        started = time.perf_counter()
        queries = sc.search_set(catalog, judgments, split)
        query_emb = sc.embed_texts(encoder, queries.queries, "context", desc="embedding queries")
        per_query = sc.evaluate(
            queries,
            {
                "bm25": sc.bm25_scorer(bm25, queries.queries),
                "minilm": sc.cosine_scorer(query_emb, items),
            },
            hybrids={"hybrid": ("bm25", "minilm")},
            progress=True,
        )
        seconds[f"rank_{split}"] = time.perf_counter() - started
        figures = {name: r.summary() for name, r in per_query.items()}
        intervals = {
            f"{a} - bm25": sc.paired(per_query[a], per_query["bm25"]) for a in ("hybrid", "minilm")
        }
        title = (
            f"Zero-shot stage one, whole catalog: Home Depot {split} "
            f"({figures['bm25']['queries']} queries, {queries.n_items} products)"
        )
        reference = REFERENCE if split == "test" else None
        report = sc.markdown(title, figures, intervals, SYSTEMS, reference)
        (out / f"search_baselines_{split}.md").write_text(report)
        print(report)
        results[split] = {"figures": figures, "paired_95": intervals}

    results["seconds"] = seconds
    name = "search_baselines_" + "_".join(args.split) + ".json"
    (out / name).write_text(json.dumps(results, indent=2))
    print(json.dumps(seconds, indent=2))
    return results


if __name__ == "__main__":
    main()
