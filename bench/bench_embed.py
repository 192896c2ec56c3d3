"""Catalog embedding throughput: the project's Ray Data path against a plain loop, interleaved.

    python bench/bench_embed.py [--rounds 3] [--config configs/amazon-retriever.yaml]

Arms, all on the config's catalog with the pretrained encoder in the config's precision
(train.precision; auto: bf16 where the CPU has it natively, else fp32), the same threads each,
each in a fresh process (no arm profits from an earlier round's warm kernels) and timed from
loading the model to the last embedding:
`plain-padded` (weights in that precision, batches of 64 padded to max_length: the plain peer),
`plain-sorted-N` (`Encoder.embed`, passes of at most N x max_length tokens) for several N,
and `embed_catalog` (`retrieval.embed.embed_catalog`, what jobs/embed.py and evaluation run:
in process for a catalog up to index.embed_in_process_below items, else one Ray Data actor
pool tokenizing and embedding), run as `python -c` with this checkout's lib/ first on its
path. `--before DIR` adds `embed_catalog@before`: the same function of an older checkout
(DIR, e.g. a git worktree) with its own copy of the config, so that old and new code are
timed in the same rounds. The JSON and Markdown name the CPU, its kernels and the precision.
Writes runs/bench-embed/bench_embed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from shoprank import run as runs
from shoprank.config import load_config
from shoprank.console import log
from shoprank.data.text import render_items
from shoprank.models.retriever import EncoderSpec
from shoprank.precision import describe, host_line

SUB_BATCHES = (16, 32, 64, 128)


@ray.remote(max_calls=1)  # a fresh worker process each call
def plain_arm(spec: EncoderSpec, texts: list[str], sub_batch: int | None, bf16: bool) -> dict:
    """One process: `sub_batch` None pads every batch of 64 to max_length (no sorting)."""
    import torch

    from shoprank.data.tokenize import text_tokens

    started = time.perf_counter()  # with the model's load, as embed_catalog's time has it
    encoder = spec.load(bf16=bf16)
    threads = torch.get_num_threads()
    if sub_batch is not None:
        encoder.pass_tokens = sub_batch * spec.item_max_length
        out = encoder.embed(texts, "item")
    else:  # the plain peer: the same weights, fixed-size batches padded to max_length
        model = encoder.model
        parts = []
        with torch.inference_mode():
            for start in range(0, len(texts), 64):
                tok = text_tokens(
                    encoder.tokenizer, texts[start : start + 64], spec.item_max_length
                )
                ids, mask = (torch.from_numpy(tok[k]) for k in ("input_ids", "attention_mask"))
                hidden = model(input_ids=ids.long(), attention_mask=mask.long())
                parts.append(hidden.last_hidden_state.float().mean(1).numpy())
        out = np.concatenate(parts)
    seconds = time.perf_counter() - started
    return {"items_per_s": len(out) / seconds, "threads": threads}


# Run in a process of its own, with a checkout's lib/ first on its path.
FRESH = """
import json, sys
import pyarrow.parquet as pq
from shoprank import run as runs
from shoprank.config import load_config
from shoprank.models.retriever import EncoderSpec
from shoprank.retrieval.embed import embed_catalog
cfg = load_config(sys.argv[1], [])
runs.init_ray()
catalog = pq.read_table(sys.argv[2])
_, seconds = embed_catalog(catalog, EncoderSpec.zero_shot(cfg), cfg)
print("FRESH " + json.dumps({"items_per_s": catalog.num_rows / seconds}))
"""


def fresh_arm(checkout: Path, config: str, catalog_file: str) -> float:
    """items/s of `embed_catalog` as the checkout at `checkout` has it, in a new process."""
    env = {**os.environ, "PYTHONPATH": str(checkout / "lib")}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", FRESH, str(checkout / config), catalog_file],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("FRESH ")]
    if done.returncode or not lines:
        failed = done.stderr[-3000:]
        raise SystemExit(f"{checkout}: embed_catalog failed:\n{failed}")
    return json.loads(lines[-1].removeprefix("FRESH "))["items_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", default="configs/amazon-retriever.yaml")
    parser.add_argument("--out", default="runs/bench-embed")
    parser.add_argument("--before", type=Path, help="an older checkout to time in each round")
    cli = parser.parse_args()
    cfg = load_config(cli.config, [])
    runs.init_ray()
    run = runs.Run(cfg, Path(cli.out))
    catalog = run.data.catalog
    texts = render_items(catalog, cfg.data.item_template)
    spec = EncoderSpec.zero_shot(cfg)
    cpus = int(cfg.eval.num_cpus)
    computed = "bf16" if cfg.train.bf16 else "fp32"
    log(f"{len(texts)} catalog texts, max_length {spec.item_max_length}, {cpus} CPUs an arm")
    log(host_line(computed))

    arms: dict[str, list[float]] = {}
    threads: dict[str, int] = {}
    scratch = tempfile.TemporaryDirectory()
    catalog_file = str(Path(scratch.name) / "catalog.parquet")
    pq.write_table(catalog, catalog_file)  # the validated catalog, for the --before process
    here = Path(__file__).resolve().parent.parent
    checkouts = {"embed_catalog": here} | (
        {"embed_catalog@before": cli.before} if cli.before else {}
    )
    for r in range(cli.rounds):
        for name, sub in [("plain-padded", None), *((f"plain-sorted-{n}", n) for n in SUB_BATCHES)]:
            got = ray.get(plain_arm.options(num_cpus=cpus).remote(spec, texts, sub, cfg.train.bf16))
            arms.setdefault(name, []).append(got["items_per_s"])
            threads[name] = got["threads"]
        # Each its own Ray (its workers import its code): this one stops meanwhile.
        ray.shutdown()
        for name, checkout in checkouts.items():
            arms.setdefault(name, []).append(fresh_arm(checkout, cli.config, catalog_file))
        runs.init_ray()
        log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in arms.items()))

    plain = arms["plain-padded"]
    sub = f"{cfg.index.embed_pass_tokens} tokens a pass"
    below = getattr(cfg.index, "embed_in_process_below", 0)
    lines = [
        host_line(computed),
        "",
        f"{len(texts)} items, {cpus} CPUs an arm (torch threads: "
        + ", ".join(f"{k} {v}" for k, v in threads.items())
        + f"; embed_catalog: in process up to {below} texts, else Ray Data with "
        f"eval.num_cpus={cfg.eval.num_cpus:g}), its sub-batch "
        f"path: {sub}" + (f"; embed_catalog@before: {cli.before}" if cli.before else ""),
        "",
        "| arm | items/s (median) | range | vs plain-padded (median) | range |",
        "|---|---|---|---|---|",
    ]
    for name, rates in arms.items():
        ratios = [a / b for a, b in zip(rates, plain, strict=True)]
        lines.append(
            f"| {name} | {statistics.median(rates):.0f} | {min(rates):.0f}-{max(rates):.0f} | "
            f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f} |"
        )
    if cli.before:
        ratios = [
            a / b for a, b in zip(arms["embed_catalog"], arms["embed_catalog@before"], strict=True)
        ]
        lines += [
            "",
            "embed_catalog over embed_catalog@before, round by round: "
            f"{statistics.median(ratios):.2f}x (median; {min(ratios):.2f}-{max(ratios):.2f})",
        ]
    report = "\n".join(lines) + "\n"
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    host = {**describe(), "precision": computed}
    (out / "bench_embed.json").write_text(
        json.dumps({"host": host, "arms": arms, "threads": threads}, indent=2)
    )
    (out / "bench_embed.md").write_text(report)
    print(report)
    log(f"wrote {out / 'bench_embed.md'}")


if __name__ == "__main__":
    main()
