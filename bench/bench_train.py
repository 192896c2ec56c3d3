"""Training throughput: the project's pipeline (Ray Data -> Ray Train + DeepSpeed) against a plain
PyTorch loop doing the same work, the arms interleaved over rounds (this machine drifts).

    python bench/bench_train.py [--rounds 3] [--steps 12] [--tasks ranker retriever] [--real]
        [--set key=value ...]

Arms, per task: `plain` (one process, the project's model builder, AdamW, the run's autocast
(train.precision: bf16 where the CPU has it natively, else fp32), no Ray)
and the real training loop (`train.loop.fit`) at 1 worker x 2 CPUs and 2 x 1 (ZeRO 0 and 2), all
on the same fixed-shape tokens (every row max_length real tokens: no padding to save). With
--real, both again on real Amazon tokens: the plain loop on rows padded to max_length, the
pipeline trimming each batch to its longest row (the retriever's towers also in
`retriever.length_buckets` passes of similar-length rows), and the pipeline again with
`train.group_by_length` (batches of rows of like length); beside them the data's padding
ceiling (tokens at max_length over real tokens). Each arm warms up, then its steps are
timed; each process records its setup (threads, LoRA targets, trainable parameters,
dropout, attention, optimizer, precision), and the bench refuses to compare arms whose setups
differ. A matmul per round in the arms' precision gives the machine's peak; the JSON and the
Markdown name the CPU, its kernels and the precision. Writes
runs/bench-train/bench_train.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from shoprank import run as runs
from shoprank.config import Config, load_config
from shoprank.console import log
from shoprank.precision import describe, host_line

# (One worker runs ZeRO stage 0 whatever train.zero_stage says: there is nothing to shard.)
FIXED_ARMS = [("ray-1x2", 1, 0), ("ray-2x1-z0", 2, 0), ("ray-2x1-z2", 2, 2)]
CPUS = 2
CONFIGS = {"ranker": "configs/amazon.yaml", "retriever": "configs/amazon-retriever.yaml"}


def bench_config(
    task: str,
    steps: int,
    warmup: int,
    workers: int | None = None,
    zero: int | None = None,
    extra: tuple[str, ...] = (),
) -> Config:
    """The task's Amazon config cut to a timed run (no early validation, a step record each),
    in its own layout unless `workers` and `zero` say another; `extra` overrides (--set)
    last."""
    layout = []
    if workers is not None:
        layout = [f"train.num_workers={workers}", f"train.cpus_per_worker={CPUS // workers}"]
        layout.append(f"train.zero_stage={zero}")
    return load_config(
        CONFIGS[task],
        [
            *layout,
            f"train.max_steps={warmup + steps}",
            "train.eval_every_steps=null",
            "train.log_every_steps=1",
            "train.early_stopping_patience=null",
            "data.max_train_positives=1500",
            "data.val_users=16",
            "run.storage=runs/bench-train/ray",
            *extra,
        ],
    )


# -- the work ----------------------------------------------------------------------------------


def fixed_rows(task: str, cfg: Config, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Example groups of random tokens, every row all real tokens: the same for every arm."""
    rng = np.random.default_rng(int(ids[0]) if len(ids) else 0)
    n, g, length = len(ids), 1 + cfg.data.negatives, cfg.model.max_length
    labels = np.zeros((n, g), np.float32)
    labels[:, 0] = 1.0

    def tokens(*shape):
        ids = rng.integers(1000, 30000, size=shape, dtype=np.int32)
        ids[..., 0], ids[..., -1] = 101, 102  # [CLS] ... [SEP]
        return ids, np.ones(shape, np.int32)

    if task == "ranker":
        input_ids, mask = tokens(n, g, length)
        types = np.zeros((n, g, length), np.int32)
        types[..., length // 2 :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "token_type_ids": types,
            "labels": labels,
        }
    ctx, ctx_mask = tokens(n, cfg.retriever.context_max_length)
    items, item_mask = tokens(n, g, length)
    rows = rng.permutation(100_000)[: n * g].reshape(n, g).astype(np.int32)
    return {
        "ctx_input_ids": ctx,
        "ctx_attention_mask": ctx_mask,
        "item_input_ids": items,
        "item_attention_mask": item_mask,
        "item_rows": rows,
        "labels": labels,
    }


def fixed_datasets(task: str, cfg: Config, groups: int) -> dict[str, ray.data.Dataset]:
    def make(batch):
        return fixed_rows(task, cfg, batch["id"])

    out = {"train": ray.data.range(groups, override_num_blocks=8).map_batches(make)}
    out["valid"] = ray.data.range(16).map_batches(make)
    if task == "retriever":
        n = 64

        def catalog(batch):
            rows = fixed_rows("retriever", cfg, batch["id"])
            return {
                "row": batch["id"].astype(np.int64),
                "item_input_ids": rows["item_input_ids"][:, 0],
                "item_attention_mask": rows["item_attention_mask"][:, 0],
            }

        out["catalog"] = ray.data.range(n).map_batches(catalog)

        def valid(batch):  # targets among the n catalog rows
            rows = fixed_rows("retriever", cfg, batch["id"])
            rows["item_rows"] = (batch["id"][:, None] % n).astype(np.int32)
            rows["item_input_ids"] = rows["item_input_ids"][:, :1]
            rows["item_attention_mask"] = rows["item_attention_mask"][:, :1]
            rows["labels"] = rows["labels"][:, :1]
            return rows

        out["valid"] = ray.data.range(16).map_batches(valid)
    out = {k: v.materialize() for k, v in out.items()}
    for ds in out.values():  # as training_datasets does: the loop logs its own steps
        ds.context.enable_progress_bars = False
    return out


def real_datasets(task: str, cfg: Config) -> dict[str, ray.data.Dataset]:
    from shoprank.train.datasets import training_datasets

    run = runs.Run(cfg, Path(tempfile.mkdtemp(prefix="bench-train-")))
    return training_datasets(cfg, run.data.catalog, run.examples)


def first_batches(ds: ray.data.Dataset, n: int, size: int) -> list[dict[str, np.ndarray]]:
    out = []
    for batch in ds.iter_batches(batch_size=size, batch_format="numpy", drop_last=True):
        out.append({k: v for k, v in batch.items() if v.dtype != object})
        if len(out) == n:
            break
    return out


def padding_ceiling(batches: list[dict[str, np.ndarray]], task: str) -> float:
    """Tokens run when every row is padded to max_length over the real tokens (both towers
    of a retriever): the most that skipping padding can buy."""
    keys = ["attention_mask"] if task == "ranker" else ["ctx_attention_mask", "item_attention_mask"]
    padded = sum(b[k].size for b in batches for k in keys)
    real = sum(int(b[k].sum()) for b in batches for k in keys)
    return padded / real


# -- the arms ----------------------------------------------------------------------------------


@ray.remote(num_cpus=CPUS)
def plain_arm(cfg_json: dict, task: str, batches: list[dict], warmup: int, steps: int) -> dict:
    """A plain loop in its own process: the same builder, optimizer, autocast and threads
    as the pipeline; no Ray Data, no DeepSpeed, no trimming (rows run at max_length)."""
    import torch
    import torch.nn.functional as F

    from shoprank import console
    from shoprank.models.encoder import mean_pool
    from shoprank.models.retriever import contrastive_loss
    from shoprank.train.loop import TASKS, work_signature

    console.quiet()
    torch.set_num_threads(CPUS)
    cfg = Config.model_validate(cfg_json)
    torch.manual_seed(cfg.run.seed)
    model = TASKS[task].build(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def loss_of(b: dict[str, torch.Tensor]) -> torch.Tensor:
        if task == "ranker":
            n, g, length = b["input_ids"].shape
            flat = {k: b[k].reshape(-1, length).long() for k in TOKEN_KEYS}
            return F.binary_cross_entropy_with_logits(
                model(**flat).logits.float().view(n, g), b["labels"]
            )

        def embed(ids, mask):
            hidden = model.encoder(input_ids=ids.long(), attention_mask=mask.long())
            return F.normalize(mean_pool(hidden.last_hidden_state.float(), mask), dim=-1)

        n, g, length = b["item_input_ids"].shape
        ctx = embed(b["ctx_input_ids"], b["ctx_attention_mask"])
        items = embed(
            b["item_input_ids"].reshape(-1, length), b["item_attention_mask"].reshape(-1, length)
        )
        return contrastive_loss(ctx, items, b["item_rows"], model.scale())

    TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
    records = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = {k: torch.from_numpy(v) for k, v in batches[step % len(batches)].items()}
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
            loss = loss_of(batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if step >= warmup:
            pairs = batch["labels"].numel()
            records.append(
                {"wall": t4 - t0, "pairs": pairs, "data": t1 - t0, "forward": t2 - t1}
                | {"backward": t3 - t2, "optimizer": t4 - t3}
            )
    return {"records": records, "setup": work_signature(model, opt, cfg, workers=1)}


def pipeline_arm(cfg: Config, task: str, datasets: dict, warmup: int) -> dict:
    """The real loop (Ray Train + DeepSpeed, Ray Data streaming); its step records after the
    warm-up steps, and the setup its worker recorded."""
    from shoprank.train.loop import fit, saved_state

    name = f"bench-{task}-{time.time_ns()}"
    result = fit(cfg, task, datasets, datasets["train"].count(), name=name)
    state = saved_state(result.checkpoint)
    records = []
    pairs_per_step = cfg.train.batch_size * (1 + cfg.data.negatives) * cfg.train.num_workers
    for r in state.steps:
        if r["step"] > warmup:
            wall = pairs_per_step / r["pairs_per_s"]
            records.append(
                {"wall": wall, "pairs": pairs_per_step, "data": r["data_wait"] * wall}
                | {k: r[k] * wall for k in ("forward", "backward", "optimizer")}
            )
    return {"records": records, "setup": state.setup}


def summary(records: list[dict]) -> dict:
    wall = sum(r["wall"] for r in records)
    out = {"pairs_per_s": sum(r["pairs"] for r in records) / wall, "steps": len(records)}
    for part in ("data", "forward", "backward", "optimizer"):
        out[f"{part}_share"] = sum(r[part] for r in records) / wall
    return out


def peak_tflops(precision: str) -> float:
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(1024, 1024, dtype=dtype)
    torch.mm(a, a)
    started = time.perf_counter()
    for _ in range(20):
        torch.mm(a, a)
    return 20 * 2 * 1024**3 / (time.perf_counter() - started) / 1e12


# -- the driver --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=["ranker", "retriever"])
    parser.add_argument("--real", action="store_true", help="also on real Amazon tokens")
    parser.add_argument(
        "--layouts",
        nargs="*",
        default=[name for name, _, _ in FIXED_ARMS],
        help="the pipeline layouts run on fixed-shape tokens (none: skip them and their plain arm)",
    )
    parser.add_argument("--out", default="runs/bench-train")
    parser.add_argument(
        "--set", nargs="*", default=[], help="config overrides for every arm (key=value)"
    )
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    runs.init_ray(CPUS)

    arms, inputs = [], {}
    for task in cli.tasks:
        base = bench_config(task, cli.steps, cli.warmup, extra=tuple(cli.set))
        groups = (cli.warmup + cli.steps + 2) * base.train.batch_size * 2
        fixed = fixed_datasets(task, base, groups)
        plain_batches = first_batches(fixed["train"], cli.warmup + cli.steps, base.train.batch_size)
        if cli.layouts:
            arms.append((task, "fixed", "plain", base, plain_batches))
        for name, workers, zero in [a for a in FIXED_ARMS if a[0] in cli.layouts]:
            cfg = bench_config(task, cli.steps, cli.warmup, workers, zero, tuple(cli.set))
            arms.append((task, "fixed", name, cfg, fixed))
        if cli.real:
            real = real_datasets(task, base)
            batches = first_batches(real["train"], cli.warmup + cli.steps, base.train.batch_size)
            inputs[task] = {"padding_ceiling": padding_ceiling(batches, task)}
            arms.append((task, "real", "plain", base, batches))
            t = base.train  # the config's own layout
            layout = f"ray-{t.num_workers}x{t.cpus_per_worker:g}"
            layout += f"-z{t.zero_stage}" if t.num_workers > 1 else ""
            configured = layout + ("-grouped" if t.group_by_length else "")
            arms.append((task, "real", configured, base, real))
            if t.group_by_length:  # the config's layout already cuts batches of like length
                continue
            # The same layout with batches of rows of like length (`train.group_by_length`).
            grouped = bench_config(
                task, cli.steps, cli.warmup, extra=(*cli.set, "train.group_by_length=true")
            )
            arms.append((task, "real", f"{layout}-grouped", grouped, real))

    results: dict[str, list[dict]] = {}
    peaks = []
    computed = "bf16" if arms[0][3].train.bf16 else "fp32"
    log(host_line(computed))
    for round_ in range(cli.rounds):
        peaks.append(peak_tflops(computed))
        log(f"round {round_ + 1}/{cli.rounds}: {computed} matmul peak {peaks[-1]:.2f} TFLOP/s")
        for task, data, name, cfg, source in arms:
            if name == "plain":
                got = ray.get(
                    plain_arm.remote(
                        cfg.model_dump(mode="json"), task, source, cli.warmup, cli.steps
                    )
                )
            else:
                got = pipeline_arm(cfg, task, source, cli.warmup)
            row = {"round": round_, **summary(got["records"]), "setup": got["setup"]}
            results.setdefault(f"{task}/{data}/{name}", []).append(row)
            log(f"  {task} {data} {name}: {row['pairs_per_s']:.1f} pairs/s")

    check_setups(results)
    report = tabulate(results, inputs, peaks, computed)
    host = {**describe(), "precision": computed}
    (out / "bench_train.json").write_text(
        json.dumps(
            {"host": host, "results": results, "inputs": inputs, "peak_tflops": peaks}, indent=2
        )
    )
    (out / "bench_train.md").write_text(report)
    plot(results, out / "bench_train.png")
    print(report)
    log(f"wrote {out / 'bench_train.md'}, {out / 'bench_train.json'}, {out / 'bench_train.png'}")


def check_setups(results: dict[str, list[dict]]) -> None:
    """Arms of one task compare only if they did the same work the same way."""
    keys = ("lora_targets", "trainable_params", "dropout", "attention", "optimizer", "bf16")
    for task in {k.split("/")[0] for k in results}:
        seen = {
            arm: {k: row["setup"][k] for k in keys}
            for arm, rows in results.items()
            if arm.startswith(task + "/")
            for row in rows
        }
        first = next(iter(seen.values()))
        for arm, setup in seen.items():
            if setup != first:
                raise SystemExit(f"{arm} ran another setup than the rest: {setup} vs {first}")
        for arm, rows in results.items():
            for row in rows:
                s = row["setup"]
                if s["threads"] * s["workers"] != CPUS:
                    raise SystemExit(f"{arm}: {s['workers']} x {s['threads']} threads, not {CPUS}")


def tabulate(results: dict, inputs: dict, peaks: list[float], computed: str) -> str:
    lines = [
        host_line(computed),
        "",
        f"{computed} matmul peak per round: {', '.join(f'{p:.2f}' for p in peaks)} TFLOP/s",
        "",
        "| task | tokens | arm | pairs/s (median) | range | vs plain (median) | range | data | "
        "forward | backward | optimizer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, rows in results.items():
        task, data, name = arm.split("/")
        plain = results[f"{task}/{data}/plain"]
        rates = [r["pairs_per_s"] for r in rows]
        ratios = [r["pairs_per_s"] / p["pairs_per_s"] for r, p in zip(rows, plain, strict=True)]
        shares = {
            k: statistics.median(r[f"{k}_share"] for r in rows)
            for k in ("data", "forward", "backward", "optimizer")
        }
        lines.append(
            f"| {task} | {data} | {name} | {statistics.median(rates):.1f} | "
            f"{min(rates):.1f}-{max(rates):.1f} | {statistics.median(ratios):.2f}x | "
            f"{min(ratios):.2f}-{max(ratios):.2f} | "
            + " | ".join(f"{100 * shares[k]:.0f}%" for k in shares)
            + " |"
        )
    for task, info in inputs.items():
        lines.append(
            f"\n{task}, real tokens: padding ceiling {info['padding_ceiling']:.2f}x "
            "(max_length / mean real tokens a row: what skipping padding can buy at most)"
        )
    lines.append(
        "\nvs plain: each round's pipeline rate over the same round's plain rate (the arms of a "
        "round run back to back). Shares: of each arm's timed wall time."
    )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    medians = [statistics.median(r["pairs_per_s"] for r in results[n]) for n in names]
    lows = [
        m - min(r["pairs_per_s"] for r in results[n]) for m, n in zip(medians, names, strict=True)
    ]
    highs = [
        max(r["pairs_per_s"] for r in results[n]) - m for m, n in zip(medians, names, strict=True)
    ]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    colors = ["#888" if n.endswith("/plain") else "#2b6cb0" for n in names]
    ax.barh(names, medians, xerr=[lows, highs], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("training pairs/s (median of rounds; bars: range)")
    ax.set_title("Pipeline (blue) vs plain PyTorch loop (grey), same work")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
