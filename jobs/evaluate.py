"""Evaluate exported models: zero-shot vs fine-tuned vs baselines, Markdown + PNG report.

    python jobs/evaluate.py [--config configs/FILE.yaml] [eval.split=valid] [section.key=value ...]
    python jobs/evaluate.py --config configs/amazon-retriever.yaml \
        [--retriever DIR] [--ranker DIR] [eval.split=valid data.val_users=null]

The protocol follows the config (lib/shoprank/evaluation/protocols.py): sampled candidates for a
ranker (read from runs/<run.name>/export, or --model DIR); the full catalog for a retriever (its
ANN index built or refreshed first; --ranker reranks its top eval.retrieve_top); judged queries
for data.task=search. Held-out examples are rebuilt from the same data and seed as training.
"""

from __future__ import annotations

from shoprank import run as runs
from shoprank.console import log
from shoprank.evaluation.protocols import Models, evaluate
from shoprank.models.export_meta import METADATA, read_export


def main() -> None:
    parser = runs.parser(__doc__)
    parser.add_argument("--model", help="exported model folder (default: the run's export)")
    parser.add_argument("--retriever", help="exported retriever (full_catalog protocol)")
    parser.add_argument("--ranker", help="exported ranker for stage two (full_catalog protocol)")
    args = parser.parse_intermixed_args()  # options may come between overrides

    # 1. Config and the models to compare (the run's own export unless told otherwise).
    run = runs.start(args, with_ray=False)
    own = run.out / "export"
    model = args.model or (str(own) if (own / METADATA).exists() else None)
    if not (model or args.retriever or args.ranker or run.cfg.eval.retriever):
        raise SystemExit(f"{own} holds no exported model; run jobs/train.py first")
    if model:
        meta = read_export(model)
        run.history, run.steps = meta.history, meta.steps
    runs.init_ray()

    # 2. Data (the same validated events and held-out examples as training), evaluation, report.
    _, report = evaluate(run, Models(model=model, retriever=args.retriever, ranker=args.ranker))
    log(f"report: {report}")


if __name__ == "__main__":
    main()
