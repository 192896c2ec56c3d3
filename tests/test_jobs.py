"""The train and evaluate jobs end to end, as a user runs them (tiny model, tiny shop)."""

from __future__ import annotations

import json
import re
import runpy
import sys
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import shop_overrides

pytestmark = pytest.mark.slow

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def run_job(name: str, args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(JOBS / name), run_name="__main__")


def test_train_then_evaluate(ray_local, tmp_path, tiny_shop, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # tracking's default store, below
    args = [
        *shop_overrides(tiny_shop),
        f"run.storage={tmp_path}",
        f"registry.root={tmp_path / 'registry'}",
        "run.name=job",
        f"model.name={tiny_model_dir}",
        "model.max_length=64",
        "train.max_steps=6",
        "train.log_every_steps=2",
        "train.batch_size=4",
        "train.lr=1e-3",
        "data.val_users=8",
        "data.test_users=12",
        "data.eval_candidates=10",
        "data.max_train_positives=200",
        "data.max_bad_fraction=0.5",
    ]
    run_job("train.py", args, monkeypatch)
    printed = capsys.readouterr().out
    out = tmp_path / "job"

    # The resolved config was printed and saved.
    assert "resolved config" in printed
    assert (out / "config.yaml").read_text().count("name: job") == 1
    # The closing table names every model, and the paths of the report and the export.
    for row in ("zero-shot", "fine-tuned ranker", "popularity", "tfidf"):
        assert row in printed
    assert f"exported model: {out / 'export'}" in printed
    # ... registered as the candidate and, with no production before, promoted.
    from shoprank.registry import Registry

    registry = Registry(str(tmp_path / "registry"))
    assert registry.aliases("job") == {"candidate": 1, "production": 1}
    assert "registered job v1" in printed and "production ->" in printed

    metrics = json.loads((out / "report_test" / "metrics.json").read_text())
    assert set(metrics) >= {"fine-tuned ranker", "popularity", "tfidf"}
    assert 0.0 <= metrics["fine-tuned ranker"]["auc"] <= 1.0
    report = (out / "report_test" / "report.md").read_text()
    # Where training's wall time went, in the summary and the report.
    assert re.search(r"training \d+ s: steps \d+ s at [\d.]+ pairs/s \(waiting for data", printed)
    assert "## Training time" in report and "checkpointing" in report
    for png in ("metrics.png", "scores.png", "training.png"):
        assert f"({png})" in report
        assert (out / "report_test" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The export is a plain Hugging Face folder with its provenance.
    meta = json.loads((out / "export" / "shoprank.json").read_text())
    assert meta["code"]["shoprank"] and meta["data"] and meta["history"]
    assert meta["data_quality"]["events"]["bad"] > 0
    # Planted bad rows were quarantined with their reasons, not dropped silently.
    bad = pq.read_table(out / "quarantine" / "events")
    assert bad.num_rows == meta["data_quality"]["events"]["bad"]
    assert set(bad["reason"].to_pylist()) == set(meta["data_quality"]["events"]["reasons"])

    # The MLflow run, in the store beside the runs: the config as params, every step record
    # (those the export keeps) at its step, each validation at its step, the report's metrics,
    # the report and the export as artifacts.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("shoprank").experiment_id])
    run_id = tracked.info.run_id
    assert f"MLflow run {run_id} (new)" in printed
    assert tracked.info.status == "FINISHED" and tracked.data.params["run.name"] == "job"
    assert tracked.data.params["train.lr"] == "0.001"

    def logged(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    assert [s["step"] for s in meta["steps"]] == [2, 4, 6]
    assert logged("train/loss") == [(s["step"], pytest.approx(s["loss"])) for s in meta["steps"]]
    assert [s for s, _ in logged("train/pairs_per_s")] == [2, 4, 6]
    assert [s for s, _ in logged("val/auc")] == [h["step"] for h in meta["history"]]
    ranker = metrics["fine-tuned ranker"]
    assert tracked.data.metrics["test/fine-tuned ranker/auc"] == pytest.approx(ranker["auc"])
    files = {a.path for d in ("report_test", "export") for a in client.list_artifacts(run_id, d)}
    assert {"report_test/report.md", "report_test/training.png", "export/shoprank.json"} <= files

    run_job("evaluate.py", [*args, "eval.split=valid"], monkeypatch)
    assert "fine-tuned ranker" in capsys.readouterr().out
    valid = json.loads((out / "report_valid" / "metrics.json").read_text())
    assert valid["fine-tuned ranker"]["auc"] >= 0.0


def search_args(tmp_path, shop, model_dir, name: str) -> list[str]:
    """A search run (data.task=search) of the tiny model, a few steps."""
    return [
        *shop_overrides(shop),
        f"run.storage={tmp_path}",
        f"registry.root={tmp_path / 'registry'}",
        f"run.name={name}",
        "data.task=search",
        f"model.name={model_dir}",
        "model.max_length=48",
        "train.max_steps=4",
        "data.val_users=8",
        "data.max_train_positives=100",
        "data.max_bad_fraction=0.5",
    ]


def test_search_ranker_is_evaluated_on_judgments(
    ray_local, tmp_path, tiny_shop, tiny_model_dir, monkeypatch, capsys
):
    args = search_args(tmp_path, tiny_shop, tiny_model_dir, "search")
    args += ["train.batch_size=4", "data.eval_candidates=10"]
    run_job("train.py", args, monkeypatch)
    printed = capsys.readouterr().out
    table = json.loads((tmp_path / "search" / "report_search" / "metrics.json").read_text())
    assert set(table) == {"popularity", "tfidf", f"zero-shot {tiny_model_dir}", "fine-tuned ranker"}
    judged = pq.read_table(tiny_shop / "judgments.parquet")
    positive_queries = len(set(judged.filter(pc.greater(judged["label"], 0))["query_id"]))
    for row in table.values():
        assert 0 < row["ndcg@10"] <= 1 and row["queries"] == positive_queries
    # Query text matches item text in the synthetic shop: TF-IDF must beat popularity.
    assert table["tfidf"]["ndcg@10"] > table["popularity"]["ndcg@10"]
    assert "fine-tuned ranker" in printed


def test_search_retriever_is_evaluated_on_judgments(
    ray_local, tmp_path, tiny_shop, tiny_model_dir, monkeypatch, capsys
):
    args = search_args(tmp_path, tiny_shop, tiny_model_dir, "search-retriever") + [
        "model.kind=retriever",
        "retriever.context_max_length=32",
        "data.negatives=0",  # in-batch negatives only
        "data.eval_candidates=1",
        "train.batch_size=8",
        "train.num_workers=1",
    ]
    run_job("train.py", args, monkeypatch)
    out = tmp_path / "search-retriever"
    table = json.loads((out / "report_search" / "metrics.json").read_text())
    expected = {"popularity", "tfidf", f"zero-shot {tiny_model_dir}", "fine-tuned retriever"}
    assert set(table) == expected
    assert all(0 < row["ndcg@10"] <= 1 for row in table.values())
    assert json.loads((out / "export" / "shoprank.json").read_text())["kind"] == "retriever"
    assert not (out / "export" / "blend.json").exists()  # the blend is for recommendation
    assert "fine-tuned retriever" in capsys.readouterr().out

    # The whole-catalog protocol needs judgments that pin each query's split: without one it
    # says so; with one, every valid query ranks the whole catalog.
    whole = [*args, "eval.protocol=full_catalog", "eval.split=valid"]
    with pytest.raises(ValueError, match="needs judgments with a `split` column"):
        run_job("evaluate.py", whole, monkeypatch)
    judgments = pq.read_table(tiny_shop / "judgments.parquet")
    queries = judgments["query_id"].to_pylist()
    split = ["valid" if zlib.crc32(q.encode()) % 2 else "test" for q in queries]
    pq.write_table(judgments.append_column("split", pa.array(split)), tmp_path / "split.parquet")
    run_job("evaluate.py", [*whole, f"data.judgments={tmp_path / 'split.parquet'}"], monkeypatch)
    printed = capsys.readouterr().out
    got = json.loads((out / "report_search_catalog" / "metrics.json").read_text())
    systems = {"bm25", "zero-shot", "fine-tuned", "bm25 + zero-shot", "bm25 + fine-tuned"}
    assert got["split"] == "valid" and set(got["metrics"]) == systems
    valid = {q for q, s in zip(queries, split, strict=True) if s == "valid"}
    labels = judgments["label"].to_pylist()
    counted = {q for q, s, g in zip(queries, split, labels, strict=True) if s == "valid" and g > 0}
    for row in got["metrics"].values():
        assert row["queries"] == len(counted) <= len(valid)
        assert 0 <= row["ndcg@10"] <= 1 and 0 <= row["recall@100"] <= 1
    assert "bm25 + fine-tuned - bm25 + zero-shot" in got["paired_95"]
    md = (out / "report_search_catalog" / "report.md").read_text()
    assert "(metrics.png)" in md and "Recall@100" in md
    assert "bm25 + fine-tuned - bm25 + zero-shot:" in printed
