"""Evaluate a run's exported ranker: zero-shot vs fine-tuned vs baselines, Markdown + PNG report.

    python jobs/evaluate.py [--config configs/FILE.yaml] [eval.split=valid] [section.key=value ...]

Reads the model from runs/<run.name>/export (or --model DIR) and rebuilds the same held-out
groups from the same data and seed as the training job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shoprank import pipeline
from shoprank.config import load_config
from shoprank.export import METADATA
from shoprank.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: the built-in synthetic shop)")
    parser.add_argument("--model", help="exported model folder (default: the run's export)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    out = pipeline.start(cfg)
    export_dir = Path(args.model or out / "export")
    if not (export_dir / METADATA).exists():
        raise SystemExit(f"{export_dir} holds no exported model; run jobs/train.py first")
    history = json.loads((export_dir / METADATA).read_text()).get("history", [])
    init_ray()

    data, examples = pipeline.prepare(cfg, out)
    table, report = pipeline.evaluate_and_report(cfg, out, data, examples, str(export_dir), history)
    pipeline.print_table(table)
    print(f"\n[shoprank] report: {report}")


if __name__ == "__main__":
    main()
