"""Drift between the days a model was trained on and the newest day, for a retraining report.

What changed in the traffic (events by type, click-through, searches, the price of what was
engaged with), in what people engaged with (the share on items the window never saw, the
category mix, item popularity, each compared with the Jensen-Shannon divergence: 0 = the same
distribution, 1 = disjoint) and in how production scores them (quantiles of its scores on the
newest day's groups and on the window's). Counts come from `count_events`, a Ray Data
aggregation (one row per period, item and event), so the log itself never reaches the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from scipy.spatial.distance import jensenshannon

from shoprank.data.contract import POSITIVE_EVENTS
from shoprank.evaluation import report

PERIODS = ("window", "newest")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def count_events(events: ray.data.Dataset, newest: str, first: str) -> pa.Table:
    """(period, item_id, event, search, count): events of the window [first, newest) and of
    the newest day, counted per item and event type (search: the event carries a query).
    Each batch is counted where it is; the driver only adds the counts up."""
    keys = ["period", "item_id", "event", "search"]

    def count(batch: pa.Table) -> pa.Table:
        day = pc.strftime(batch["ts"], format="%Y-%m-%d")
        if "query" in batch.column_names:
            search = pc.is_valid(batch["query"])
        else:
            search = pa.array(np.zeros(batch.num_rows, dtype=bool))
        labelled = pa.table(
            {
                "period": pc.if_else(pc.equal(day, newest), "newest", "window"),
                "item_id": batch["item_id"],
                "event": batch["event"],
                "search": search,
            }
        ).filter(pc.greater_equal(day, first))
        return labelled.group_by(keys).aggregate([([], "count_all")])

    parts = ray.get(events.map_batches(count, batch_format="pyarrow").to_arrow_refs())
    summed = pa.concat_tables(parts).group_by(keys).aggregate([("count_all", "sum")])
    return pa.table({**{k: summed[k] for k in keys}, "count": summed["count_all_sum"]})


def js_divergence(a: dict[str, float], b: dict[str, float]) -> float:
    """Jensen-Shannon divergence (base 2: in [0, 1]) of two count maps over their union."""
    keys = sorted(set(a) | set(b))
    p = np.array([a.get(k, 0.0) for k in keys], dtype=np.float64)
    q = np.array([b.get(k, 0.0) for k in keys], dtype=np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return float("nan")
    return float(jensenshannon(p, q, base=2) ** 2)


@dataclass
class Drift:
    """The report's numbers and where its plots are."""

    numbers: dict
    sections: list[tuple[str, str]]
    images: dict[str, Path]


def _share(counts: dict[str, float]) -> dict[str, float]:
    total = sum(counts.values()) or 1.0
    return {k: v / total for k, v in counts.items()}


def _weighted_median(pairs: list[tuple[float, float]]) -> float:
    if not pairs:
        return float("nan")
    values, weights = np.array(sorted(pairs)).T
    return float(values[np.searchsorted(np.cumsum(weights), weights.sum() / 2)])


def _quantiles(values: np.ndarray) -> list[float]:
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [float("nan")] * len(QUANTILES)
    return [float(v) for v in np.quantile(values, QUANTILES)]


def drift_report(
    counts: pa.Table,
    catalog: pa.Table,
    scores: dict[str, tuple[np.ndarray, np.ndarray]],
    out_dir: str | Path,
    window: tuple[str, str],
    newest: str,
) -> Drift:
    """Sections and plots for the report. `counts` from `count_events`; `scores`: period ->
    (production's scores, labels) of that period's groups (1 = the engaged item)."""
    out_dir = Path(out_dir)
    rows = counts.to_pylist()
    price = dict(zip(catalog["item_id"].to_pylist(), catalog["price"].to_pylist(), strict=True))
    category = dict(
        zip(catalog["item_id"].to_pylist(), catalog["category"].to_pylist(), strict=True)
    )
    by = {p: {"events": {}, "items": {}, "cats": {}, "search": 0.0, "prices": []} for p in PERIODS}
    seen_in_window = {r["item_id"] for r in rows if r["period"] == "window"}
    new_items = {p: {"positives": 0.0, "impressions": 0.0} for p in PERIODS}
    for r in rows:
        b, n = by[r["period"]], float(r["count"])
        b["events"][r["event"]] = b["events"].get(r["event"], 0.0) + n
        if r["event"] not in POSITIVE_EVENTS:
            if r["event"] == "impression" and r["item_id"] not in seen_in_window:
                new_items[r["period"]]["impressions"] += n
            continue
        b["items"][r["item_id"]] = b["items"].get(r["item_id"], 0.0) + n
        top = (category.get(r["item_id"]) or "unknown").split(" > ")[0]
        b["cats"][top] = b["cats"].get(top, 0.0) + n
        b["search"] += n if r["search"] else 0.0
        if price.get(r["item_id"]) is not None:
            b["prices"].append((price[r["item_id"]], n))
        if r["item_id"] not in seen_in_window:
            new_items[r["period"]]["positives"] += n

    def traffic(p: str) -> dict[str, float]:
        ev = by[p]["events"]
        positives = sum(ev.get(e, 0.0) for e in POSITIVE_EVENTS)
        shown = ev.get("impression", 0.0)
        return {
            **{e: ev.get(e, 0.0) for e in ("impression", *POSITIVE_EVENTS)},
            "click_rate": ev.get("click", 0.0) / shown if shown else float("nan"),
            "search_share": by[p]["search"] / positives if positives else float("nan"),
            "median_price": _weighted_median(by[p]["prices"]),
            "new_item_share": new_items[p]["positives"] / positives if positives else float("nan"),
            "new_item_impressions": new_items[p]["impressions"] / shown if shown else float("nan"),
        }

    stats = {p: traffic(p) for p in PERIODS}
    w_items, n_items = by["window"]["items"], by["newest"]["items"]
    top_w = {k for k, _ in sorted(w_items.items(), key=lambda kv: -kv[1])[:50]}
    top_n = {k for k, _ in sorted(n_items.items(), key=lambda kv: -kv[1])[:50]}
    numbers = {
        "window": list(window),
        "newest": newest,
        "traffic": stats,
        "popularity_js": js_divergence(w_items, n_items),
        "category_js": js_divergence(by["window"]["cats"], by["newest"]["cats"]),
        "top50_overlap": len(top_w & top_n) / max(len(top_w | top_n), 1),
        "categories": {p: _share(by[p]["cats"]) for p in PERIODS},
        "score_quantiles": {},
    }
    for p, (s, y) in scores.items():
        s, y = np.asarray(s, np.float64), np.asarray(y)
        numbers["score_quantiles"][p] = {
            "positives": _quantiles(s[y == 1]),
            "negatives": _quantiles(s[y == 0]),
        }

    def fmt(v) -> str:
        if isinstance(v, float):
            return "–" if np.isnan(v) else (f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}")
        return str(v)

    keys = list(stats["window"])
    traffic_md = "| | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys) + "\n"
    for p in PERIODS:
        traffic_md += f"| {p} | " + " | ".join(fmt(stats[p][k]) for k in keys) + " |\n"
    cats = sorted(set(numbers["categories"]["window"]) | set(numbers["categories"]["newest"]))
    shift = {
        c: numbers["categories"]["newest"].get(c, 0.0) - numbers["categories"]["window"].get(c, 0.0)
        for c in cats
    }
    movers = sorted(shift.items(), key=lambda kv: -abs(kv[1]))[:5]
    quant_md = "| period | scores | " + " | ".join(f"q{q:g}" for q in QUANTILES) + " |\n"
    quant_md += "|---|---|" + "---:|" * len(QUANTILES) + "\n"
    for p, parts in numbers["score_quantiles"].items():
        for kind, qs in parts.items():
            quant_md += f"| {p} | {kind} | " + " | ".join(fmt(v) for v in qs) + " |\n"
    sections = [
        (
            "Drift: traffic",
            f"Training window {window[0]} to {window[1]} vs the newest day {newest}. "
            "new_item_share: the share of positives on items with no event in the window "
            "(new_item_impressions: of impressions).\n\n" + traffic_md,
        ),
        (
            "Drift: what was engaged with",
            f"Jensen-Shannon divergence (0 = same, 1 = disjoint) of item popularity "
            f"{fmt(numbers['popularity_js'])}, of the department mix "
            f"{fmt(numbers['category_js'])}; the 50 most engaged-with items overlap "
            f"{fmt(numbers['top50_overlap'])} (Jaccard). Largest department shifts (share of "
            "positives, newest minus window): "
            + (", ".join(f"{c} {v:+.3f}" for c, v in movers) or "none")
            + ".",
        ),
        (
            "Drift: production's scores",
            "Production's logits on each period's groups: the engaged item (positives) and "
            "its candidates (negatives: the window's training negatives, the newest day's "
            "sampled candidates).\n\n" + quant_md,
        ),
    ]
    images = {
        "Department mix (share of positives)": report.bar_chart(
            {p: numbers["categories"][p] for p in PERIODS}, cats, out_dir / "drift_categories.png"
        ),
        "Production's score quantiles": report.curve_plot(
            {
                f"{p} {kind}": (list(QUANTILES), qs)
                for p, parts in numbers["score_quantiles"].items()
                for kind, qs in parts.items()
            },
            "quantile",
            "production logit",
            "production's scores: window vs newest day",
            out_dir / "drift_scores.png",
        ),
    }
    return Drift(numbers, sections, images)
