"""Benchmark: the Serve app autoscaling under closed-loop load, and what it loses (nothing, we
claim). One client, then --clients until Serve runs --max-replicas, held, then one client until
the extra replicas are gone; every answer gets a click through POST /feedback, to whichever
replica the proxy picks.

    python bench/bench_autoscale.py [--config serve/synthetic.yaml] [--clients 16]
        [--max-replicas 2] [--target 4] [--hold 20] [--out runs/bench-autoscale]

The app: the serve config's args with a fresh registry holding the bundled MiniLM as a
zero-shot retriever (and, with --ranker, that ranker export to rerank), its served-events log
in --out/served. Reports the time to scale up and down, requests/s and p50/p99 latency in
2-second windows across the cycle, failures, the impression rows on disk against the answers
served, and the feedback joined against the clicks sent. Writes bench.json, bench.md and
autoscale.png to --out.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shoprank.config import load_config
from shoprank.console import log
from shoprank.data.outcomes import join_outcomes, read_parquet_folder
from shoprank.loop.simulate import zero_shot_retriever
from shoprank.precision import host_line
from shoprank.registry import Registry
from shoprank.run import init_ray
from shoprank.serving.features import ParquetFeatureStore
from shoprank.serving.load import ClosedLoop, free_port, scale_cycle, windows
from shoprank.serving.services import read_catalog

APP, DEPLOYMENT = "shoprank", "Server"


def plot(timeline: list, rows: list[dict], marks: dict, path: Path) -> None:
    fig = Figure(figsize=(9, 7))
    top, mid, low = fig.subplots(3, 1, sharex=True)
    top.step([t for t, _ in timeline], [n for _, n in timeline], where="post")
    top.set_ylabel("replicas running")
    top.set_yticks(range(0, max(n for _, n in timeline) + 2))
    t = [r["t"] for r in rows]
    mid.plot(t, [r["rps"] for r in rows], marker=".")
    mid.set_ylabel("answers/s")
    low.plot(t, [r["p50_ms"] for r in rows], label="p50", marker=".")
    low.plot(t, [r["p99_ms"] for r in rows], label="p99", marker=".")
    low.set_ylabel("/recommend ms")
    low.set_xlabel("seconds")
    low.legend()
    for ax in (top, mid, low):
        for at in marks.values():
            ax.axvline(at, color="grey", linestyle=":", linewidth=1)
    for name, at in marks.items():
        top.annotate(name, (at, 0.1), rotation=90, fontsize=7, color="grey")
    fig.suptitle("Autoscaling under closed-loop load")
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="serve/synthetic.yaml")
    p.add_argument("--ranker", help="a ranker export folder to rerank with (default: none)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--target", type=float, default=4, help="target_ongoing_requests")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs a replica holds")
    p.add_argument("--hold", type=float, default=20.0, help="seconds held at the top and after")
    p.add_argument("--out", default="runs/bench-autoscale")
    cli = p.parse_args()
    started = time.perf_counter()
    out = Path(cli.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    # 1. The app's args, a fresh registry (zero-shot retriever; the ranker if given), a key.
    raw = dict(yaml.safe_load(Path(cli.config).read_text())["applications"][0]["args"])
    cfg = load_config(None, [])
    catalog = read_catalog(raw["catalog"])
    registry = Registry(str(out / "registry"))
    registry.register("bench-retriever", str(zero_shot_retriever(out / "retriever", cfg, catalog)))
    registry.set_alias("bench-retriever", "production", 1, force=True)
    if cli.ranker:
        registry.register("bench-ranker", cli.ranker)
        registry.set_alias("bench-ranker", "production", 1, force=True)
    key = secrets.token_urlsafe(24)
    (out / "keys").write_text(key + "\n")
    served = out / "served"
    raw |= {
        "registry": str(out / "registry"),
        "retriever": "bench-retriever",
        "ranker": "bench-ranker" if cli.ranker else None,
        "api_keys_file": str(out / "keys"),
        "impressions_dir": str(served),
        "impressions_flush_s": 1.0,
        "explore_share": 0.0,
        "torch_threads": max(1, int(cli.cpus)),
    }
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": cli.max_replicas,
        "target_ongoing_requests": cli.target,
        "upscale_delay_s": 2.0,
        "downscale_delay_s": 10.0,
    }
    users = ParquetFeatureStore(raw["events"], catalog["item_id"], refresh_s=None).users(500)

    # 2. The app on a local Ray, one cycle of load.
    from ray import serve

    from shoprank.serving.app import build_app

    init_ray(num_cpus=max(4, int(np.ceil(cli.cpus * cli.max_replicas)) + 1))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = {"autoscaling_config": autoscaling, "ray_actor_options": {"num_cpus": cli.cpus}}
    try:
        quiet = {"log_level": "WARNING", "enable_access_log": False}  # a line a request
        serve.run(build_app(raw, options), name=APP, route_prefix="/", logging_config=quiet)
        url = f"http://127.0.0.1:{port}"
        load = ClosedLoop(url, key, users, max_clients=cli.clients).start(1)
        try:
            time.sleep(cli.hold / 2)  # one client: the baseline
            cycle = scale_cycle(
                load, APP, DEPLOYMENT, cli.clients, 1, cli.max_replicas, cli.hold, 600
            )
        finally:
            load.stop()
    finally:
        serve.shutdown()

    # 3. What was served, written and joined.
    samples = load.samples
    answers = [s for s in samples if s.route == "recommend"]
    feedback = [s for s in samples if s.route == "feedback"]
    impressions = pads.dataset(served, partitioning="hive").to_table()
    joined, counts = join_outcomes(impressions, read_parquet_folder(str(served / "_outcomes")))
    by = {s.request_id: s.replica for s in answers}
    marks, timeline = cycle["marks"], cycle["timeline"]
    rows = windows(samples)

    def latency(a: float, b: float) -> dict:
        ms = [s.ms for s in answers if a <= s.t < b and s.status == 200]
        return {
            "requests": len(ms),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if ms else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if ms else None,
        }

    result = {
        "host": host_line(
            "retriever "
            + str(raw.get("retriever_precision", "auto"))
            + (f", ranker {raw.get('ranker_precision', 'auto')}" if cli.ranker else ", no ranker")
        ),
        "command": "python bench/bench_autoscale.py "
        + f"--clients {cli.clients} --max-replicas {cli.max_replicas} --target {cli.target} "
        f"--cpus {cli.cpus} --hold {cli.hold}",
        "autoscaling_config": autoscaling,
        "replica_cpus": cli.cpus,
        "marks_s": {k: round(v, 1) for k, v in marks.items()},
        "scale_up_s": round(marks["scaled_up"] - marks["load_up"], 1),
        "scale_down_s": round(marks["scaled_down"] - marks["load_down"], 1),
        "latency": {
            "one client, before": latency(0, marks["load_up"]),
            "while scaling up": latency(marks["load_up"], marks["scaled_up"]),
            "at the top": latency(marks["scaled_up"], marks["load_down"]),
            "while scaling down": latency(marks["load_down"], marks["scaled_down"]),
            "one client, after": latency(marks["scaled_down"], float("inf")),
        },
        "requests": len(answers) + len(feedback),
        "failed": sum(s.status not in (200, 202) for s in samples),
        "errors": load.errors[:5],
        "replicas_answering": len({s.replica for s in answers}),
        "answers": len(answers),
        "impression_rows": impressions.num_rows,
        "items_served": sum(s.items for s in answers),
        "feedback_sent": len(feedback),
        "feedback_to_another_replica": sum(by.get(s.request_id) != s.replica for s in feedback),
        "outcomes": counts,
        "timeline": [(round(t, 2), n) for t, n in timeline],
        "windows": rows,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    plot(timeline, rows, marks, out / "autoscale.png")
    lines = [
        "# Autoscaling under load",
        "",
        result["host"],
        "",
        f"Command: `{result['command']}`; autoscaling_config {autoscaling}, "
        f"{cli.cpus} CPU a replica.",
        "",
        f"Scale up: {result['scale_up_s']} s from {cli.clients} clients to {cli.max_replicas} "
        f"replicas running; scale down: {result['scale_down_s']} s from 1 client to 1 replica.",
        "",
        "| phase | answers | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        *(
            f"| {k} | {v['requests']} | {v['p50_ms']} | {v['p99_ms']} |"
            for k, v in result["latency"].items()
        ),
        "",
        f"Requests: {result['requests']}, failed: {result['failed']}. Answers "
        f"{result['answers']} from {result['replicas_answering']} replicas; impression rows on "
        f"disk {result['impression_rows']} for {result['items_served']} items served. Feedback "
        f"sent {result['feedback_sent']} ({result['feedback_to_another_replica']} to a replica "
        f"other than the one that answered); joined {counts['joined']} "
        f"(left out: {', '.join(f'{k} {v}' for k, v in counts.items() if k != 'joined')}).",
        "",
        "![autoscale](autoscale.png)",
    ]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines[:-1]))
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'autoscale.png'}")


if __name__ == "__main__":
    main()
