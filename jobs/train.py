"""Fine-tune the ranker or the retriever: Parquet -> Ray Data -> Ray Train + DeepSpeed ->
export -> report.

    python jobs/train.py [--config configs/FILE.yaml] [section.key=value ...]

`model.kind=retriever` trains the bi-encoder (configs/amazon-retriever.yaml); the default is
the cross-encoder ranker. Run it again with the same run.name to resume from the last checkpoint.
With tracking.enabled (the default) the run is also an MLflow run (lib/shoprank/tracking.py).
"""

from __future__ import annotations

import time

from shoprank import run as runs
from shoprank.console import log
from shoprank.evaluation.protocols import after_training
from shoprank.evaluation.report import training_time
from shoprank.registry import publish_run
from shoprank.tracking import Tracker
from shoprank.train.datasets import training_datasets
from shoprank.train.export import export_run
from shoprank.train.loop import best_checkpoint, fit, saved_state


def main() -> None:
    # 1. Config (printed and saved beside the outputs); Ray started or joined; the MLflow run
    # (a resumed job continues its run), FAILED if the job fails.
    run = runs.start(runs.parser(__doc__).parse_intermixed_args())
    cfg = run.cfg
    with Tracker.open(cfg, "train") as tracked:
        # 2. Data: validate, build example groups, tokenize (all inside Ray Data).
        datasets = training_datasets(cfg, run.data.catalog, run.examples)
        n_train = datasets["train"].count()
        log(f"{n_train} training groups, {datasets['valid'].count()} validation groups")

        # 3. Train (resumes when this run name already has checkpoints). Every logged step and
        # validation goes to MLflow from the step log saved with the latest checkpoint.
        started = time.perf_counter()
        result = fit(cfg, cfg.model.kind, datasets, n_train)
        wall = time.perf_counter() - started
        checkpoint, best = best_checkpoint(result, cfg)
        state = saved_state(result.checkpoint)
        run.history, run.steps, run.timing = state.history, state.steps, state.timing
        log(training_time(state.timing, state.steps))
        tracked.log_training(state.steps, state.history)
        tracked.log_best(best)

        # 4. Export the best checkpoint as a plain Hugging Face folder.
        export_dir = export_run(run, checkpoint, best, run.out / "export", train_wall_s=wall)
        tracked.log_artifacts(export_dir, "export")

        # 5. Blend weights (retriever), then evaluate: zero-shot vs fine-tuned vs baselines.
        report = after_training(run, export_dir)
        tracked.log_report(report)

        # 6. The registry: the export becomes the `candidate`; production moves only past the
        # gate.
        if cfg.registry.publish:
            version, decision = publish_run(cfg, export_dir)
            log(f"registered {version.name} v{version.version} at {version.uri}")
            tracked.set_tags({"registry.version": f"{version.name} v{version.version}"})
            if decision:
                log(f"production {'->' if decision.promoted else 'stays'}: {decision.reason}")
    metric = cfg.train.metric
    log(f"best checkpoint: {checkpoint.path} ({metric}={best[f'val_{metric}']:.4f})")
    log(f"exported model: {export_dir}")
    log(f"report: {report}")


if __name__ == "__main__":
    main()
