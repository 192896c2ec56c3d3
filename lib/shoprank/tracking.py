"""Experiment tracking in MLflow: every training run and every sweep trial is an MLflow run with
its resolved config (params), its metrics per logged step and per validation, and its report
and export (artifacts).

The driver logs, from what the run saved with its checkpoints: the loop's `StepRecord`s (the
same records the console prints and bench/bench_train.py reads) and its validation reports.
Nothing is sent from inside Ray Train workers, so a restarted worker group, a resumed job or a
retried trial logs each step once: a run is found again by its key (the run name, or the sweep
and trial), and points already logged are not logged twice.

    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db   (see the README)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shoprank.config import Config, ConfigError
from shoprank.console import log
from shoprank.console import redact as _redact_uri

KEY_TAG = "shoprank.run"  # what finds a run again on resume: the run name, or sweep/trial
KIND_TAG = "shoprank.kind"  # train, sweep or trial
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests trials under their sweep
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"

_SECRET_KEY = re.compile(r"(?i)(key|secret|token|password|passwd|signature|credential)")
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")
_CREDENTIALS = re.compile(r"://[^/@\s'\"]+@")  # user:password@ in a URI


def _local_root(cfg: Config) -> Path:
    # Where run outputs live locally: run.storage, or outputs/ when it is remote (run.output_dir).
    storage = cfg.run.storage
    return Path(storage if "://" not in storage else "outputs").resolve()


def tracking_uri(cfg: Config) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else a SQLite store under the run storage."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{_local_root(cfg) / STORE_FILE}"


def artifact_root(uri: str) -> str | None:
    """A local SQLite store keeps its artifacts beside it (MLflow's default, ./mlruns, would
    follow the working directory); a tracking server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :]).resolve()
    return (db.parent / ARTIFACTS_DIR).as_uri()


def metric_name(name: str) -> str:
    """A name MLflow accepts: ndcg@10 -> ndcg_at_10 (it allows letters, digits, _-. :/)."""
    return _BAD_NAME_CHARS.sub("_", name.replace("@", "_at_"))


def redact(text: str) -> str:
    """`console.redact` for URIs that carry credentials; others unchanged (it would rewrite
    sqlite:////abs/mlflow.db, whose host is empty, to sqlite://abs/mlflow.db)."""
    if "://" not in text:
        return text
    parts = urlsplit(text)
    return _redact_uri(text) if "@" in parts.netloc or parts.query else text


def _shown(key: str, value: Any) -> Any:
    """A config value as it may be stored: secret-named keys hidden, credentials cut from URIs."""
    if _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, ""):
        return "***"
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _shown(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_shown(key, v) for v in value]
    return value


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as `section.key` params, secrets redacted."""
    params = {}
    for section, values in cfg.model_dump(mode="json").items():
        for key, value in values.items():
            shown = _shown(f"{section}.{key}", value)
            text = shown if isinstance(shown, str) else json.dumps(shown)
            params[f"{section}.{key}"] = text[:6000]  # MLflow's limit on a param's value
    return params


def _step_metrics(record: dict) -> dict[str, float]:
    """One saved StepRecord's fields (but its step) as `train/<field>` metrics."""
    from shoprank.train.loop import StepRecord

    step = StepRecord(**record)
    return {
        f"train/{f.name}": getattr(step, f.name) for f in fields(StepRecord) if f.name != "step"
    }


def _validation_metrics(report: dict) -> dict[str, float]:
    """One validation report's metrics (val_ndcg@10 -> val/ndcg_at_10)."""
    return {
        f"val/{metric_name(k[len('val_') :])}": v
        for k, v in report.items()
        if k.startswith("val_") and _number(v)
    }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _quiet_mlflow() -> None:
    # Its INFO lines ("Creating initial MLflow database tables...") are about itself, and so is
    # SQLAlchemy 2.1's deprecation of a loader option MLflow's SQL store uses.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore",
        message="The ``noload`` loader strategy is deprecated",
        category=DeprecationWarning,
    )


class Tracker:
    """One MLflow run, or nothing at all when tracking is off (every method then does nothing):
    jobs call it unconditionally."""

    def __init__(self, client=None, run_id: str | None = None, uri: str = "") -> None:
        self.client, self.run_id, self.uri = client, run_id, uri

    @classmethod
    def open(
        cls,
        cfg: Config,
        kind: str,
        key: str | None = None,
        name: str | None = None,
        parent: Tracker | None = None,
        announce: bool = True,
    ) -> Tracker:
        """The MLflow run of `key` (default: run.name) in `tracking.experiment`, created or, when
        an earlier job of the same run left one, resumed; the config is logged as params."""
        if not cfg.tracking.enabled:
            return cls()
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        _quiet_mlflow()
        uri, key = tracking_uri(cfg), key or cfg.run.name
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(cfg.tracking.experiment)
            if experiment is None:
                exp_id = client.create_experiment(
                    cfg.tracking.experiment, artifact_location=artifact_root(uri)
                )
            elif experiment.lifecycle_stage == "deleted":
                raise ConfigError(
                    f"tracking.experiment={cfg.tracking.experiment!r} was deleted in MLflow "
                    f"({redact(uri)}): restore it (mlflow experiments restore) or name another"
                )
            else:
                exp_id = experiment.experiment_id
            quote = '"' if "'" in key else "'"
            found = client.search_runs(
                [exp_id],
                filter_string=f"tags.`{KEY_TAG}` = {quote}{key}{quote} "
                f"and tags.`{KIND_TAG}` = '{kind}'",
                max_results=1,
            )
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                tags = {KEY_TAG: key, KIND_TAG: kind}
                if parent is not None and parent.run_id:
                    tags[PARENT_TAG] = parent.run_id
                run_id = client.create_run(exp_id, run_name=name or key, tags=tags).info.run_id
        except MlflowException as err:
            said = _CREDENTIALS.sub("://***@", str(err.message).replace(uri, redact(uri)))
            raise ConfigError(
                f"tracking.uri={redact(uri)}: MLflow cannot use it ({said}); give a "
                "sqlite:///PATH or http://HOST:PORT URI, or tracking.enabled=false"
            ) from None
        tracker = cls(client, run_id, uri)
        tracker.log_params(flat_params(cfg))
        if announce:
            log(
                f"MLflow run {run_id} ({'resumed' if found else 'new'}) in experiment "
                f"{cfg.tracking.experiment!r} at {redact(uri)}"
            )
        return tracker

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, *_) -> None:
        self.finish("FINISHED" if kind is None else "FAILED")

    def log_params(self, params: dict[str, str]) -> None:
        """New params; on a resumed run a changed value (MLflow keeps params fixed) becomes a
        `resumed_with.<key>` tag."""
        if not self.run_id:
            return
        from mlflow.entities import Param, RunTag

        before = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in before]
        changed = [
            RunTag(f"resumed_with.{k}", v) for k, v in params.items() if before.get(k, v) != v
        ]
        self.client.log_batch(self.run_id, params=new, tags=changed)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id:
            self.client.log_batch(self.run_id, tags=[_tag(k, redact(v)) for k, v in tags.items()])

    def log_metrics(self, points: list[tuple[str, float, int]]) -> int:
        """(name, value, step) points, finite ones, each once: a point already logged with the
        same step and value (by an earlier job of a resumed run) is skipped. Returns how many
        were logged."""
        if not self.run_id:
            return 0
        import time

        from mlflow.entities import Metric

        points = [(k, float(v), s) for k, v, s in points if v is not None and math.isfinite(v)]
        seen = {
            (k, m.step, m.value)
            for k in {k for k, _, _ in points}
            for m in self.client.get_metric_history(self.run_id, k)
        }
        now = int(time.time() * 1000)
        new = [Metric(k, v, now, s) for k, v, s in points if (k, s, v) not in seen]
        self.client.log_batch(self.run_id, metrics=new)
        return len(new)

    def log_training(self, steps: list[dict], history: list[dict]) -> None:
        """A training run's logged steps (train/*) and validations (val/*), at their steps."""
        points = [(k, v, r["step"]) for r in steps for k, v in _step_metrics(r).items()]
        points += [(k, v, h["step"]) for h in history for k, v in _validation_metrics(h).items()]
        self.log_metrics(points)

    def log_best(self, best: dict, step: int | None = None) -> None:
        """The chosen checkpoint's validation metrics as best/* (and its step)."""
        points = [(f"best/{k[len('val/') :]}", v, 0) for k, v in _validation_metrics(best).items()]
        step = step if step is not None else best.get("step")
        self.log_metrics(points + ([("best/step", step, 0)] if step is not None else []))

    def log_report(self, report: str | Path, artifact_path: str | None = None) -> None:
        """A report folder (report.md, its PNGs, metrics.json) as artifacts; its metrics table,
        one row per model, as final metrics <split>/<model>/<metric>."""
        if not self.run_id:
            return
        folder = Path(report)
        folder = folder.parent if folder.is_file() else folder
        self.client.log_artifacts(self.run_id, str(folder), artifact_path or folder.name)
        table = folder / "metrics.json"
        if not table.exists():
            return
        split = folder.name.removeprefix("report_")
        rows = json.loads(table.read_text())
        rows = rows.get("metrics", rows)  # the full-catalog protocol nests its table
        self.log_metrics(
            [
                # (a model's label may hold a path: "zero-shot /models/x")
                (f"{split}/{metric_name(model.replace('/', '_'))}/{metric_name(k)}", v, 0)
                for model, values in rows.items()
                if isinstance(values, dict)
                for k, v in values.items()
                if _number(v)
            ]
        )

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        if self.run_id:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)
