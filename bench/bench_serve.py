"""Benchmark the serving app: closed-loop load on /recommend and /search at several
concurrencies, Ray Serve with the ranker's batching on and off, against the same routes and
models in one plain FastAPI + torch process.

    python bench/bench_serve.py [--config serve/config.yaml] [--duration 20] [--rounds 3]
        [--concurrency 1 4 16 64] [--layouts split one] [--out runs/bench-serve] [key=value ...]

Both run at once and are measured in turn, every setup once a round, so that the machine's
drift hits them alike; the report gives medians over rounds and Serve's ratios to the plain
process per round.

`key=value` overrides the app's args (e.g. ranker_precision=int8). Writes bench.json,
bench.md and latency_throughput.png to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from shoprank.console import log
from shoprank.evaluation import report
from shoprank.precision import describe, host_line, ranker_backend, resolve
from shoprank.run import init_ray
from shoprank.serving.features import ParquetFeatureStore
from shoprank.serving.schemas import AppArgs
from shoprank.serving.services import read_catalog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not up yet
        time.sleep(1)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


async def closed_loop(url: str, path: str, bodies: list[dict], key: str, c: int, seconds: float):
    """c clients, each sending its next request as soon as the last one is answered."""
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}  # the app's Server-Timing: ms per stage
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        n = i
        while time.perf_counter() < stop:
            started = time.perf_counter()
            r = await http.post(
                url + path, json=bodies[n % len(bodies)], headers={"x-api-key": key}
            )
            if r.status_code == 200:
                latencies.append(time.perf_counter() - started)
                for part in filter(None, r.headers.get("server-timing", "").split(",")):
                    stage, _, dur = part.strip().partition(";dur=")
                    stages.setdefault(stage, []).append(float(dur))
            else:
                errors += 1
            n += c

    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(c)))
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / wall,
        **{f"p{q}_ms": float(np.percentile(ms, q)) if len(ms) else None for q in (50, 95, 99)},
        **{f"{stage}_p50_ms": float(np.median(v)) for stage, v in stages.items()},
    }


# Where the CPU goes: this machine's processes by what their command line says they are.
PROCESS_KINDS = (
    ("Models", "ServeReplica:shoprank:Models"),
    ("Server", "ServeReplica:shoprank:Server"),
    ("Ingress", "ServeReplica:shoprank:Ingress"),
    ("proxy", "ProxyActor"),
    ("controller", "ServeController"),
    ("plain", "shoprank.serving.plain"),
    ("ray", "raylet"),
    ("ray", "gcs_server"),
    ("client", "bench_serve.py"),
)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far, summed by process kind."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or [])
        kind = next((k for k, marker in PROCESS_KINDS if marker in cmd), None)
        if kind is not None and p.info["cpu_times"] is not None:
            out[kind] = out.get(kind, 0.0) + p.info["cpu_times"].user + p.info["cpu_times"].system
    return out


def run_setup(name: str, url: str, bodies: dict, key: str, cli, counts=None) -> list[dict]:
    """Every endpoint at every concurrency; `counts()`, when given, reads the ranker's
    (forward passes, requests) so each row gets its mean batch size."""
    rows = []
    for path, payloads in bodies.items():
        asyncio.run(closed_loop(url, path, payloads, key, 2, 3))  # warm up
        for c in cli.concurrency:
            row = {"setup": name, "endpoint": path, "concurrency": c}
            before = counts() if counts else None
            cpu, started = cpu_seconds(), time.perf_counter()
            row.update(asyncio.run(closed_loop(url, path, payloads, key, c, cli.duration)))
            wall, after_cpu = time.perf_counter() - started, cpu_seconds()
            # cores busy on average during the row, by process kind
            row["cores"] = {
                k: round((after_cpu[k] - cpu.get(k, 0.0)) / wall, 2)
                for k in after_cpu
                if after_cpu[k] - cpu.get(k, 0.0) > 0.01 * wall
            }
            if counts:
                after = counts()
                passes = after["batches"] - before["batches"]
                row["mean_batch"] = (after["requests"] - before["requests"]) / max(passes, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def start_plain(args: AppArgs, tmp: Path) -> tuple[subprocess.Popen, str, int]:
    """The plain baseline in its own process, with the threads the Serve replica gets."""
    (tmp / "args.json").write_text(args.model_dump_json())
    port = free_port()
    cmd = [sys.executable, "-m", "shoprank.serving.plain", "--args", str(tmp / "args.json")]
    threads = args.torch_threads or os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    plain = subprocess.Popen([*cmd, "--port", str(port)], env=env)
    return plain, f"http://127.0.0.1:{port}", threads


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (setup, endpoint, concurrency): the median over rounds of each figure."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setup"], r["endpoint"], r["concurrency"]), []).append(r)
    out = []
    for (setup, endpoint, c), rs in groups.items():
        row = {"setup": setup, "endpoint": endpoint, "concurrency": c, "rounds": len(rs)}
        for k in rs[0]:
            values = [r.get(k) for r in rs]
            if k not in row and all(isinstance(v, int | float) for v in values):
                row[k] = float(np.median(values))
        kinds = dict.fromkeys(k for r in rs for k in r.get("cores", {}))
        row["cores"] = {k: float(np.median([r["cores"].get(k, 0.0) for r in rs])) for k in kinds}
        out.append(row)
    return out


def ratios(rows: list[dict], serve: str, plain: str) -> list[dict]:
    """Serve over plain per round, matched by endpoint and concurrency: throughput and p50."""
    by = {(r["setup"], r["endpoint"], r["concurrency"], r["round"]): r for r in rows}
    out: dict[tuple, dict[str, list[float]]] = {}
    for (setup, endpoint, c, rnd), r in by.items():
        other = by.get((plain, endpoint, c, rnd))
        if setup != serve or other is None:
            continue
        got = out.setdefault((endpoint, c), {"throughput": [], "p50": []})
        got["throughput"].append(r["throughput_rps"] / other["throughput_rps"])
        got["p50"].append(r["p50_ms"] / other["p50_ms"])
    return [
        {"endpoint": e, "concurrency": c, **{k: sorted(v) for k, v in got.items()}}
        for (e, c), got in out.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="serve/config.yaml")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument(
        "--rounds", type=int, default=3, help="every setup measured once a round (drift)"
    )
    parser.add_argument(
        "--layouts", nargs="+", choices=["split", "one"], help="Serve layouts (default: the app's)"
    )
    parser.add_argument("--out", default="runs/bench-serve")
    parser.add_argument("overrides", nargs="*", help="app arg key=value")
    cli = parser.parse_intermixed_args()

    # 1. The app's args from the serve config, a fresh API key, the request bodies.
    spec = yaml.safe_load(Path(cli.config).read_text())["applications"][0]
    raw = dict(spec["args"])
    for item in cli.overrides:
        k, v = item.split("=", 1)
        raw[k] = yaml.safe_load(v)
    key = secrets.token_urlsafe(24)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    (tmp / "keys").write_text(key + "\n")
    raw["api_keys_file"] = str(tmp / "keys")
    args = AppArgs.model_validate(raw)
    catalog = read_catalog(args.catalog)
    store = ParquetFeatureStore(args.events, catalog["item_id"], refresh_s=None)
    users = store.users(500)
    titles = catalog["title"].to_pylist()
    rng = np.random.default_rng(0)
    queries = [" ".join(t.split()[:4]) for t in rng.choice(titles, size=200)]
    bodies = {
        "/recommend": [{"user_id": u, "k": 10} for u in users],
        "/search": [{"query": q, "k": 10} for q in queries],
    }
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)

    # 2. Both up at once, each idle while the other is measured: the Ray Serve app (its
    # ranker batching requests, max_batch_size 32, or not, 1: a user_config change, no
    # restart) and the plain baseline, one process with the same routes and models. Every
    # round measures each setup once, so the machine's drift hits them alike.
    from ray import serve

    from shoprank.serving.app import build_app

    init_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve_url = f"http://127.0.0.1:{port}"
    plain, plain_url, plain_threads = start_plain(args, tmp)
    rows: list[dict] = []
    try:
        for r in range(cli.rounds):
            arms = [
                (layout, name, size)
                for layout in cli.layouts or [args.layout]
                for name, size in (("serve, batching", 32), ("serve, no batching", 1))
            ]
            for layout, name, size in [*arms, (None, None, None)]:
                if size is None:
                    wait_healthy(plain_url)
                    setup = f"plain FastAPI + torch ({plain_threads} torch threads, BLAS 1)"
                    got = run_setup(setup, plain_url, bodies, key, cli)
                else:
                    app_args = {**args.model_dump(), "max_batch_size": size, "layout": layout}
                    serve.run(build_app(app_args), name="shoprank", route_prefix="/")
                    wait_healthy(serve_url)
                    deployment = "Server" if layout == "one" else "Models"
                    models = serve.get_deployment_handle(deployment, app_name="shoprank")
                    threads = models.threads_in_use.remote().result()

                    def counts(models=models) -> dict:
                        return models.batch_counts.remote().result()

                    where = ", one deployment" if layout == "one" else ""
                    setup = (
                        f"{name}{where} ({threads['torch']} torch threads, BLAS {threads['blas']})"
                    )
                    got = run_setup(setup, serve_url, bodies, key, cli, counts)
                rows += [{**row, "round": r} for row in got]
            log(f"round {r + 1}/{cli.rounds} done")
    finally:
        plain.terminate()
        plain.wait(timeout=30)
        serve.shutdown()

    # 3. Report: the median of each figure over rounds, and Serve over plain per round.
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    matched = [{"serve": s, **x} for s in setups[:-1] for x in ratios(rows, s, setups[-1])]
    # What the models computed in: the app's precisions resolved on this host, as it does.
    computed = {
        "ranker": ranker_backend(args.ranker_precision) if args.ranker else None,
        "retriever": resolve(args.retriever_precision),
    }
    host = {**describe(), "precision": computed}
    (out / "bench.json").write_text(
        json.dumps(
            {
                "host": host,
                "args": raw | {"api_keys_file": None},
                "duration_s": cli.duration,
                "rounds": cli.rounds,
                "rows": rows,
                "ratios": matched,
            },
            indent=2,
        )
    )
    medians = median_rows(rows)
    header = "| setup | endpoint | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors "
    lines = [
        host_line(", ".join(f"{k} {v}" for k, v in computed.items() if v)),
        "",
        f"Medians over {cli.rounds} rounds of {cli.duration:g} s a row.",
        "",
        header + "| retrieve p50 ms | rank p50 ms (share of p50) | mean ranker batch "
        "| cores busy, by process |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in medians:
        batch = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-"
        rank = "-"
        if r.get("rank_p50_ms") is not None and r["p50_ms"]:
            rank = f"{r['rank_p50_ms']:.0f} ({r['rank_p50_ms'] / r['p50_ms']:.0%})"
        retrieve = f"{r['retrieve_p50_ms']:.0f}" if r.get("retrieve_p50_ms") else "-"
        lines.append(
            f"| {r['setup']} | {r['endpoint']} | {r['concurrency']} | {r['throughput_rps']:.1f} "
            f"| {r['p50_ms'] or float('nan'):.0f} | {r['p95_ms'] or float('nan'):.0f} "
            f"| {r['p99_ms'] or float('nan'):.0f} | {r['errors']:.0f} | {retrieve} | {rank} "
            f"| {batch} | {', '.join(f'{k} {v:.2f}' for k, v in r['cores'].items())} |"
        )
    lines += [
        "",
        "Serve over plain, each round's rows matched (median, range over rounds):",
        "",
        "| setup | endpoint | concurrency | throughput | p50 latency |",
        "|---|---|---:|---:|---:|",
    ]
    for m in matched:
        t, p = m["throughput"], m["p50"]
        lines.append(
            f"| {m['serve']} | {m['endpoint']} | {m['concurrency']} "
            f"| {np.median(t):.2f}x ({t[0]:.2f}-{t[-1]:.2f}) "
            f"| {np.median(p):.2f}x ({p[0]:.2f}-{p[-1]:.2f}) |"
        )
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    series = {}
    for r in medians:
        xs, ys = series.setdefault(f"{r['setup']} {r['endpoint']}", ([], []))
        xs.append(r["throughput_rps"])
        ys.append(r["p95_ms"] or float("nan"))
    report.curve_plot(
        series,
        "throughput (requests/s)",
        "p95 latency (ms)",
        f"closed loop, concurrency {', '.join(map(str, cli.concurrency))}; medians over rounds",
        out / "latency_throughput.png",
    )
    print("\n".join(lines))
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'}")


if __name__ == "__main__":
    main()
