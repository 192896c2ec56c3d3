"""Retrain production on the day partitions newer than its snapshot: train from its weights on
a window of recent days, judge candidate and production on the newest day, promote through
the registry's gate; the Serve app follows production and swaps the new version in.

    python jobs/retrain.py [--config configs/retrain-synthetic.yaml] [section.key=value ...]

What it does, step by step: lib/shoprank/loop/retrain.py. Schedule it nightly (cron, a
Kubernetes CronJob) with `ray job submit ... -- python jobs/retrain.py ...`. Exit status: 0
when production was promoted or kept (the last line says which, and why), 1 when the run
failed (production untouched; the error is printed), 3 when another retraining of the same
model was running (this one did nothing).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from shoprank import run as runs
from shoprank.console import log
from shoprank.loop.retrain import Refused, retrain
from shoprank.registry import PRODUCTION, Registry

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "retrain-synthetic.yaml"
FAILED, REFUSED = 1, 3


def main() -> int:
    # 1. Config (printed and saved beside the outputs); Ray started or joined.
    run = runs.start(runs.parser(__doc__, str(DEFAULT)).parse_intermixed_args())
    cfg = run.cfg
    name = cfg.registry.model or cfg.run.name
    # 2. Retrain: new days -> train from production -> newest day -> report -> gate.
    try:
        outcome = retrain(cfg, run.out)
    except Refused as err:
        log(f"refused: {err}")
        return REFUSED
    except Exception as err:  # noqa: BLE001 - reported with its traceback, status 1
        traceback.print_exc()
        production = Registry(cfg.registry.root).aliases(name).get(PRODUCTION)
        stays = "none" if production is None else f"v{production}"
        log(f"retraining failed, production untouched ({stays}): {type(err).__name__}: {err}")
        return FAILED
    # 3. What happened, in one line (the report has the rest).
    if outcome.report:
        log(f"report: {outcome.report}")
    log(outcome.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
