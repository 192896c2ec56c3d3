"""Benchmark: does the continuous-learning loop pay off? The synthetic shop's shoppers visit
the live Serve app for N simulated days; each night jobs/retrain.py's retraining runs and may
promote; the same app with the ranker frozen at day 0 serves the same visitors beside it.

    python bench/bench_loop.py [--days 5] [--out runs/bench-loop] [section.key=value ...]

The shop: generate_shop's history for --seed-days days (its shoppers drawn for the whole period, so
their tastes drift during the simulation) and a new brand's line arriving on the first simulated
day, which shoppers take to day by day (data/synthetic.py: add_line). Stage one: the bundled MiniLM
as a zero-shot retriever (never retrained); stage two: a ranker on MiniLM's first --layers layers,
trained on the seed days (the day-0 model), reranking stage one's top --retrieve-top (rules: out of
stock and already bought filtered). Two Serve applications in one Ray: `/looped` follows
`production`, `/frozen` the `day0` alias. Each simulated day every visitor goes to both (paired:
same visitor, same random numbers; lib/shoprank/loop/simulate.py), then the retraining runs on the
looped arm's events (the seed days and what it served). Both apps show a share of answers
(--explore) as k items drawn at random from the ranked head (--explore-top), in a random order, and
the nightly gate judges candidate and production on those answers' clicks only
(data.explored_only): on the others the shoppers' position bias favours whichever model ordered the
list.
Overrides (`section.key=value`) apply to the retraining config (configs/retrain-synthetic.yaml).
Writes bench.json, bench.md and loop.png to --out; each night's report under --out/runs/.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import socket
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq

from shoprank.config import load_config, with_values
from shoprank.console import log
from shoprank.loop.retrain import retrain
from shoprank.loop.simulate import (
    BASE,
    Arm,
    SimulatedShop,
    day_metrics,
    seed_shop,
    small_encoder,
    write_results,
    zero_shot_retriever,
)
from shoprank.registry import Registry
from shoprank.run import init_ray

ROOT = Path(__file__).resolve().parents[1]
RETRIEVER, RANKER, DAY0 = "loop-retriever", "loop-ranker", "day0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench-loop")
    p.add_argument("--days", type=int, default=5, help="simulated days")
    p.add_argument("--seed-days", type=int, default=7, help="days of history before them")
    p.add_argument("--items", type=int, default=1500)
    p.add_argument("--users", type=int, default=900)
    p.add_argument("--new-items", type=int, default=300, help="the new brand's line")
    p.add_argument("--trend", type=float, nargs=2, default=[0.8, 2.0], metavar=("PER_DAY", "MOST"))
    p.add_argument("--visit-rate", type=float, default=0.5, help="visits per shopper-day")
    p.add_argument("--layers", type=int, default=3, help="MiniLM layers of the ranker")
    p.add_argument("--initial-steps", type=int, default=120, help="the day-0 ranker's steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--retrieve-top",
        type=int,
        default=100,
        help="stage one's candidates, all reranked (room for what the ranker learns)",
    )
    p.add_argument(
        "--explore",
        type=float,
        default=0.25,
        help="share of answers shown in a random order (both arms); >0: the gate judges on them",
    )
    p.add_argument(
        "--explore-top",
        type=int,
        default=30,
        help="an explored answer's k items come from this head",
    )
    p.add_argument(
        "--no-gate", action="store_true", help="promote every candidate (what the gate is worth)"
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="model replicas of each app (feedback reaches any; 2 CPUs shared among them)",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value for the retraining")
    cli = p.parse_intermixed_args()
    started = time.perf_counter()
    out = Path(cli.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    # 1. The shop: seed history, shoppers, the served catalog (with the new line).
    shoppers, catalog_path, seed_events = seed_shop(
        out, cli.items, cli.users, cli.seed_days, cli.days, cli.seed, cli.new_items, cli.trend
    )
    arms = {}
    for name in ("looped", "frozen"):
        shutil.copytree(seed_events, out / name / "shop")
        arms[name] = Arm(name, "", out / name, out / f"{name}-spool", replicas=cli.replicas)

    # 2. The retraining config: configs/retrain-synthetic.yaml on this shop and registry.
    base = small_encoder(out / "ranker-base", cli.layers)
    cfg = load_config(
        ROOT / "configs" / "retrain-synthetic.yaml",
        [
            f"run.storage={out / 'runs'}",
            "run.name=bench-loop",
            f"data.catalog={catalog_path}",
            f"data.events={arms['looped'].root / 'shop'}",
            "data.generate_if_missing=null",
            "data.history_len=3",
            "data.val_users=32",
            "data.test_users=120",
            "data.eval_candidates=20",
            "data.max_train_positives=null",
            f"model.name={base}",
            "model.max_length=64",
            "retriever.context_max_length=128",
            "train.num_workers=1",
            "train.cpus_per_worker=2",
            "train.batch_size=16",
            # The nights: the config's recipe as it ships (production trained further at lr
            # 1e-4 for 120 steps on the two newest days, negatives sampled among the items the
            # log holds): the new line's share of clicks over its share of items is what a
            # trend looks like. Only the shop's and the model's size differ here.
            "eval.num_cpus=2",
            f"registry.root={out / 'registry'}",
            f"registry.model={RANKER}",
            f"retrain.events=[{arms['looped'].root / 'shop'},{arms['looped'].root / 'served'}]",
            "retrain.since=null",
            "tracking.enabled=false",
            # Judged on the explored answers (all of them: they are few), or on every answer.
            f"data.explored_only={str(cli.explore > 0).lower()}",
            *(["data.test_users=null"] if cli.explore > 0 else []),
            *cli.overrides,
        ],
    )
    (out / "config.yaml").write_text(cfg.to_yaml())
    init_ray(num_cpus=8)  # logical: two apps, a training worker and scoring actors take turns

    # 3. Stage one (zero-shot, registered once) and the day-0 ranker (trained on the seed days).
    registry = Registry(cfg.registry.root)
    retriever = zero_shot_retriever(out / "retriever", cfg, pq.read_table(catalog_path))
    registry.register(RETRIEVER, str(retriever))
    registry.set_alias(RETRIEVER, "production", 1, force=True)  # no metric to gate on
    initial = with_values(
        cfg,
        {
            "retrain.window_days": cli.seed_days - 1,
            "train.max_steps": cli.initial_steps,
            "train.lr": 1e-4,
            # The day-0 recipe, whatever the nights do: sampled negatives (from the log's
            # items), judged on the last seed day, which the app did not serve.
            "data.shown_negatives": False,
            "data.explored_only": False,
            "data.test_users": 120,
        },
    )
    day0 = retrain(initial, out / "runs")
    for name in (RETRIEVER, RANKER):
        registry.set_alias(name, DAY0, 1)
    log(f"day-0 ranker: v{day0.candidate}, {day0.metrics.get('candidate')}")

    # 4. Two Serve applications: /looped follows production, /frozen the day-0 alias.
    from ray import serve

    from shoprank.serving.app import build_app

    key = secrets.token_urlsafe(24)
    (out / "keys").write_text(key + "\n")
    (out / "rules.yaml").write_text("filters: {out_of_stock: true, already_purchased: true}\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, arm in arms.items():
        args = {
            "registry": cfg.registry.root,
            "retriever": RETRIEVER,
            "ranker": RANKER,
            "alias": "production" if name == "looped" else DAY0,
            "catalog": str(catalog_path),
            "events": str(arm.root),
            "rules": str(out / "rules.yaml"),
            "api_keys_file": str(out / "keys"),
            "poll_s": 1.0,
            "refresh_s": 3.0,
            "retrieve_top": cli.retrieve_top,
            "rerank_top": cli.retrieve_top,
            "impressions_dir": str(arm.spool),
            "impressions_flush_s": 0.5,
            "explore_share": cli.explore,
            "explore_top": cli.explore_top,
        }
        quiet = {"log_level": "WARNING", "enable_access_log": False}  # 2 apps x every request
        replicas = None
        if cli.replicas > 1:  # the routes (and the log) in every model replica: layout "one"
            args["layout"] = "one"
            replicas = {
                "num_replicas": cli.replicas,
                "ray_actor_options": {"num_cpus": 2.0 / cli.replicas},
            }
        serve.run(
            build_app(args, replicas), name=name, route_prefix=f"/{name}", logging_config=quiet
        )
        arm.url = f"http://127.0.0.1:{port}/{name}"
    shop = SimulatedShop(shoppers, key, cli.seed, cli.visit_rate, concurrency=16)
    up = time.perf_counter() - started
    log(f"serving at http://127.0.0.1:{port}/looped and /frozen ({up:.0f} s since the start)")

    # 5. The days: both arms serve the day's visitors, then the looped arm retrains.
    days, nights, visits = [], [], {name: [] for name in arms}
    promotions: list[tuple[int, int]] = []
    for j in range(1, cli.days + 1):
        day = cli.seed_days - 1 + j  # the shop's day index: seed days are 0 .. seed_days - 1
        row = {"day": j, "date": (BASE + timedelta(days=day)).date().isoformat()}
        t0 = time.perf_counter()
        for name, arm in arms.items():
            got = shop.run_day(arm, day)
            visits[name] += got
            row[name] = {
                "recommend": day_metrics(got),
                "search": day_metrics(got, "search"),
                "ranker": sorted({v.versions.get("ranker") for v in got} - {None}),
            }
        row["serve_s"] = round(time.perf_counter() - t0, 1)
        log(
            f"day {j} ({row['date']}): CTR@10 looped {row['looped']['recommend']['ctr@10']:.4f} "
            f"frozen {row['frozen']['recommend']['ctr@10']:.4f}; NDCG@10 looped "
            f"{row['looped']['recommend']['ndcg@10']:.4f} frozen "
            f"{row['frozen']['recommend']['ndcg@10']:.4f} ({row['serve_s']:.0f} s)"
        )
        days.append(row)
        if j == cli.days:
            break
        # The night: the looped arm's feature store has the day; retraining may promote.
        looped = arms["looped"]
        outcome = retrain(cfg, out / "runs")
        nights.append({"after_day": j, "line": outcome.line(), **asdict(outcome)})
        log(f"night {j}: {outcome.line()} ({outcome.seconds:.0f} s)")
        if cli.no_gate and outcome.status == "kept" and outcome.candidate:
            registry.set_alias(RANKER, "production", outcome.candidate, force=True)
            outcome.status = "promoted"
            nights[-1]["line"] = f"promoted v{outcome.candidate} (--no-gate): {outcome.reason}"
        if outcome.status == "promoted":
            promotions.append((j + 1, outcome.candidate))
            looped.wait_for(
                key, "the swap", lambda v, n=outcome.candidate: v["models"]["ranker"] == n
            )

    # 6. Report: the table by day, the paired margin, the plot.
    command = " ".join(["python bench/bench_loop.py", *sys.argv[1:]])
    extra = {
        "command": command,
        "wall_s": round(time.perf_counter() - started, 1),
        "replicas": cli.replicas,
        # /feedback's outcomes joined to their answers each night, whichever replica took them,
        # against the feedback the app said it logged.
        "feedback": {name: arm.feedback for name, arm in arms.items()},
        "feedback_logged": {name: sum(v.logged for v in visits[name]) for name in arms},
    }
    extra["day0"] = {"metrics": day0.metrics, "seconds": day0.seconds}
    print(write_results(out, days, nights, visits, promotions, extra), flush=True)
    serve.shutdown()


if __name__ == "__main__":
    main()
