"""Choose the blended stage one's weights on valid for an exported retriever.

    python jobs/blend.py --config configs/amazon-retriever.yaml [--retriever DIR]
        [data.val_users=null] [eval.blend_trials=60] [train.metric=ndcg@10]

Embeds the valid users' contexts (data.val_users of them, null = all), scores the whole
catalog with each signal (retriever, decayed history of item embeddings, co-visitation, TF-IDF,
popularity), searches the weights with Optuna and writes <retriever>/blend.json;
jobs/evaluate.py then applies them to test. jobs/train.py does the same right after training.
"""

from __future__ import annotations

import argparse

from shoprank import pipeline
from shoprank.config import load_config
from shoprank.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: the built-in synthetic shop)")
    parser.add_argument("--retriever", help="exported retriever (default: the run's export)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args()  # options may come between overrides

    # 1. Config and the retriever.
    cfg = load_config(args.config, args.overrides)
    out = pipeline.start(cfg)
    retriever = args.retriever or str(out / "export")
    if cfg.eval.blend_trials < 1:
        raise SystemExit(f"eval.blend_trials={cfg.eval.blend_trials}: give at least 1 trial")
    init_ray()

    # 2. Data, then the search on the valid users (data.val_users of them; null = all).
    data, examples = pipeline.prepare(cfg, out)
    found = pipeline.tune_blend(cfg, data, examples, retriever)
    print(f"[shoprank] wrote {retriever}/blend.json ({len(found['trials'])} trials)")


if __name__ == "__main__":
    main()
