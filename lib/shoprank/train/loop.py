"""The one training loop: Ray Train workers running a DeepSpeed ZeRO engine.

The ranker and the retriever differ only in their `Task` (how to build the model, its loss and
its validation); everything else, from ZeRO sharding and bf16 to checkpoints, resume, early
stopping and reporting, lives here once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from shoprank import console
from shoprank.config import Config, TrainConfig
from shoprank.console import log
from shoprank.data.read import uri
from shoprank.evaluation import metrics
from shoprank.models import ranker, retriever
from shoprank.models.encoder import LENGTH_MULTIPLE

DS_TAG = "deepspeed"
STATE_FILE = "train_state.json"
MODEL_DIR = "model"
# A local folder (seen by every node) where, under <run name>/, every worker notes its pid at each
# start and rank 0 every optimizer step it runs, across restarts (a checkpoint's step log keeps
# only the steps before it): what the fault tests read to find a worker to kill and to count
# repeated steps.
TRACE_ENV = "SHOPRANK_TRAIN_TRACE"
# The metric reported with a checkpoint saved between validations. Ray orders checkpoints by
# (order x metric), so the worst finite number ranks it below every validated one in either
# `metric_mode`. Not NaN or inf: Ray saves its checkpoint list as JSON, where they become null,
# and a driver resuming the run then fails sorting the next checkpoint (None x float).
UNVALIDATED = {"max": -sys.float_info.max, "min": sys.float_info.max}


@dataclass(frozen=True)
class Task:
    """What differs between models trained by the loop."""

    build: Callable[[Config], nn.Module]
    # (engine, batch, cfg) -> scalar loss
    loss: Callable[[nn.Module, dict, Config], torch.Tensor]
    # (engine, cfg) -> validation metrics, identical on every rank
    validate: Callable[[object, Config], dict[str, float]]
    # Datasets the loop receives besides "train" (each sharded across workers).
    datasets: tuple[str, ...] = ("valid",)


def _all_gather(local):
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def _autocast(cfg: Config):
    device = ray.train.torch.get_device()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)


@torch.no_grad()
def validate_groups(engine, cfg: Config) -> dict[str, float]:
    """Ranker: AUC, logloss and NDCG/Recall@10 over each user's 1 + sampled candidates."""
    scores, labels = [], []
    batch_groups = max(1, cfg.train.eval_batch_size // cfg.data.eval_candidates)
    shard = ray.train.get_dataset_shard("valid")
    for batch in shard.iter_torch_batches(
        batch_size=batch_groups, device=ray.train.torch.get_device()
    ):
        with _autocast(cfg):
            scores.append(ranker.Ranker(engine.module).score_tokens(batch).cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    gathered = _all_gather((np.concatenate(scores), np.concatenate(labels)))
    s = np.concatenate([g[0] for g in gathered])
    y = np.concatenate([g[1] for g in gathered])
    groups = np.repeat(np.arange(len(s)), s.shape[1])
    return metrics.pointwise_and_ranking(groups, y.ravel(), s.ravel(), ks=(10,))


@torch.no_grad()
def validate_full_catalog(engine, cfg: Config) -> dict[str, float]:
    """Retriever: every worker embeds its share of the catalog, all ranks share the matrix,
    then each user's target is ranked among ALL items (the full-catalog protocol)."""
    model, device = engine.module, ray.train.torch.get_device()
    # The one bi-encoder inference class, around the encoder being trained.
    encoder = retriever.Encoder(model.encoder, None, model.pooling, bf16=cfg.train.bf16)
    rows, embs = [], []
    for batch in ray.train.get_dataset_shard("catalog").iter_torch_batches(
        batch_size=cfg.train.eval_batch_size, device=device
    ):
        embs.append(
            encoder.embed_tokens(batch["item_input_ids"], batch["item_attention_mask"]).cpu()
        )
        rows.append(batch["row"].cpu())
    parts = [p for p in _all_gather((rows, embs)) if p[0]]  # a worker's share may be empty
    order = torch.cat([r for p in parts for r in p[0]]).numpy()
    items = np.empty((len(order), parts[0][1][0].shape[1]), dtype=np.float32)
    items[order] = torch.cat([e for p in parts for e in p[1]]).numpy()
    ranks = []
    for batch in ray.train.get_dataset_shard("valid").iter_torch_batches(
        batch_size=cfg.train.eval_batch_size, device=device
    ):
        ctx = (
            encoder.embed_tokens(batch["ctx_input_ids"], batch["ctx_attention_mask"]).cpu().numpy()
        )
        target = batch["item_rows"][:, 0].cpu().numpy()
        ranks.append(metrics.target_ranks(ctx @ items.T, target))
    all_ranks = np.concatenate([np.concatenate(r) for r in _all_gather(ranks) if r])
    return metrics.ranking_metrics(all_ranks, ks=cfg.eval.ks)


TASKS: dict[str, Task] = {
    "ranker": Task(
        build=ranker.build_ranker,
        loss=lambda m, b, c: ranker.ranker_loss(
            ranker.ranker_logits(m, b), b["labels"], c.train.loss
        ),
        validate=validate_groups,
    ),
    "retriever": Task(
        build=retriever.build_retriever,
        loss=lambda m, b, c: retriever.retriever_loss(m, b),
        validate=validate_full_catalog,
        datasets=("valid", "catalog"),
    ),
}


@dataclass
class StepRecord:
    """One logged training step: what the console prints, the report plots and the export keeps.

    `loss` is the mean over the steps since the previous record; `pairs_per_s` counts every
    worker's (context, item) pairs over that window; `data_wait` is the share of the window's
    wall time the loop spent waiting for its next batch (Ray Data), not computing; `forward`,
    `backward` and `optimizer` the shares spent in each part of the steps (rank 0's).
    """

    step: int
    epoch: int
    loss: float
    lr: float
    pairs_per_s: float
    data_wait: float
    forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0

    def line(self, total_steps: int) -> str:
        return (
            f"step {self.step}/{total_steps} loss={self.loss:.4f} lr={self.lr:.2e} "
            f"pairs/s={self.pairs_per_s:.1f} data wait={100 * self.data_wait:.0f}%"
        )


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    best: float | None = None
    bad_evals: int = 0
    history: list[dict] = field(default_factory=list)  # every validation report
    steps: list[dict] = field(default_factory=list)  # every StepRecord, as dicts
    setup: dict = field(default_factory=dict)  # work_signature of the run
    # Wall seconds (rank 0) in training steps, waiting for data among them, validating and
    # checkpointing.
    timing: dict = field(default_factory=dict)
    # Each restart from a checkpoint: {"step": resumed at, "workers": world size then}.
    resumes: list[dict] = field(default_factory=list)

    def add_time(self, part: str, seconds: float) -> None:
        self.timing[part] = self.timing.get(part, 0.0) + seconds

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, directory: str) -> TrainState:
        with open(os.path.join(directory, STATE_FILE)) as f:
            return cls(**json.load(f))


def work_signature(model: nn.Module, optimizer, cfg: Config, workers: int) -> dict:
    """What a training process computes with: two runs with the same signature do the same work
    (bench/bench_train.py refuses to compare runs whose signatures differ)."""
    targets = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if hasattr(module, "lora_A")
    }
    config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    return {
        "workers": workers,
        "zero_stage": zero_stage(cfg.train, workers),
        "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_targets": sorted(targets),
        "dropout": max((m.p for m in model.modules() if isinstance(m, nn.Dropout)), default=0.0),
        "attention": getattr(config, "_attn_implementation", None),
        "optimizer": f"{type(optimizer).__name__} lr={cfg.train.lr:g}",
        "weight_decay": cfg.train.weight_decay,
        "bf16": cfg.train.bf16,
        "max_length": cfg.model.max_length,
    }


def zero_stage(cfg: TrainConfig, world_size: int) -> int:
    """`train.zero_stage`, except on one worker: there is nothing to shard across, and ZeRO's
    partitioning bookkeeping cost the retriever 15-20% of its steps (bench/bench_train.py)."""
    return cfg.zero_stage if world_size > 1 else 0


def grad_accum(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on `world_size` workers. An elastic run that lost
    workers accumulates more, so that an optimizer step still sees num_workers x batch_size x
    grad_accum groups (exactly when world_size divides num_workers x grad_accum, fewer
    otherwise) and the planned steps, learning-rate schedule and data position stay valid."""
    return max(1, cfg.num_workers * cfg.grad_accum // world_size)


def deepspeed_config(cfg: TrainConfig, total_steps: int, world_size: int = 2) -> dict:
    """The DeepSpeed config for one run: ZeRO stage, bf16 autocast, warmup then linear decay."""
    stage = zero_stage(cfg, world_size)
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": grad_accum(cfg, world_size),
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        # Autocast keeps fp32 master weights; on AMX CPUs and GPUs bf16 matmuls run far faster
        # (train.precision auto: only there, lib/shoprank/precision.py).
        "torch_autocast": {"enabled": cfg.bf16, "dtype": "bfloat16"},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": max(total_steps, 1),
                "warmup_num_steps": max(1, int(cfg.warmup_ratio * total_steps)),
                "warmup_min_lr": 0.0,
                "warmup_max_lr": cfg.lr,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, optimizer, cfg: TrainConfig, total_steps: int, world_size: int):
    """The DeepSpeed engine of one worker. On a single worker its gradient all-reduce is off:
    DeepSpeed would still flatten every gradient into one buffer, "reduce" it over one rank and
    copy it back each step, for the fully fine-tuned retriever 90 MB of fresh pages a step and
    the pipeline 0.80x of a plain loop (RESULTS.md, "Training throughput")."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, total_steps, world_size)
    )
    if world_size == 1:
        engine.enable_backward_allreduce = False
    return engine


def plan_steps(cfg: TrainConfig, train_rows: int, world_size: int) -> tuple[int, int]:
    """Optimizer steps per epoch and in total; every worker computes the same numbers."""
    per_worker = train_rows // world_size
    steps_per_epoch = per_worker // (cfg.batch_size * cfg.grad_accum)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{train_rows} training groups are too few for {world_size} workers x batch "
            f"{cfg.batch_size} x accumulation {cfg.grad_accum}; lower train.batch_size"
        )
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return steps_per_epoch, total


def validation_steps(cfg: TrainConfig, train_rows: int, world_size: int) -> list[int]:
    """The optimizer steps after which the loop validates and checkpoints: every
    `eval_every_steps`, at each epoch's end and at the last step (a sweep's rungs count these)."""
    steps_per_epoch, total = plan_steps(cfg, train_rows, world_size)
    every = cfg.eval_every_steps
    return [
        s
        for s in range(1, total + 1)
        if s % steps_per_epoch == 0 or s == total or (every and s % every == 0)
    ]


def _gathered(engine, zero_stage: int):
    """Full parameters on every rank under ZeRO-3 (else a no-op): avoids empty saved weights."""
    import contextlib

    import deepspeed

    if zero_stage == 3:
        return deepspeed.zero.GatheredParameters(
            list(engine.module.parameters()), modifier_rank=None
        )
    return contextlib.nullcontext()


def save_trainable(engine, directory: str, zero_stage: int, rank: int) -> None:
    """The model in Hugging Face form: a peft adapter (head included) or the full weights."""
    with _gathered(engine, zero_stage):
        if rank == 0:
            engine.module.save_pretrained(directory)


SHUFFLE_WINDOW = 16  # batches read, shuffled and cut together (as a local shuffle buffer)


def length_key(chunk: dict[str, torch.Tensor]) -> torch.Tensor:
    """[n] int64: each row's lengths in LENGTH_MULTIPLE steps, every attention mask (a group's
    longest pair), compared in the order of the masks' names."""
    key = torch.zeros(next(iter(chunk.values())).shape[0], dtype=torch.int64)
    for name in sorted(k for k in chunk if k.endswith("attention_mask")):
        mask = chunk[name].cpu()
        length = mask.reshape(mask.shape[0], -1, mask.shape[-1]).sum(-1).amax(-1)
        steps = -(-length // LENGTH_MULTIPLE)
        key = key * (mask.shape[-1] // LENGTH_MULTIPLE + 2) + steps
    return key


def own_batches(
    shard,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    device,
    group_by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one epoch, the same ones in every run of a config.

    Every rank reads the whole training set and keeps its own slice of each batch of
    `batch_size * world` rows. Rows are shuffled within windows of `SHUFFLE_WINDOW` batches by
    `seed`, windows of a fixed number of rows: Ray's local shuffle buffer and Ray Train's split
    both depend on how rows fall into blocks, which changes from run to run, and two runs of
    one config then trained on different batches and ended up ~0.05 NDCG@10 apart.
    `group_by_length`: the shuffled window is sorted by `length_key` and cut into batches,
    which then come in a shuffled order."""
    rows = batch_size * world
    generator = torch.Generator().manual_seed(seed)
    for chunk in shard.iter_torch_batches(batch_size=rows * SHUFFLE_WINDOW, device=device):
        n = next(iter(chunk.values())).shape[0]
        order = torch.randperm(n, generator=generator)
        starts = torch.arange(0, n - rows + 1, rows)  # a short last batch is dropped
        if group_by_length:
            order = order[torch.sort(length_key(chunk)[order], stable=True).indices]
            starts = starts[torch.randperm(len(starts), generator=generator)]
        for start in starts.tolist():
            take = order[start + rank * batch_size : start + (rank + 1) * batch_size]
            yield {k: v[take.to(v.device)] for k, v in chunk.items()}


def _window() -> dict:
    """What the loop sums between two step records."""
    parts = dict.fromkeys(("wait", "forward", "backward", "optimizer"), 0.0)
    return {"losses": [], "pairs": 0, "started": time.perf_counter(), **parts}


class _Trace:
    """Appends JSON lines under `TRACE_ENV`'s folder when the driver set it (else does nothing):
    workers.jsonl, one line per worker start; steps.jsonl, rank 0's every optimizer step."""

    def __init__(self, folder: str | None, rank: int):
        self.folder, self.rank = folder, rank

    def _write(self, name: str, row: dict) -> None:
        # One short write with O_APPEND: lines from several processes do not interleave.
        with open(os.path.join(self.folder, name), "a") as f:
            f.write(json.dumps(row) + "\n")

    def started(self, world: int, step: int) -> None:
        if self.folder:
            node = ray.get_runtime_context().get_node_id()
            row = {"rank": self.rank, "pid": os.getpid(), "node": node, "world": world}
            self._write("workers.jsonl", {**row, "step": step, "time": time.time()})

    def step(self, step: int) -> None:
        if self.folder and self.rank == 0:
            self._write("steps.jsonl", {"step": step, "pid": os.getpid(), "time": time.time()})


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    console.quiet()  # this is a Ray Train worker process: its own warnings filters
    console.quiet_train_worker()
    cfg = Config.model_validate(config["cfg"])
    if not cfg.train.use_gpu:  # or DeepSpeed warns on every worker that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Imported here, after DS_ACCELERATOR (it initialises accelerator state on import) and
    # before its logger is quietened (its import sets that logger's level).
    import deepspeed  # noqa: F401

    # DeepSpeed's WARNING lines are about itself (e.g. the scheduler read before step 1).
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)

    task = TASKS[config["task"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed)

    # The plan counts optimizer steps at the configured worker count: an elastic run on fewer
    # workers accumulates more micro-batches per step (`grad_accum`) and keeps the same plan.
    planned = cfg.train.num_workers
    steps_per_epoch, total_steps = plan_steps(cfg.train, config["train_rows"], planned)
    validate_at = set(validation_steps(cfg.train, config["train_rows"], planned))
    every = config.get("checkpoint_every")
    accum = grad_accum(cfg.train, world)
    model = task.build(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine = build_engine(model, optimizer, cfg.train, total_steps, world)
    if rank == 0 and zero_stage(cfg.train, world) != cfg.train.zero_stage:
        log(f"one worker: ZeRO stage {cfg.train.zero_stage} has nothing to shard, running stage 0")
    if rank == 0 and world != planned:
        log(f"elastic: {world} of {planned} workers, {accum} micro-batches per optimizer step")

    state = TrainState(setup=work_signature(model, optimizer, cfg, world))
    # The latest checkpoint Ray registered: Ray registers one only once every rank's report has
    # copied its finished folder to storage, so a save cut short is never what comes back here.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=not cfg.lora.enabled)
            state = TrainState.load(d)
            state.setup = work_signature(model, optimizer, cfg, world)
        state.resumes.append({"step": state.step, "workers": world})
        if rank == 0:
            log(f"resumed at step {state.step} (epoch {state.epoch})")
    trace = _Trace(config.get("trace"), rank)
    trace.started(world, state.step)

    def validate_and_checkpoint(train_loss: float, samples_per_s: float) -> bool:
        """Report metrics with a checkpoint; True when early stopping says to stop."""
        began = time.perf_counter()
        engine.eval()
        val = task.validate(engine, cfg)
        engine.train()
        state.add_time("validation_s", time.perf_counter() - began)
        began = time.perf_counter()
        value = val[cfg.train.metric]
        better = state.best is None or (
            value > state.best if cfg.train.metric_mode == "max" else value < state.best
        )
        state.best, state.bad_evals = (value, 0) if better else (state.best, state.bad_evals + 1)
        report = {
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": train_loss,
            "samples_per_s": samples_per_s,
            **{f"val_{k}": v for k, v in val.items()},
        }
        state.history.append(report)
        save_checkpoint(report, began)
        if rank == 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in report.items() if isinstance(v, float))
            log(f"validation at step {state.step}/{total_steps} (epoch {state.epoch}): {shown}")
        patience = cfg.train.early_stopping_patience
        return patience is not None and state.bad_evals >= patience

    def save_checkpoint(report: dict, began: float) -> None:
        """Save engine, model and loop state to a local folder; Ray copies it to storage."""
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=DS_TAG, exclude_frozen_parameters=cfg.lora.enabled)
            save_trainable(engine, os.path.join(d, MODEL_DIR), zero_stage(cfg.train, world), rank)
            # (the checkpoint's own state counts its time up to the save, report included)
            state.add_time("checkpoint_s", time.perf_counter() - began)
            if rank == 0:
                state.save(d)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        # Ray registers a reported checkpoint only when its controller next collects the
        # reports; a failure before that resumes from the one before. Waiting here for the
        # commit (seen: a kill 2 s after the upload of step 8 still resumed at step 6) keeps
        # the steps a failure loses within one checkpoint interval.
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
        )

    def checkpoint_between_validations(train_loss: float, samples_per_s: float) -> None:
        """A resumable checkpoint without validating (`train.checkpoint_every_steps`). Its
        metric is the worst value there is (`UNVALIDATED`): Ray keeps it only while it is the
        latest, and it is never among the best kept."""
        began = time.perf_counter()
        report = {
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": train_loss,
            "samples_per_s": samples_per_s,
            "validated": False,
            f"val_{cfg.train.metric}": UNVALIDATED[cfg.train.metric_mode],
        }
        save_checkpoint(report, began)
        if rank == 0:
            log(f"checkpoint at step {state.step}/{total_steps} (no validation)")

    train_shard = ray.train.get_dataset_shard("train")
    stop = False
    while state.step < total_steps and not stop:
        # On resume mid-epoch, skip the micro-batches this epoch already trained on.
        skip = (state.step - state.epoch * steps_per_epoch) * accum
        losses, pairs, started = [], 0, time.perf_counter()  # since the last validation
        window = _window()
        waited_from = time.perf_counter()
        for batch in own_batches(
            train_shard,
            cfg.train.batch_size,
            rank,
            world,
            seed=cfg.run.seed + state.epoch,
            device=ray.train.torch.get_device(),
            group_by_length=cfg.train.group_by_length,
        ):
            t0 = time.perf_counter()
            window["wait"] += t0 - waited_from
            if skip > 0:
                skip -= 1
                waited_from = time.perf_counter()
                continue
            loss = task.loss(engine, batch, cfg)
            t1 = time.perf_counter()
            engine.backward(loss)
            t2 = time.perf_counter()
            engine.step()
            t3 = time.perf_counter()
            window["forward"] += t1 - t0
            window["backward"] += t2 - t1
            window["optimizer"] += t3 - t2
            state.add_time("train_s", t3 - waited_from)
            state.add_time("data_wait_s", t0 - waited_from)
            losses.append(loss.item())
            window["losses"].append(losses[-1])
            pairs += batch["labels"].numel()
            window["pairs"] += batch["labels"].numel()
            if engine.global_steps == state.step:
                waited_from = time.perf_counter()
                continue  # inside a gradient-accumulation window
            state.step = engine.global_steps
            state.epoch = state.step // steps_per_epoch  # where a resume starts reading
            trace.step(state.step)
            now = time.perf_counter()
            rate = pairs * world / (now - started)
            if state.step % cfg.train.log_every_steps == 0 or state.step in validate_at:
                elapsed = now - window["started"]
                record = StepRecord(
                    step=state.step,
                    epoch=state.step // steps_per_epoch,
                    loss=float(np.mean(window["losses"])),
                    lr=float(engine.get_lr()[0]),
                    pairs_per_s=window["pairs"] * world / elapsed,
                    data_wait=window["wait"] / elapsed,
                    forward=window["forward"] / elapsed,
                    backward=window["backward"] / elapsed,
                    optimizer=window["optimizer"] / elapsed,
                )
                state.steps.append(asdict(record))
                if rank == 0:
                    log(record.line(total_steps))
                window = _window()
            end_of_epoch = state.step % steps_per_epoch == 0
            if state.step in validate_at:
                stop = validate_and_checkpoint(float(np.mean(losses)), rate)
                losses, pairs, started = [], 0, time.perf_counter()
                window["started"] = time.perf_counter()  # validation time is not training
            elif every and state.step % every == 0:
                checkpoint_between_validations(float(np.mean(losses)), rate)
                window["started"] = time.perf_counter()
            if stop or end_of_epoch or state.step >= total_steps:
                break
            waited_from = time.perf_counter()


def fit(
    cfg: Config,
    task: str,
    datasets: dict[str, ray.data.Dataset],
    train_rows: int,
    name: str | None = None,
    storage: str | None = None,
    callbacks: list | None = None,
):
    """Run (or resume, when the run's name already has checkpoints) one training run.

    `datasets` holds "train" and the task's validation datasets (see `Task.datasets`). The run
    is `run.name` under `run.storage` unless `name` / `storage` say otherwise (sweep trials);
    `callbacks` are Ray Train callbacks (a sweep's TuneReportCallback).

    A failed worker or node restarts the worker group from the latest checkpoint, up to
    `train.max_failures` times. Under a sweep, Tune retries the trial instead
    (`sweep.max_failures`), and checkpoints come at validations only: Tune takes every report as
    a result, and ASHA counts results as its clock.
    """
    missing = [d for d in ("train", *TASKS[task].datasets) if d not in datasets]
    if missing:
        raise ValueError(f"training a {task} needs datasets {missing}")
    metric = f"val_{cfg.train.metric}"
    t = cfg.train
    tuned = _under_tune(callbacks)
    elastic = t.min_workers is not None and t.min_workers < t.num_workers
    trace = os.environ.get(TRACE_ENV)
    if trace:  # one folder per run: runs of one driver may go at once
        trace = os.path.join(trace, name or cfg.run.name)
        os.makedirs(trace, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "task": task,
            "train_rows": train_rows,
            "checkpoint_every": None if tuned else t.checkpoint_every_steps,
            "trace": trace,
        },
        scaling_config=ScalingConfig(
            num_workers=(t.min_workers, t.num_workers) if elastic else t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name or cfg.run.name,
            storage_path=storage or uri(cfg.run.storage),
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=0 if tuned else t.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=cfg.train.metric_mode,
            ),
        ),
        datasets=datasets,
        # "train" goes whole to every worker, which keeps its own share (`own_batches`).
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[d for d in datasets if d != "train"]
        ),
    )
    return trainer.fit()


def _under_tune(callbacks: list | None) -> bool:
    if not callbacks:
        return False
    from ray.tune.integration.ray_train import TuneReportCallback

    return any(isinstance(c, TuneReportCallback) for c in callbacks)


def best_checkpoint(result, cfg: Config):
    """The kept checkpoint with the best validation metric, and its metrics. Checkpoints saved
    between validations (`train.checkpoint_every_steps`) are never chosen."""
    metric = f"val_{cfg.train.metric}"
    sign = 1 if cfg.train.metric_mode == "max" else -1
    validated = [cm for cm in result.best_checkpoints if cm[1].get("validated", True)]
    ranked = sorted(validated, key=lambda cm: sign * cm[1][metric], reverse=True)
    if not ranked:
        raise RuntimeError(f"run {cfg.run.name} produced no validated checkpoint")
    return ranked[0]


def saved_state(checkpoint) -> TrainState:
    """The loop's state saved with a checkpoint: validations and logged steps up to it."""
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as d:
        return TrainState.load(d)


def run_history(result) -> list[dict]:
    """Every validation report of the run, read from its latest checkpoint."""
    return saved_state(result.checkpoint).history
