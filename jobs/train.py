"""Fine-tune the ranker or the retriever: Parquet -> Ray Data -> Ray Train + DeepSpeed ->
export -> report.

    python jobs/train.py [--config configs/FILE.yaml] [section.key=value ...]

`model.kind=retriever` trains the bi-encoder (configs/amazon-retriever.yaml); the default is
the cross-encoder ranker. Run it again with the same run.name to resume from the last checkpoint.
"""

from __future__ import annotations

import argparse
import time

from shoprank import pipeline
from shoprank.config import load_config
from shoprank.runtime import init_ray
from shoprank.training import best_checkpoint, fit, run_history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: the built-in synthetic shop)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args()  # options may come between overrides

    # 1. Config.
    cfg = load_config(args.config, args.overrides)
    out = pipeline.start(cfg)
    init_ray()

    # 2. Data: validate, build example groups, tokenize (all inside Ray Data).
    data, examples = pipeline.prepare(cfg, out)
    datasets = pipeline.training_datasets(cfg, data, examples)
    n_train = datasets["train"].count()
    print(f"[shoprank] {n_train} training groups, {datasets['valid'].count()} validation groups")

    # 3. Train (resumes when this run name already has checkpoints).
    started = time.perf_counter()
    result = fit(cfg, cfg.model.kind, datasets, n_train)
    wall = time.perf_counter() - started
    checkpoint, best = best_checkpoint(result, cfg)
    history = run_history(result)

    # 4. Export the best checkpoint as a plain Hugging Face folder.
    export_dir = pipeline.export_run(
        cfg, data, checkpoint, best, history, out / "export", train_wall_s=wall
    )

    # 5. Blend weights (retriever), then evaluate: zero-shot vs fine-tuned vs baselines.
    report = pipeline.finish(cfg, out, data, examples, export_dir, history)
    value = best[f"val_{cfg.train.metric}"]
    print(f"\n[shoprank] best checkpoint: {checkpoint.path} ({cfg.train.metric}={value:.4f})")
    print(f"[shoprank] exported model: {export_dir}")
    print(f"[shoprank] report: {report}")


if __name__ == "__main__":
    main()
