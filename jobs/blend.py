"""Choose the blended stage one's weights on valid for an exported retriever.

    python jobs/blend.py --config configs/amazon-retriever.yaml [--retriever DIR]
        [data.val_users=null] [eval.blend_trials=60] [train.metric=ndcg@10]

Embeds the valid users' contexts (data.val_users of them, null = all), scores the whole
catalog with each signal (retriever, decayed history of item embeddings, co-visitation, TF-IDF,
popularity), searches the weights with Optuna and writes <retriever>/blend.json;
jobs/evaluate.py then applies them to test. jobs/train.py does the same right after training.
"""

from __future__ import annotations

from shoprank import run as runs
from shoprank.console import log
from shoprank.retrieval import blend


def main() -> None:
    parser = runs.parser(__doc__)
    parser.add_argument("--retriever", help="exported retriever (default: the run's export)")
    args = parser.parse_intermixed_args()  # options may come between overrides

    # 1. Config and the retriever.
    run = runs.start(args, with_ray=False)
    retriever = args.retriever or str(run.out / "export")
    if run.cfg.eval.blend_trials < 1:
        raise SystemExit(f"eval.blend_trials={run.cfg.eval.blend_trials}: give at least 1 trial")
    runs.init_ray()

    # 2. The search on the valid users (data.val_users of them; null = all).
    found = blend.fit(run, retriever)
    log(f"wrote {retriever}/{blend.FILE} ({len(found['trials'])} trials)")


if __name__ == "__main__":
    main()
