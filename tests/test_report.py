"""Report: a Markdown file with embedded, valid PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shoprank.evaluation.report import (
    bar_chart,
    curve_plot,
    metrics_table,
    score_histogram,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = {
    "popularity": {"recall@10": 0.0309, "ndcg@10": 0.0171},
    "tf-idf": {"recall@10": 0.1103, "ndcg@10": 0.05194},
    "fine-tuned": {"recall@10": 0.13, "ndcg@10": float("nan")},
}


def test_metrics_table_format() -> None:
    table = metrics_table(ROWS)
    lines = table.strip().splitlines()
    assert lines[0] == "| model | recall@10 | ndcg@10 |"
    assert lines[3] == "| tf-idf | 0.1103 | 0.0519 |"
    assert lines[4] == "| fine-tuned | 0.1300 | – |"
    assert metrics_table(ROWS, columns=["ndcg@10"]).splitlines()[2] == "| popularity | 0.0171 |"


def test_write_report_with_plots(tmp_path: Path) -> None:
    out = tmp_path / "run"
    bars = bar_chart(ROWS, ["recall@10", "ndcg@10"], out / "plots/metrics.png")
    curve = curve_plot(
        {"train loss": ([0, 10, 20], [0.7, 0.5, 0.4]), "val ndcg@10": ([0, 20], [0.05, 0.09])},
        "step",
        "value",
        "training",
        out / "plots/curve.png",
    )
    rng = np.random.default_rng(0)
    hist = score_histogram(rng.normal(1, 1, 100), rng.normal(-1, 1, 300), out / "hist.png", "s")
    report = write_report(
        out,
        "Evaluation",
        [("Test split", metrics_table(ROWS))],
        {"Metrics": bars, "Training": curve, "Scores": hist},
    )
    assert report == out / "report.md"
    text = report.read_text()
    assert "# Evaluation" in text and "| tf-idf | 0.1103 |" in text
    for png, link in [(bars, "plots/metrics.png"), (curve, "plots/curve.png"), (hist, "hist.png")]:
        assert png.exists() and png.read_bytes()[:8] == PNG_MAGIC
        assert f"]({link})" in text
        assert (out / link).resolve() == png.resolve()
