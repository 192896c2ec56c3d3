"""Evaluate exported models: zero-shot vs fine-tuned vs baselines, Markdown + PNG report.

    python jobs/evaluate.py [--config configs/FILE.yaml] [eval.split=valid] [section.key=value ...]
    python jobs/evaluate.py --config configs/amazon-retriever.yaml \
        [--retriever DIR] [--ranker DIR] [eval.split=valid data.val_users=null]

eval.protocol=sampled (ranker runs): each user's held-out item among sampled candidates, the
ranker read from runs/<run.name>/export (or --model DIR).
eval.protocol=full_catalog (retriever runs): every item is a candidate; the retriever (its ANN
index built or refreshed first) retrieves eval.retrieve_top, the ranker, when given, reranks
them. data.task=search: NDCG@10 over data.judgments for the model (ranker or retriever).
Held-out examples are rebuilt from the same data and seed as the training job.
"""

from __future__ import annotations

import argparse

from shoprank import pipeline
from shoprank.config import load_config
from shoprank.models.encoder import METADATA, read_metadata
from shoprank.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: the built-in synthetic shop)")
    parser.add_argument("--model", help="exported model folder (default: the run's export)")
    parser.add_argument("--retriever", help="exported retriever (full_catalog protocol)")
    parser.add_argument("--ranker", help="exported ranker for stage two (full_catalog protocol)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args()  # options may come between overrides

    # 1. Config and the models to compare (the run's own export unless told otherwise).
    cfg = load_config(args.config, args.overrides)
    out = pipeline.start(cfg)
    model = args.model or (str(out / "export") if (out / "export" / METADATA).exists() else None)
    history = read_metadata(model).get("history", []) if model else []
    full = cfg.eval.protocol == "full_catalog"
    if not (model or args.retriever or args.ranker or cfg.eval.retriever):
        raise SystemExit(f"{out / 'export'} holds no exported model; run jobs/train.py first")
    init_ray()

    # 2. Data: the same validated events and held-out examples as training.
    data, examples = pipeline.prepare(cfg, out)

    # 3. Evaluate and report.
    if cfg.data.task == "search":
        chosen = args.ranker or args.retriever or model
        _, report = pipeline.search_report(cfg, out, data, examples, chosen, history)
    elif full:
        retriever = args.retriever or cfg.eval.retriever or model
        ranker = args.ranker or cfg.eval.ranker
        _, report = pipeline.full_catalog_report(
            cfg, out, data, examples, retriever, ranker, history
        )
    else:
        ranker = args.ranker or model
        table, report = pipeline.evaluate_and_report(cfg, out, data, examples, ranker, history)
        pipeline.print_table(table)
    print(f"\n[shoprank] report: {report}")


if __name__ == "__main__":
    main()
