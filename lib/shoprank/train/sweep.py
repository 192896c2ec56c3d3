"""Hyper-parameter sweeps: Ray Tune over Ray Train.

A Tune trial is a small function (`train_trial`) that starts one `TorchTrainer` run of the shared
training loop with the trial's values. The run is named after the trial id, so a retried trial
resumes from its last checkpoint, and `TuneReportCallback` forwards every validation report to
Tune, where Optuna proposes the next values and ASHA stops trials that trail the others at the
same validation. The data is prepared once on the driver and shared by every trial.
"""

from __future__ import annotations

import itertools
import json
import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from shoprank.config import Config, ConfigError, with_values
from shoprank.console import log
from shoprank.data.read import resolve, uri
from shoprank.evaluation import report
from shoprank.registry import Registry, Version
from shoprank.tracking import Tracker, metric_name, redact
from shoprank.train.loop import STATE_FILE, fit, plan_steps, validation_steps

TUNE_DIR = "tune"  # the Tune experiment, under the run's storage folder
TRIALS_DIR = "trials"  # one Ray Train run per trial, named by trial id
# A trial's own process only waits on its Train run, so it holds no CPU: otherwise a trial of
# 2 one-CPU workers could never start on a 2-CPU machine. Ray needs a non-empty request, hence
# a little memory.
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}


def _value(cfg: Config, key: str) -> Any:
    section, leaf = key.split(".", 1)
    return getattr(getattr(cfg, section), leaf)


def param_space(cfg: Config) -> dict:
    """The `sweep.space` as Tune distributions, keyed by dotted config path."""
    if not cfg.sweep.space:
        raise ConfigError(
            "sweep.space is empty: give at least one key, e.g. "
            "sweep.space={train.lr: {loguniform: [1e-5, 1e-3]}}"
        )
    space = {}
    for key, dim in cfg.sweep.space.items():
        if dim.loguniform:
            space[key] = tune.loguniform(*dim.loguniform)
        elif dim.uniform:
            space[key] = tune.uniform(*dim.uniform)
        else:
            space[key] = tune.choice(dim.choice)
    return space


def start_points(cfg: Config) -> list[dict]:
    """Trials run before the search algorithm's own: the config's values, then `sweep.points`
    (keys they leave out keep the config's values)."""
    defaults = {key: _value(cfg, key) for key in cfg.sweep.space}
    points = [defaults] if cfg.sweep.start_from_config else []
    for given in cfg.sweep.points:
        unknown = set(given) - set(cfg.sweep.space)
        if unknown:
            raise ConfigError(f"sweep.points: {sorted(unknown)} not in sweep.space; add them")
        typed = with_values(cfg, given)  # YAML reads 1e-4 as a string: the schema fixes that
        points.append({key: _value(typed, key) for key in cfg.sweep.space})
    for point in points:
        for key, value in point.items():
            dim = cfg.sweep.space[key]
            bounds = dim.loguniform or dim.uniform
            if dim.choice is not None and value not in dim.choice:
                raise ConfigError(
                    f"sweep: {key}={value!r} (the config's value or a point) is not one of "
                    f"its choices {dim.choice}; add it to the choices or change the value"
                )
            if bounds and not bounds[0] <= value <= bounds[1]:
                raise ConfigError(
                    f"sweep: {key}={value!r} (the config's value or a point) is outside "
                    f"{list(bounds)}; widen the range or change the value"
                )
    return points


def data_variants(cfg: Config) -> list[dict]:
    """Every combination of the searched `data.*` keys (each must be a choice): trials that
    differ in those need their own training examples, built once per combination up front."""
    keys = [k for k in cfg.sweep.space if k.startswith("data.")]
    for key in keys:
        if cfg.sweep.space[key].choice is None:
            raise ConfigError(
                f"sweep.space.{key}: data keys change the training examples, which are built "
                "before the sweep; give them as a choice, e.g. {choice: [1, 3, 7]}"
            )
    values = [cfg.sweep.space[k].choice for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def variant_key(cfg: Config) -> str:
    return json.dumps({k: _value(cfg, k) for k in cfg.sweep.space if k.startswith("data.")})


def concurrency(cfg: Config, resources: dict[str, float]) -> int:
    """Trials at once: as set, else as many as the cluster's CPUs (or GPUs) hold."""
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    t = cfg.train
    kind, per_trial = (
        ("GPU", t.num_workers) if t.use_gpu else ("CPU", t.num_workers * t.cpus_per_worker)
    )
    return max(1, int(resources.get(kind, 0) // per_trial))


def train_trial(params: dict, *, base: dict, variants: dict, trials_dir: str) -> None:
    """One Tune trial: the shared training loop with this trial's values, reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = with_values(Config.model_validate(base), params)
    datasets, rows = variants[variant_key(cfg)]
    fit(
        cfg,
        cfg.model.kind,
        datasets,
        rows,
        name=tune.get_context().get_trial_id(),
        storage=trials_dir,
        callbacks=[TuneReportCallback()],
    )


def earlier_trials(cfg: Config) -> list[tuple[dict, float]]:
    """(values, best metric) of every trial of the `sweep.warm_start` sweeps that reached a
    validation inside this sweep's space; the others are counted and left out."""
    if cfg.sweep.warm_start and cfg.sweep.algorithm != "optuna":
        raise ConfigError("sweep.warm_start needs sweep.algorithm=optuna (random has no memory)")
    fs, _ = resolve(cfg.run.storage)
    found, outside = [], 0
    for name in cfg.sweep.warm_start:
        path = _join(cfg.run.storage, name, "sweep", "results.parquet")
        try:
            rows = pq.read_table(path, filesystem=fs).to_pylist()
        except (FileNotFoundError, OSError) as err:
            raise ConfigError(
                f"sweep.warm_start: {name!r} has no {path} ({err}); give the run.name of a "
                "finished sweep under run.storage"
            ) from err
        for row in rows:
            if not math.isfinite(row["best"]):
                continue
            values = {k: row.get(k) for k in cfg.sweep.space}
            if all(_inside(cfg.sweep.space[k], v) for k, v in values.items()):
                found.append((values, float(row["best"])))
            else:
                outside += 1
    if cfg.sweep.warm_start:
        print(
            f"[shoprank] warm start: {len(found)} earlier trials from {cfg.sweep.warm_start}"
            + (f"; {outside} outside this space left out" if outside else "")
        )
    return found


def _inside(dim, value) -> bool:
    if value is None:
        return False
    if dim.choice is not None:
        return value in dim.choice
    lo, hi = dim.loguniform or dim.uniform
    return lo <= value <= hi


class WarmOptunaSearch(OptunaSearch):
    """Optuna TPE told the results of earlier trials before it suggests anything. They are
    added once Tune hands over the search space; a restored search already holds them."""

    def __init__(self, earlier: list[tuple[dict, float]], **kwargs):
        super().__init__(**kwargs)
        self._earlier = earlier

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        fresh = not self._space
        ok = super().set_search_properties(metric, mode, config, **spec)
        if ok and fresh:
            for values, best in self._earlier:
                self.add_evaluated_point(values, best)
        return ok


def _join(root: str, *parts: str) -> str:
    return posixpath.join(uri(root), *parts)


def run(cfg: Config, variants: dict[str, tuple[dict, int]]) -> tune.ResultGrid:
    """Run the sweep, or resume it when `run.name` already holds one (finished trials stay)."""
    metric, mode = f"val_{cfg.train.metric}", cfg.train.metric_mode
    trainable = tune.with_resources(
        tune.with_parameters(
            train_trial,
            base=cfg.model_dump(mode="json"),
            variants=variants,
            trials_dir=_join(cfg.run.storage, cfg.run.name, TRIALS_DIR),
        ),
        DRIVER_RESOURCES,
    )
    path = _join(cfg.run.storage, cfg.run.name, TUNE_DIR)
    if tune.Tuner.can_restore(path):
        log(f"resuming the sweep in {path}")
        return tune.Tuner.restore(path, trainable, resume_errored=True).fit()

    if cfg.sweep.algorithm == "optuna":
        earlier = earlier_trials(cfg)
        # TPE samples at random until it has 10 trials; with the earlier sweep's seed it would
        # draw that sweep's values again (seen: its winner, retrained), so shift the seed.
        search = WarmOptunaSearch(
            earlier,
            points_to_evaluate=start_points(cfg) or None,
            seed=cfg.run.seed + len(earlier),
        )
    else:
        search = tune.search.BasicVariantGenerator(
            points_to_evaluate=start_points(cfg) or None, random_state=cfg.run.seed
        )
    # ASHA's clock is the trial's number of validations; a full trial has max_t of them.
    world = cfg.train.num_workers
    max_t = max(len(validation_steps(cfg.train, rows, world)) for _, rows in variants.values())
    scheduler = (
        tune.schedulers.ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=min(cfg.sweep.grace_period, max_t),
            reduction_factor=cfg.sweep.reduction_factor,
        )
        if cfg.sweep.scheduler == "asha"
        else tune.schedulers.FIFOScheduler()
    )
    at_once = concurrency(cfg, ray.cluster_resources())
    print(
        f"[shoprank] sweep: {cfg.sweep.num_samples} trials, {at_once} at a time, {max_t} "
        f"validations each at most, {cfg.sweep.algorithm} + {cfg.sweep.scheduler}"
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=search,
            scheduler=scheduler,
            num_samples=cfg.sweep.num_samples,
            max_concurrent_trials=at_once,
            time_budget_s=cfg.sweep.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=_join(cfg.run.storage, cfg.run.name),
            failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
        ),
    )
    return tuner.fit()


def trial_id(result: tune.Result) -> str:
    """Tune's trial id: also the name of the trial's Ray Train run under trials/."""
    if result.metrics and "trial_id" in result.metrics:
        return str(result.metrics["trial_id"])
    return posixpath.basename(result.path)  # a trial that never reported


def trial_values(cfg: Config, result: tune.Result) -> dict[str, Any]:
    """The searched values of a trial. A restored trial that never reported has no
    `result.config`; its params.json in the trial folder still holds them."""
    config = result.config
    if config is None:
        fs, path = result.filesystem, posixpath.join(result.path, "params.json")
        with fs.open_input_stream(path) as f:
            config = json.loads(f.read())
    return {k: config[k] for k in cfg.sweep.space}


def trial_history(result: tune.Result) -> list[dict]:
    """A trial's validation reports in order, as the training loop made them."""
    df = result.metrics_dataframe
    if df is None or df.empty:
        return []
    keep = [
        c
        for c in df.columns
        if c in ("epoch", "step", "train_loss", "samples_per_s") or c.startswith("val_")
    ]
    return [
        {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        for row in df[keep].to_dict("records")
    ]


def results_table(cfg: Config, grid: tune.ResultGrid, variants: dict) -> pa.Table:
    """One row per trial: its values, how it ended, its best and last validation metric."""
    metric, sign = f"val_{cfg.train.metric}", 1 if cfg.train.metric_mode == "max" else -1
    rows = []
    for result in grid:
        searched = trial_values(cfg, result)
        trial_cfg = with_values(cfg, searched)
        history = trial_history(result)
        row: dict[str, Any] = {"trial": trial_id(result), **searched}
        _, total = plan_steps(
            trial_cfg.train, variants[variant_key(trial_cfg)][1], trial_cfg.train.num_workers
        )
        values = [h[metric] for h in history if metric in h and math.isfinite(h[metric])]
        best_i = max(range(len(values)), key=lambda i: sign * values[i]) if values else None
        row.update(
            status=_status(cfg, result, history, total),
            validations=len(history),
            steps=history[-1]["step"] if history else 0,
            planned_steps=total,
            best=values[best_i] if values else float("nan"),
            best_step=history[best_i]["step"] if values else None,
            last=values[-1] if values else float("nan"),
            train_loss=history[best_i]["train_loss"] if values else float("nan"),
            time_s=float(result.metrics.get("time_total_s", float("nan")))
            if result.metrics
            else float("nan"),
            checkpoint=_best_checkpoint_path(result, metric, sign),
        )
        rows.append(row)
    rows.sort(key=lambda r: -sign * r["best"] if math.isfinite(r["best"]) else math.inf)
    return pa.Table.from_pylist(rows)


def _status(cfg: Config, result: tune.Result, history: list[dict], total: int) -> str:
    if result.error is not None:
        return "error"
    if not history:
        return "stopped before its first validation"  # by the time budget
    if history[-1]["step"] >= total:
        return "completed"
    metric, sign = f"val_{cfg.train.metric}", 1 if cfg.train.metric_mode == "max" else -1
    best, bad = None, 0
    for h in history:
        if best is None or sign * h[metric] > sign * best:
            best, bad = h[metric], 0
        else:
            bad += 1
    patience = cfg.train.early_stopping_patience
    if patience is not None and bad >= patience:
        return "early stop (patience)"
    return "stopped early"  # by ASHA, or by the sweep's time budget


def _best_checkpoint_path(result: tune.Result, metric: str, sign: int) -> str | None:
    df = result.metrics_dataframe
    if df is None or df.empty or "checkpoint_path" not in df or metric not in df:
        return None
    df = df.dropna(subset=["checkpoint_path", metric])
    if df.empty:
        return None
    return str(df.loc[(sign * df[metric]).idxmax(), "checkpoint_path"])


@dataclass(frozen=True)
class Trial:
    """One finished trial, ready to export: its table row, its config and history."""

    row: dict
    cfg: Config
    history: list[dict]

    @property
    def metrics(self) -> dict:
        """The validation report of its best checkpoint."""
        return next(h for h in self.history if h["step"] == self.row["best_step"])


def pick(cfg: Config, table: pa.Table, grid: tune.ResultGrid, which: str = "best") -> Trial | None:
    """`which` = "best": the winner; "default": the trial that ran the config's own values
    (sweep.start_from_config), if it left a checkpoint."""
    rows = [r for r in table.to_pylist() if r["checkpoint"] and math.isfinite(r["best"])]
    if which == "default":
        own = {k: _value(cfg, k) for k in cfg.sweep.space}
        rows = [r for r in rows if all(r[k] == own[k] for k in own)]
        if not cfg.sweep.start_from_config or not rows:
            return None
    elif not rows:
        raise RuntimeError(f"sweep {cfg.run.name}: no trial produced a checkpoint")
    row = rows[0]  # the table is sorted best first
    result = next(r for r in grid if trial_id(r) == row["trial"])
    trial_cfg = with_values(cfg, {k: row[k] for k in cfg.sweep.space})
    return Trial(row, trial_cfg, trial_history(result))


def published(cfg: Config, trial: Trial) -> Version | None:
    """The registry version that already holds this checkpoint of this sweep, if any: running
    a finished sweep's command again rewrites its report but registers nothing new."""
    registry = Registry(cfg.registry.root)
    name = cfg.registry.model or cfg.run.name
    if name not in registry.models():
        return None
    for version in registry.versions(name):
        done = version.metadata.get("sweep") or {}
        if done.get("name") == cfg.run.name and done.get("checkpoint") == trial.row["checkpoint"]:
            return version
    return None


def checkpoint(cfg: Config, path: str) -> ray.train.Checkpoint:
    fs, _ = resolve(cfg.run.storage)
    return ray.train.Checkpoint(path, filesystem=fs)


def write_results(cfg: Config, table: pa.Table, grid: tune.ResultGrid, out: Path) -> Path:
    """results.parquet, results.md (the table) and report.md with plots under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "results.parquet")
    metric = f"val_{cfg.train.metric}"
    columns = [
        "trial",
        *cfg.sweep.space,
        "status",
        "validations",
        "steps",
        "best",
        "best_step",
        "last",
        "time_s",
    ]
    md = _markdown(table.select(columns).to_pylist(), columns)
    (out / "results.md").write_text(md + "\n")
    rows = table.to_pylist()
    images = {}
    for key, dim in cfg.sweep.space.items():
        others = [k for k in cfg.sweep.space if k != key and cfg.sweep.space[k].choice]
        group_by = others[0] if others else None
        groups: dict[str, tuple[list, list, list]] = {}
        for r in rows:
            if not math.isfinite(r["best"]):
                continue
            name = f"{group_by}={r[group_by]}" if group_by else ""
            xs, ys, full = groups.setdefault(name, ([], [], []))
            xs.append(r[key] if dim.choice is None else str(r[key]))
            ys.append(r["best"])
            full.append(r["status"] == "completed")
        images[f"{metric} against {key} (hollow: stopped early)"] = report.scatter_plot(
            groups,
            key,
            f"best {metric}",
            f"sweep {cfg.run.name}",
            out / f"by_{key}.png",
            logx=dim.loguniform is not None,
        )
    curves = {}
    for result in grid:
        history = trial_history(result)
        if history and metric in history[0]:
            curves[trial_id(result)] = ([h["step"] for h in history], [h[metric] for h in history])
    images["Validation curves (trials stopped early end sooner)"] = report.curve_plot(
        curves, "optimizer step", metric, "every trial", out / "curves.png"
    )
    statuses = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
    summary = (
        f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}); "
        f"metric {metric} ({cfg.train.metric_mode}) on the validation split, best over each "
        f"trial's validations; search {cfg.sweep.algorithm}, scheduler {cfg.sweep.scheduler}."
    )
    sections = [("Summary", summary), ("Trials, best first", md)]
    path = report.write_report(out, f"shoprank sweep: {cfg.run.name}", sections, images)
    track(cfg, table, grid, out)
    return path


def track(cfg: Config, table: pa.Table, grid: tune.ResultGrid, out: Path) -> None:
    """The sweep as an MLflow run (its config, its winner, the sweep report) with one run nested
    under it per trial: the trial's config (its searched values included), its logged steps and
    validations at their steps, its best and its status. Logged from what the trials saved, so
    a resumed sweep logs each point once."""
    metric, rows = f"val_{cfg.train.metric}", table.to_pylist()
    with Tracker.open(cfg, "sweep", announce=False) as parent:
        if not parent.run_id:
            return
        parent.log_artifacts(out, "sweep")
        winner = next((r for r in rows if math.isfinite(r["best"])), None)
        if winner:
            parent.set_tags({"winner": winner["trial"]})
            parent.log_metrics([(f"best/{metric_name(metric[4:])}", winner["best"], 0)])
        results = {trial_id(r): r for r in grid}
        for row in rows:
            result = results[row["trial"]]
            trial = Tracker.open(
                with_values(cfg, {k: row[k] for k in cfg.sweep.space}),
                "trial",
                key=f"{cfg.run.name}/{row['trial']}",
                name=f"{cfg.run.name} {row['trial']}",
                parent=parent,
                announce=False,
            )
            trial.set_tags({"trial": row["trial"], "status": row["status"]})
            trial.log_training(_logged_steps(cfg, result), trial_history(result))
            trial.log_metrics(
                [(f"best/{metric_name(metric[4:])}", row["best"], 0)]
                + ([("best/step", row["best_step"], 0)] if row["best_step"] is not None else [])
                + [("time_s", row["time_s"], 0)]
            )
            trial.finish("FAILED" if row["status"] == "error" else "FINISHED")
        log(
            f"MLflow run {parent.run_id} (the sweep, {len(rows)} trial runs nested) in "
            f"experiment {cfg.tracking.experiment!r} at {redact(parent.uri)}"
        )


def _logged_steps(cfg: Config, result: tune.Result) -> list[dict]:
    """A trial's step records, from the loop state saved in its latest checkpoint (Ray keeps
    the latest whatever its metric): that file alone, not the whole checkpoint."""
    df = result.metrics_dataframe
    if df is None or df.empty or "checkpoint_path" not in df:
        return []
    paths = df["checkpoint_path"].dropna()
    if paths.empty:
        return []
    fs, _ = resolve(cfg.run.storage)
    with fs.open_input_stream(posixpath.join(str(paths.iloc[-1]), STATE_FILE)) as f:
        return json.loads(f.read())["steps"]


def _markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if not math.isfinite(v) else f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.4f}"
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
