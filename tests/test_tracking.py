"""MLflow tracking on a real SQLite store: what a run logs, read back with MlflowClient."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from shoprank.config import ConfigError, load_config
from shoprank.tracking import Tracker, flat_params, tracking_uri
from shoprank.train.loop import StepRecord

SECRET_STORAGE = "s3://AKIAEXAMPLE:hunter2@bucket/runs?session_token=tok3n&region=eu"


def step(n: int) -> dict:
    """A step as the loop saves it with its checkpoints."""
    record = StepRecord(step=n, epoch=0, loss=1 / n, lr=1e-3, pairs_per_s=50.0 + n, data_wait=0.1)
    return asdict(record)


def validation(n: int, ndcg: float) -> dict:
    return {"epoch": 0, "step": n, "train_loss": 0.5, "samples_per_s": 40.0, "val_ndcg@10": ndcg}


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_run_logs_config_steps_report_and_export_once(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = [f"run.storage={tmp_path}", "run.name=t", "train.max_steps=6"]
    cfg = load_config(None, args)
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"  # beside the runs

    report = tmp_path / "t" / "report_test"
    report.mkdir(parents=True)
    (report / "report.md").write_text("# report\n![p](training.png)\n")
    (report / "training.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    rows = {"fine-tuned ranker": {"ndcg@10": 0.31, "logloss": float("nan")}, "tfidf": {"auc": 0.7}}
    (report / "metrics.json").write_text(json.dumps(rows))
    export = tmp_path / "t" / "export"
    export.mkdir()
    (export / "shoprank.json").write_text("{}")

    with Tracker.open(cfg, "train") as run:
        run.log_training([step(2), step(4), step(6)], [validation(4, 0.2), validation(6, 0.3)])
        run.log_best(validation(6, 0.3))
        run.log_report(report / "report.md")
        run.log_artifacts(export, "export")
    printed = capsys.readouterr().out
    assert (
        f"MLflow run {run.run_id} (new) in experiment 'shoprank' at {tracking_uri(cfg)}" in printed
    )

    client = MlflowClient(tracking_uri(cfg))
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "t"
    assert (
        logged.data.params["train.max_steps"] == "6" and logged.data.params["train.lr"] == "0.001"
    )
    # Every field of the step record, at its step; validations at theirs.
    assert history(client, run.run_id, "train/loss") == [(2, 0.5), (4, 0.25), (6, 1 / 6)]
    assert [s for s, _ in history(client, run.run_id, "train/data_wait")] == [2, 4, 6]
    assert history(client, run.run_id, "val/ndcg_at_10") == [(4, 0.2), (6, 0.3)]
    final = logged.data.metrics
    assert final["best/ndcg_at_10"] == 0.3 and final["best/step"] == 6
    assert final["test/fine-tuned ranker/ndcg_at_10"] == 0.31 and final["test/tfidf/auc"] == 0.7
    assert "test/fine-tuned ranker/logloss" not in final  # NaN: not a number to plot
    files = {
        a.path
        for folder in ("report_test", "export")
        for a in client.list_artifacts(run.run_id, folder)
    }
    assert files == {
        "report_test/report.md",
        "report_test/training.png",
        "report_test/metrics.json",
        "export/shoprank.json",
    }
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the store, not in the cwd

    # The same run name resumed (a longer run): the same MLflow run, each point once, the
    # changed value a tag (MLflow params are fixed); a failure marks it FAILED.
    longer = load_config(None, [*args[:2], "train.max_steps=8"])
    with pytest.raises(RuntimeError), Tracker.open(longer, "train") as again:
        again.log_training([step(2), step(4), step(6), step(8)], [validation(8, 0.4)])
        valid = tmp_path / "t" / "report_valid"  # the full-catalog protocol nests its table
        valid.mkdir()
        nested = {"metrics": {"fine-tuned retriever": {"recall@10": 0.5}}, "timings_s": {}}
        (valid / "metrics.json").write_text(json.dumps(nested))
        again.log_report(valid)
        raise RuntimeError("evaluation failed")
    assert again.run_id == run.run_id
    assert "(resumed)" in capsys.readouterr().out
    assert [s for s, _ in history(client, run.run_id, "train/loss")] == [2, 4, 6, 8]
    assert [s for s, _ in history(client, run.run_id, "val/ndcg_at_10")] == [4, 6, 8]
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FAILED"
    assert logged.data.params["train.max_steps"] == "6"
    assert logged.data.tags["resumed_with.train.max_steps"] == "8"
    assert logged.data.metrics["valid/fine-tuned retriever/recall_at_10"] == 0.5


def test_secrets_never_reach_params_or_errors(tmp_path, capsys):
    cfg = load_config(
        None, [f"run.storage={SECRET_STORAGE}", "registry.root=gs://u:p4ss@b/registry"]
    )
    params = flat_params(cfg)
    assert params["run.storage"] == "s3://***@bucket/runs?session_token=***&region=eu"
    assert params["registry.root"] == "gs://***@b/registry"
    assert not any(s in v for v in params.values() for s in ("hunter2", "tok3n", "p4ss"))

    off = load_config(None, [f"run.storage={tmp_path}", "tracking.enabled=false"])
    with Tracker.open(off, "train") as run:
        run.log_training([step(2)], [])  # does nothing
    assert run.run_id is None and not list(tmp_path.iterdir())

    bad = load_config(None, ["tracking.uri=nonsense://user:hunter2@host/x"])
    with pytest.raises(ConfigError, match=r"tracking.uri=nonsense://\*\*\*@host/x") as err:
        Tracker.open(bad, "train")
    assert "hunter2" not in str(err.value) and "tracking.enabled=false" in str(err.value)
    assert "hunter2" not in capsys.readouterr().out
