"""Search learning rate, LoRA rank and friends with Ray Tune over Ray Train; export the winner,
register it, and promote it when it beats production.

    python tune/sweep.py [--config tune/FILE.yaml] [section.key=value ...]
    ray job submit --working-dir . -- python tune/sweep.py --config tune/amazon-retriever.yaml

Each trial is one run of the fine-tuning job's training loop (config `sweep.space` says what
varies, `sweep.*` how to search, `registry.*` where the winner goes). Run it again with the same
run.name to resume: finished trials are kept, unfinished ones resume from their checkpoints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shoprank import pipeline, sweep
from shoprank.config import load_config, with_values
from shoprank.registry import publish
from shoprank.runtime import init_ray

DEFAULT = Path(__file__).resolve().parent / "synthetic.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT), help="sweep YAML (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args()  # options may come between overrides

    # 1. Config: the training config every trial starts from, plus the search.
    cfg = load_config(args.config, args.overrides)
    out = pipeline.start(cfg)
    init_ray()

    # 2. Data once: validated, examples per searched data.* value, tokenized, materialised.
    data, examples = pipeline.prepare(cfg, out)
    variants = {}
    for values in sweep.data_variants(cfg):
        variant = with_values(cfg, values)
        own = pipeline.examples_for(variant, data) if values else examples
        datasets = pipeline.training_datasets(variant, data, own)
        variants[sweep.variant_key(variant)] = (datasets, datasets["train"].count())
    print(
        f"[shoprank] training groups per data variant: "
        f"{ {k: rows for k, (_, rows) in variants.items()} }"
    )

    # 3. Search: Tune prints the live table of trials.
    grid = sweep.run(cfg, variants)
    table = sweep.results_table(cfg, grid, variants)
    sweep_report = sweep.write_results(cfg, table, grid, out / "sweep")

    # 4. Export the winner's best checkpoint, and the config's own trial to compare against.
    best = sweep.pick(cfg, table, grid, "best")
    own = sweep.pick(cfg, table, grid, "default")
    done = sweep.published(cfg, best)
    if done is not None:
        print(
            f"[shoprank] sweep report: {sweep_report}; its winner {best.row['trial']} is "
            f"already {done.name} v{done.version}: nothing new to export or register"
        )
        return
    for folder, trial in {"export-default": own, "export": best}.items():
        if trial is not None:
            pipeline.export_run(
                trial.cfg,
                data,
                sweep.checkpoint(cfg, trial.row["checkpoint"]),
                trial.metrics,
                trial.history,
                out / folder,
                sweep={"name": cfg.run.name, **trial.row},
            )
    export_dir = str(out / "export")

    # 5. Blend weights (retriever) and the report on eval.split, as the fine-tuning job does.
    eval_report = pipeline.finish(best.cfg, out, data, examples, export_dir, best.history)

    # 6. Registry: the winner becomes the candidate; production moves only past the gate.
    name = cfg.registry.model or cfg.run.name
    metric = cfg.registry.metric or f"val_{cfg.train.metric}"
    version, decision = publish(
        cfg.registry.root,
        name,
        export_dir,
        metric,
        cfg.train.metric_mode,
        cfg.registry.margin,
        cfg.registry.promote,
        metadata={"sweep": {"name": cfg.run.name, "report": str(sweep_report), **best.row}},
    )
    for label, trial in (("winner", best), ("the config's own values", own)):
        if trial is not None:
            values = ", ".join(f"{k}={trial.row[k]}" for k in cfg.sweep.space)
            print(
                f"[shoprank] {label}: trial {trial.row['trial']} {values}: "
                f"val_{cfg.train.metric}={trial.row['best']:.4f} ({trial.row['status']})"
            )
    print(f"[shoprank] registered {name} v{version.version} at {version.uri}")
    if decision:
        print(f"[shoprank] production {'->' if decision.promoted else 'stays'}: {decision.reason}")
    print(f"[shoprank] sweep report: {sweep_report}\n[shoprank] evaluation report: {eval_report}")


if __name__ == "__main__":
    main()
