"""A simulated shop on a live endpoint: does the loop pay off?

The synthetic shop's shoppers (data/synthetic.py: `Shoppers`, the model that generated its
history) visit a running Serve app day after day. Each visitor gets `/recommend` (or, for a
search visit, `/search` with a query built from what they look for), reacts with the shared
choice model (position bias included), and their clicks, carts and purchases go back through
`POST /feedback`. Every arm sees the same visitors with the same random numbers (a paired
comparison): `looped` follows `production`, which retraining moves each night; `frozen`
follows the `day0` alias, which nothing moves. Each arm is a world of its own: its own events
(the seed history plus what it served), feature store and served-events log, so its shoppers'
histories are made of what that arm showed them.

The metrics come from the simulator, which knows each session's hidden tastes: CTR@10 (clicks
per item shown) and NDCG@10 with each item's gain its click probability at the top position
for that session, the ideal being the session's best k items in the whole catalog.

Clock: the app stamps its rows with the wall clock; when a simulated day is over, its rows are
moved from the app's `impressions_dir` into that day's `dt=` partition of the arm's events,
their times shifted by one offset (their order kept): `Arm.close_day`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shoprank.data.contract import OUTCOMES_DIR, OUTCOMES_SCHEMA
from shoprank.data.outcomes import join_outcomes
from shoprank.data.synthetic import DAY_S, Shoppers

BASE = datetime(2024, 3, 1)  # the synthetic shop's first day (its day 0)
FEEDBACK = ("click", "add_to_cart", "purchase")


@dataclass
class Arm:
    """One world: an app (its base URL), its events root (`shop/` seed days, `served/` the
    days it served) and the folder its app logs to (`impressions_dir`)."""

    name: str
    url: str
    root: Path
    spool: Path
    replicas: int = 1  # the app's model replicas (each logs and refreshes on its own)
    closed_at: float = 0.0  # when the last day's rows were moved into place
    feedback: dict = field(default_factory=dict)  # the outcomes' join counts, all days

    @property
    def served(self) -> Path:
        return self.root / "served"

    def version(self, key: str) -> dict:
        r = httpx.get(f"{self.url}/version", headers={"x-api-key": key}, timeout=60)
        r.raise_for_status()
        return r.json()

    def close_day(self, key: str, day: int, rows: int, timeout: float = 120) -> int:
        """Wait until the app has written the day's `rows` (impressions and outcomes), join the
        outcomes to their answers (`data/outcomes.py`, as a retraining does), then move both
        into the day's partition, times shifted to the simulated day (order kept). Returns the
        rows moved; the join's counts are kept in `self.feedback`."""
        deadline = time.time() + timeout

        def on_disk() -> list[Path]:
            return sorted(self.spool.rglob("part-*.parquet"))

        # Counted on disk, not from /version: each replica counts only its own rows.
        while sum(pq.read_metadata(p).num_rows for p in on_disk()) < rows:
            if time.time() > deadline:
                raise TimeoutError(f"{self.name}: the app did not write {rows} rows in {timeout} s")
            time.sleep(0.25)
        files = on_disk()
        outcome_files = [p for p in files if OUTCOMES_DIR in p.parts]
        shown = [pq.read_table(p, partitioning=None) for p in files if p not in outcome_files]
        if not shown:
            return 0
        impressions = pa.concat_tables(shown)
        outcomes = [pq.read_table(p, partitioning=None) for p in outcome_files]
        joined, counts = join_outcomes(
            impressions,
            pa.concat_tables(outcomes) if outcomes else OUTCOMES_SCHEMA.empty_table(),
            late_after_s=DAY_S,
        )
        for k, v in counts.items():
            self.feedback[k] = self.feedback.get(k, 0) + v
        table = pa.concat_tables([impressions, joined.cast(impressions.schema)])
        first = pc.min(table["ts"]).as_py()
        start = BASE + timedelta(days=day, hours=9)  # the simulated day's traffic
        shift = pa.scalar(start - first, pa.duration("us"))
        table = table.set_column(
            table.schema.get_field_index("ts"), "ts", pc.add(table["ts"], shift)
        )
        folder = self.served / f"dt={(BASE + timedelta(days=day)).date().isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}"
        pq.write_table(table, folder / f".{name}.tmp")  # readers skip dot-files
        (folder / f".{name}.tmp").rename(folder / f"{name}.parquet")
        for p in files:
            p.unlink()
        self.closed_at = time.time()
        return table.num_rows

    def wait_for(self, key: str, what: str, check, timeout: float = 120) -> dict:
        """Poll /version until `check(version)` holds (a swapped model, a refreshed store) on
        every one of the app's `replicas` (told apart by /version's `replica`)."""
        deadline = time.time() + timeout
        done: dict[str, dict] = {}
        while True:
            got = self.version(key)
            if check(got):
                done[got.get("replica", "")] = got
                if len(done) >= self.replicas:
                    return got
            if time.time() > deadline:
                raise TimeoutError(f"{self.name}: {what} did not happen in {timeout} s")
            time.sleep(0.1 if done else 0.5)


@dataclass
class Visit:
    """One request and what came of it."""

    arm: str
    day: int
    user: int
    kind: str  # "recommend" or "search"
    shown: list[str]
    clicks: int
    carts: int
    purchases: int
    ndcg: float
    versions: dict
    logged: int  # feedback rows the app logged
    new_shown: int = 0  # items shown that arrived during the simulation (the new line)
    explored: bool = False  # the app showed this answer in a random order


@dataclass
class SimulatedShop:
    """The shoppers, the catalog the app serves, and how often they come."""

    shoppers: Shoppers
    key: str
    seed: int = 0
    visit_rate: float = 0.5  # visits per shopper per day, times the shopper's activity
    search_share: float = 0.2
    k: int = 10
    concurrency: int = 8

    def __post_init__(self) -> None:
        self.ids = list(self.shoppers.items["id"])
        self.row = {item: i for i, item in enumerate(self.ids)}
        self.all_items = np.arange(len(self.ids))
        # Each shopper's previous visit's focus, per arm: the next visit may shop for its
        # complements (Shoppers.follow); the draws are the same whatever the arm showed.
        self.last_focus: dict[tuple[str, int], int] = {}

    def visitors(self, day: int) -> np.ndarray:
        """The shoppers who come on `day` (the same ones whatever the arm)."""
        rng = np.random.default_rng([self.seed, day, 0])
        p = np.minimum(1.0, self.visit_rate * self.shoppers.activity)
        return np.flatnonzero(rng.random(self.shoppers.n_users) < p)

    def ndcg(self, session, shown: np.ndarray) -> float:
        """DCG of the shown list over the best k of the catalog, gains = click probability."""
        best = np.sort(self.shoppers.relevance(session, self.all_items))[::-1][: self.k]
        gains = self.shoppers.relevance(session, shown)[: self.k]
        discount = 1.0 / np.log2(np.arange(self.k) + 2.0)
        ideal = float((best * discount[: len(best)]).sum())
        return float((gains * discount[: len(gains)]).sum() / ideal) if ideal > 0 else 0.0

    async def visit(self, http: httpx.AsyncClient, arm: Arm, day: int, user: int) -> Visit:
        rng = np.random.default_rng([self.seed, day, 1, user])  # the same draws in every arm
        t = day * DAY_S + rng.uniform(8.0, 22.0) * 3600.0
        search = bool(rng.random() < self.search_share)
        after = self.last_focus.get((arm.name, user))
        session = self.shoppers.start_session(rng, user, t, search=search, after=after)
        self.last_focus[(arm.name, user)] = session.focus
        headers = {"x-api-key": self.key}
        uid = f"U{user:05d}"
        if search:
            body = {"query": self.shoppers.query_text(session), "user_id": uid, "k": self.k}
            r = await http.post(f"{arm.url}/search", json=body, headers=headers)
        else:
            r = await http.post(
                f"{arm.url}/recommend", json={"user_id": uid, "k": self.k}, headers=headers
            )
        r.raise_for_status()
        answer = r.json()
        shown_ids = [i["item_id"] for i in answer["items"]]
        shown = np.array([self.row[i] for i in shown_ids], dtype=np.int64)
        outcome = self.shoppers.react(session, shown, rng)
        logged = 0
        for event, done in zip(FEEDBACK, outcome, strict=True):
            for item in np.asarray(shown_ids)[done]:
                body = {"request_id": answer["request_id"], "item_id": str(item), "event": event}
                f = await http.post(f"{arm.url}/feedback", json=body, headers=headers)
                f.raise_for_status()
                logged += bool(f.json()["logged"])
        return Visit(
            arm.name,
            day,
            user,
            "search" if search else "recommend",
            shown_ids,
            int(outcome[0].sum()),
            int(outcome[1].sum()),
            int(outcome[2].sum()),
            self.ndcg(session, shown),
            answer["version"],
            logged,
            int((self.shoppers.arrival[shown] > 0).sum())
            if self.shoppers.arrival is not None
            else 0,
            bool(answer.get("explored")),
        )

    async def _day(self, arm: Arm, day: int) -> list[Visit]:
        limits = httpx.Limits(max_connections=self.concurrency)
        gate = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:

            async def one(user: int) -> Visit:
                async with gate:
                    return await self.visit(http, arm, day, int(user))

            return list(await asyncio.gather(*(one(u) for u in self.visitors(day))))

    def run_day(self, arm: Arm, day: int) -> list[Visit]:
        """Every visitor of `day` through `arm`'s app (once its feature store has read the day
        before), then the day's rows moved into place."""
        arm.wait_for(
            self.key,
            "a feature store refresh",
            lambda v: (
                v["features"]["loaded_at"] > arm.closed_at and not v["features"]["refresh_error"]
            ),
        )
        visits = asyncio.run(self._day(arm, day))
        arm.close_day(self.key, day, sum(len(v.shown) + v.logged for v in visits))
        return visits


def day_metrics(visits: list[Visit], kind: str = "recommend") -> dict:
    """CTR@10 (clicks per item shown), NDCG@10, purchases per visit, the share of shown items
    that are new arrivals and the share of visits explored, over one kind of visit."""
    chosen = [v for v in visits if v.kind == kind]
    shown = sum(len(v.shown) for v in chosen)
    return {
        "visits": len(chosen),
        "ctr@10": sum(v.clicks for v in chosen) / shown if shown else float("nan"),
        "new_shown": sum(v.new_shown for v in chosen) / shown if shown else float("nan"),
        "ndcg@10": float(np.mean([v.ndcg for v in chosen])) if chosen else float("nan"),
        "purchases_per_visit": sum(v.purchases for v in chosen) / max(len(chosen), 1),
        "explored": sum(v.explored for v in chosen) / max(len(chosen), 1),
    }


def paired_margin(looped: list[Visit], frozen: list[Visit], what: str) -> dict:
    """Looped minus frozen over the same visits (same user, same day): the mean difference
    and its 95% interval (normal approximation over visits)."""
    other = {(v.day, v.user): v for v in frozen if v.kind == "recommend"}
    pairs = [(v, other[(v.day, v.user)]) for v in looped if (v.day, v.user) in other]

    def value(v: Visit) -> float:
        return v.ndcg if what == "ndcg@10" else v.clicks / max(len(v.shown), 1)

    d = np.array([value(a) - value(b) for a, b in pairs])
    if len(d) < 2:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "pairs": len(d)}
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    return {
        "mean": float(d.mean()),
        "low": float(d.mean() - half),
        "high": float(d.mean() + half),
        "pairs": len(d),
    }


def loop_plot(
    days: list[int],
    series: dict[str, dict[str, list[float]]],
    promotions: list[tuple[int, int]],
    path: str | Path,
) -> Path:
    """CTR@10 and NDCG@10 by day, one line per arm; a dashed line before each day served by a
    newly promoted version (labelled with it)."""
    fig = Figure(figsize=(10.0, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("ctr@10", "ndcg@10"), strict=True):
        for arm, values in series.items():
            ax.plot(days, values[metric], marker="o", markersize=4, label=arm)
        for day, version in promotions:
            ax.axvline(day - 0.5, color="gray", linestyle="--", linewidth=0.8)
            ax.annotate(
                f"v{version}",
                (day - 0.5, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                ha="center",
                va="bottom",
            )
        ax.set_xlabel("simulated day")
        ax.set_ylabel(metric.upper())
        ax.set_xticks(days)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("looped (retrained nightly) vs frozen at day 0; dashed: a promotion serves")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


# -- setting the shop up ---------------------------------------------------------------------


def seed_shop(
    out: Path,
    n_items: int,
    n_users: int,
    seed_days: int,
    sim_days: int,
    seed: int,
    new_items: int,
    trend: tuple[float, float],
) -> tuple[Shoppers, Path, Path]:
    """The shop before the simulation: its history for `seed_days` days (generate_shop, its
    later days removed: the simulation lives them), its shoppers drawn for the whole period
    (their drift falls within it), and a new brand's line arriving on the first simulated day
    with a trend for it. Returns (shoppers, served catalog, seed events folder)."""
    import shutil

    from shoprank.data.synthetic import add_line, catalog_table, generate_shop, shop_model

    days = seed_days + sim_days
    generate_shop(out / "shop", n_items, n_users, days, seed, bad_fraction=0.0)
    events = out / "shop" / "events"
    last = (BASE + timedelta(days=seed_days - 1)).date().isoformat()
    for part in events.glob("dt=*"):
        if part.name.removeprefix("dt=") > last:
            shutil.rmtree(part)
    shoppers = shop_model(n_items, n_users, days, seed)
    if new_items:
        shoppers = add_line(shoppers, "Novaline", new_items, seed_days, trend, seed=seed)
    catalog = out / "catalog.parquet"
    pq.write_table(catalog_table(shoppers), catalog)
    return shoppers, catalog, events


def zero_shot_retriever(folder: Path, cfg, catalog: pa.Table, base: str = "minilm") -> Path:
    """The pretrained encoder as a retriever export (as jobs/train.py leaves one: weights,
    tokenizer, shoprank.json) with its index over the catalog: stage one, never retrained."""
    import json

    from transformers import AutoModel

    from shoprank.data.text import render_items
    from shoprank.models.encoder import load_tokenizer, resolve_model_path
    from shoprank.models.export_meta import METADATA
    from shoprank.models.retriever import EncoderSpec
    from shoprank.retrieval.index import INDEX_DIR, ItemIndex

    folder.mkdir(parents=True, exist_ok=True)
    AutoModel.from_pretrained(resolve_model_path(base)).save_pretrained(folder)
    load_tokenizer(base).save_pretrained(folder)
    meta = {
        "kind": "retriever",
        "base_model": base,
        "max_length": cfg.model.max_length,
        "pooling": "mean",
        "context_max_length": cfg.retriever.context_max_length,
        "item_max_length": cfg.model.max_length,
        "config": cfg.model_dump(mode="json"),
        "metrics": {},
    }
    (folder / METADATA).write_text(json.dumps(meta, indent=2))
    encoder = EncoderSpec.from_export(str(folder)).load(bf16=cfg.train.bf16)
    emb = encoder.embed(render_items(catalog, cfg.data.item_template), "item")
    ItemIndex.build(catalog["item_id"].to_pylist(), emb, {"kind": "flat"}, {}).save(
        folder / INDEX_DIR
    )
    return folder


def small_encoder(folder: Path, layers: int, base: str = "minilm") -> Path:
    """The bundled MiniLM cut to its first `layers` layers (its embeddings and lower layers
    pretrained): a ranker base that trains and scores several times faster."""
    from transformers import AutoModel

    from shoprank.models.encoder import load_tokenizer, resolve_model_path

    model = AutoModel.from_pretrained(resolve_model_path(base))
    model.encoder.layer = model.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(folder)
    load_tokenizer(base).save_pretrained(folder)
    return folder


# -- the benchmark's report ------------------------------------------------------------------


def write_results(
    out: Path,
    days: list[dict],
    nights: list[dict],
    visits: dict[str, list[Visit]],
    promotions: list[tuple[int, int]],
    extra: dict,
) -> str:
    """bench.json, bench.md (the table by day, the paired margin) and loop.png; returns the
    Markdown. `days`: one row per simulated day ({"day", "date", arm: {"recommend": metrics,
    "ranker": versions served}}); `nights`: what each retraining did after its day."""
    ks = ("ctr@10", "ndcg@10")
    arms = list(visits)
    series = {a: {m: [d[a]["recommend"][m] for d in days] for m in ks} for a in arms}
    plot = loop_plot([d["day"] for d in days], series, promotions, out / "loop.png")
    last = max(v.day for v in visits[arms[0]])
    half = last - len(days) // 2  # the later half of the days (the shop's day index)

    def margin(pick) -> dict:
        a, b = ([v for v in visits[arm] if pick(v.day)] for arm in ("looped", "frozen"))
        return {m: paired_margin(a, b, m) for m in ks}

    margins = {"last_day": margin(lambda d: d == last), "second_half": margin(lambda d: d > half)}
    (out / "bench.json").write_text(
        json.dumps(
            {**extra, "days": days, "nights": nights, "promotions": promotions, "margins": margins},
            indent=2,
            default=str,
        )
    )
    lines = [
        "| day | date | looped ranker | CTR@10 looped | CTR@10 frozen | NDCG@10 looped "
        "| NDCG@10 frozen | new items shown, looped / frozen | retraining that night |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for i, d in enumerate(days):
        night = nights[i]["line"] if i < len(nights) else "–"
        a, b = d["looped"]["recommend"], d["frozen"]["recommend"]
        served = ", ".join(f"v{x}" for x in d["looped"]["ranker"])
        lines.append(
            f"| {d['day']} | {d['date']} | {served} | {a['ctr@10']:.4f} | {b['ctr@10']:.4f} "
            f"| {a['ndcg@10']:.4f} | {b['ndcg@10']:.4f} "
            f"| {a['new_shown']:.1%} / {b['new_shown']:.1%} | {night} |"
        )

    def fmt(m: dict) -> str:
        return f"{m['mean']:+.4f} (95% CI {m['low']:+.4f} to {m['high']:+.4f}, {m['pairs']} visits)"

    first_late = days[-(len(days) // 2)]["day"] if len(days) > 1 else days[-1]["day"]
    lines += [
        "",
        "Margin, looped minus frozen, over the same visits (paired): on the last day CTR@10 "
        f"{fmt(margins['last_day']['ctr@10'])}, NDCG@10 {fmt(margins['last_day']['ndcg@10'])}; "
        f"from day {first_late} on, CTR@10 {fmt(margins['second_half']['ctr@10'])}, NDCG@10 "
        f"{fmt(margins['second_half']['ndcg@10'])}.",
        "",
        f"Plot: {plot.name}. Wall time {extra.get('wall_s', float('nan')) / 60:.1f} min.",
    ]
    if extra.get("feedback"):
        joined = "; ".join(
            f"{arm}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
            for arm, counts in extra["feedback"].items()
        )
        lines += [
            "",
            f"Model replicas an app: {extra.get('replicas', 1)}. Feedback the apps logged: "
            f"{extra.get('feedback_logged')}; joined to its answers (all days): {joined}.",
        ]
    text = "\n".join(lines) + "\n"
    (out / "bench.md").write_text(text)
    return text
