"""Evaluate exported models: zero-shot vs fine-tuned vs baselines, Markdown + PNG report.

    python jobs/evaluate.py [--config configs/FILE.yaml] [eval.split=valid] [section.key=value ...]
    python jobs/evaluate.py --config configs/amazon-retriever.yaml \
        [--retriever DIR] [--ranker DIR] [eval.split=valid data.val_users=null]

eval.protocol=sampled (ranker runs): each user's held-out item among sampled candidates, the
ranker read from runs/<run.name>/export (or --model DIR).
eval.protocol=full_catalog (retriever runs): every item is a candidate; the retriever (its ANN
index built or refreshed first) retrieves eval.retrieve_top, the ranker, when given, reranks
them. Held-out examples are rebuilt from the same data and seed as the training job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    args = parser.parse_args()

    # 1. Config and the models to compare.
    cfg = load_config(args.config, args.overrides)
    out = pipeline.start(cfg)
    export_dir = Path(args.model or out / "export")
    full = cfg.eval.protocol == "full_catalog"
    if full:
        own = str(export_dir) if (export_dir / METADATA).exists() else None
        retriever = args.retriever or cfg.eval.retriever or own
        ranker = args.ranker or cfg.eval.ranker
        if own and read_metadata(own)["kind"] != "retriever" and retriever == own:
            raise SystemExit(f"{own} is a ranker; pass the retriever with --retriever DIR")
    elif not (export_dir / METADATA).exists():
        raise SystemExit(f"{export_dir} holds no exported model; run jobs/train.py first")
    history = (
        json.loads((export_dir / METADATA).read_text()).get("history", [])
        if (export_dir / METADATA).exists()
        else []
    )
    init_ray()

    # 2. Data: the same validated events and held-out examples as training.
    data, examples = pipeline.prepare(cfg, out)

    # 3. Evaluate and report.
    if full:
        _, report = pipeline.full_catalog_report(
            cfg, out, data, examples, retriever, ranker, history
        )
    else:
        table, report = pipeline.evaluate_and_report(
            cfg, out, data, examples, str(export_dir), history
        )
        pipeline.print_table(table)
    print(f"\n[shoprank] report: {report}")


if __name__ == "__main__":
    main()
