"""The loop benchmark's bookkeeping (lib/shoprank/loop/simulate.py): per-day metrics, the
paired margin and the report, on hand-made visits."""

from __future__ import annotations

import json

import pytest

from shoprank.loop.simulate import Visit, day_metrics, paired_margin, write_results


def _visit(arm: str, day: int, user: int, clicks: int, ndcg: float, new: int = 0) -> Visit:
    shown = [f"P{i}" for i in range(10)]
    return Visit(arm, day, user, "recommend", shown, clicks, 0, 0, ndcg, {"ranker": 1}, 0, new)


def test_day_metrics_margin_and_report(tmp_path):
    looped = [_visit("looped", d, u, 2, 0.5, new=3) for d in (7, 8) for u in range(4)]
    frozen = [_visit("frozen", d, u, 1 + u % 2, 0.4 + 0.01 * u) for d in (7, 8) for u in range(4)]
    search = Visit("looped", 8, 9, "search", ["P1"], 1, 0, 0, 1.0, {}, 0)
    m = day_metrics([*looped[:4], search])
    assert m["visits"] == 4 and m["ctr@10"] == pytest.approx(0.2)
    assert m["ndcg@10"] == pytest.approx(0.5) and m["new_shown"] == pytest.approx(0.3)
    assert day_metrics([search], "search")["ctr@10"] == pytest.approx(1.0)

    margin = paired_margin(looped, frozen, "ctr@10")  # 0.2 - (0.1 or 0.2), same visits
    assert margin["pairs"] == 8 and margin["mean"] == pytest.approx(0.05)
    assert margin["low"] < 0.05 < margin["high"]
    assert paired_margin(looped, frozen, "ndcg@10")["mean"] == pytest.approx(0.085)

    days = [
        {
            "day": j,
            "date": f"2024-03-0{7 + j}",
            **{
                arm: {"recommend": day_metrics([v for v in vs if v.day == 6 + j]), "ranker": [1]}
                for arm, vs in (("looped", looped), ("frozen", frozen))
            },
        }
        for j in (1, 2)
    ]
    nights = [{"line": "promoted loop-ranker v2 to production: because"}]
    text = write_results(tmp_path, days, nights, {"looped": looped, "frozen": frozen}, [(2, 2)], {})
    assert "| 1 | 2024-03-08 | v1 | 0.2000 | 0.1500 | 0.5000 | 0.4150 | 30.0% / 0.0% |" in text
    assert "on the last day CTR@10 +0.0500" in text
    assert json.loads((tmp_path / "bench.json").read_text())["promotions"] == [[2, 2]]
    assert (tmp_path / "loop.png").read_bytes()[:4] == b"\x89PNG"
