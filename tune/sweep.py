"""Search learning rate, LoRA rank and friends with Ray Tune over Ray Train; export the winner,
register it, and promote it when it beats production.

    python tune/sweep.py [--config tune/FILE.yaml] [section.key=value ...]
    ray job submit --working-dir . -- python tune/sweep.py --config tune/amazon-retriever.yaml

Each trial is one run of the fine-tuning job's training loop (config `sweep.space` says what
varies, `sweep.*` how to search, `registry.*` where the winner goes). Run it again with the same
run.name to resume: finished trials are kept, unfinished ones resume from their checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from shoprank import run as runs
from shoprank.config import with_values
from shoprank.console import log
from shoprank.evaluation.protocols import after_training
from shoprank.registry import publish_run
from shoprank.train import sweep
from shoprank.train.datasets import training_datasets
from shoprank.train.export import export_run
from shoprank.train.loop import saved_state

DEFAULT = Path(__file__).resolve().parent / "synthetic.yaml"


def main() -> None:
    # 1. Config: the training config every trial starts from, plus the search.
    run = runs.start(runs.parser(__doc__, str(DEFAULT)).parse_intermixed_args())
    cfg, out = run.cfg, run.out

    # 2. Data once: validated, examples per searched data.* value, tokenized, materialised.
    variants = {}
    for values in sweep.data_variants(cfg):
        variant = with_values(cfg, values)
        # A data variant builds its own examples from the same validated data.
        examples = (
            runs.Run(variant, out, _shared={"data": run.data}).examples if values else run.examples
        )
        datasets = training_datasets(variant, run.data.catalog, examples)
        variants[sweep.variant_key(variant)] = (datasets, datasets["train"].count())
    log(f"training groups per data variant: { {k: rows for k, (_, rows) in variants.items()} }")

    # 3. Search: Tune prints the live table of trials.
    grid = sweep.run(cfg, variants)
    table = sweep.results_table(cfg, grid, variants)
    sweep_report = sweep.write_results(cfg, table, grid, out / "sweep")

    # 4. Export the winner's best checkpoint, and the config's own trial to compare against.
    best = sweep.pick(cfg, table, grid, "best")
    own = sweep.pick(cfg, table, grid, "default")
    done = sweep.published(cfg, best)
    if done is not None:
        log(
            f"sweep report: {sweep_report}; its winner {best.row['trial']} is "
            f"already {done.name} v{done.version}: nothing new to export or register"
        )
        return
    for folder, trial in {"export-default": own, "export": best}.items():
        if trial is not None:
            trial_run = run.with_config(trial.cfg)
            checkpoint = sweep.checkpoint(cfg, trial.row["checkpoint"])
            trial_run.history, trial_run.steps = trial.history, saved_state(checkpoint).steps
            export_run(
                trial_run,
                checkpoint,
                trial.metrics,
                out / folder,
                sweep={"name": cfg.run.name, **trial.row},
            )
    export_dir = str(out / "export")

    # 5. Blend weights (retriever) and the report on eval.split, as the fine-tuning job does.
    winner = run.with_config(best.cfg)
    winner.history = best.history
    winner.steps = saved_state(sweep.checkpoint(cfg, best.row["checkpoint"])).steps
    eval_report = after_training(winner, export_dir)

    # 6. Registry: the winner becomes the candidate; production moves only past the gate.
    version, decision = publish_run(
        cfg,
        export_dir,
        metadata={"sweep": {"name": cfg.run.name, "report": str(sweep_report), **best.row}},
    )
    for label, trial in (("winner", best), ("the config's own values", own)):
        if trial is not None:
            values = ", ".join(f"{k}={trial.row[k]}" for k in cfg.sweep.space)
            log(
                f"{label}: trial {trial.row['trial']} {values}: "
                f"val_{cfg.train.metric}={trial.row['best']:.4f} ({trial.row['status']})"
            )
    log(f"registered {version.name} v{version.version} at {version.uri}")
    if decision:
        log(f"production {'->' if decision.promoted else 'stays'}: {decision.reason}")
    log(f"sweep report: {sweep_report}")
    log(f"evaluation report: {eval_report}")


if __name__ == "__main__":
    main()
