"""Retraining: production trained further on the days newer than its snapshot, judged on the
newest day, promoted through the registry's gate (jobs/retrain.py runs it; so does every night
of bench/bench_loop.py).

`retrain(cfg, out)`, in order:

1. Hold the model's retraining lock (`Registry.hold`): a second run at the same time is refused
   (`Refused`) and changes nothing.
2. Production and its snapshot: the newest day it was trained on, as its registry version
   records it (`days.trained_through`; a version registered by jobs/train.py records none:
   `retrain.since` gives it).
3. The day partitions (`dt=YYYY-MM-DD/`) of `retrain.events` (the shop's events and the Serve
   app's `impressions_dir`), validated as every job's input. The newest day is held out; the
   `retrain.window_days` before it are trained on; `retrain.history_days` before those give
   users' histories only. Nothing new to train on (no day after the snapshot but the held-out
   one): production is kept, and the run says so.
4. Example groups (with `data.shown_negatives`, a request's shown-not-clicked items are its
   negatives) and training from production's weights (`model.name` = its registry folder;
   LoRA, when on, is merged into them at export), or with `retrain.start_from=base` from the
   pretrained `model.name` (a full retraining on the window). Validation during training reads the
   newest day, so the last checkpoint is exported, never the "best" one.
5. Candidate and production scored on the newest day's groups, like with like
   (evaluation/newest_day.py); the drift of the newest day from the window
   (evaluation/drift.py); a Markdown report with plots.
6. The candidate registered (its days, metrics, parent) and promoted through the gate on
   `heldout_<retrain.metric>` with `registry.margin`, production's value measured on the same
   groups; with `retrain.confidence`, the margin grows by the half-width of the paired
   interval of their per-group difference: a gain must stand out of the day's noise. The
   Serve app follows the production alias and swaps the new version in by itself.

A failure at any step leaves production as it was (the gate is the only thing that moves it).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.expressions import col

from shoprank.config import Config
from shoprank.console import log
from shoprank.data import read
from shoprank.data.contract import SERVED_EVENTS_SCHEMA
from shoprank.data.examples import example_groups, first_by_user_hash
from shoprank.data.load import counts_table, load_validated
from shoprank.data.outcomes import join_logged
from shoprank.data.outcomes import summary as feedback_summary
from shoprank.evaluation import report
from shoprank.evaluation.baselines import fit_baselines, train_pairs
from shoprank.evaluation.drift import count_events, drift_report
from shoprank.evaluation.metrics import paired_interval
from shoprank.evaluation.newest_day import COLUMNS, score_models, split_by_day
from shoprank.evaluation.sampled import with_keys
from shoprank.evaluation.scorers import CrossEncoderScorer, collect_scores, ranker_precision
from shoprank.models.export_meta import METADATA
from shoprank.registry import PRODUCTION, Registry, RegistryError, Version

LOCK = "retrain"  # Registry.hold's purpose
_DAY = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")


class Refused(RuntimeError):
    """Another retraining of the same model holds the lock: this one did nothing."""


@dataclass
class Outcome:
    """What a retraining did, and why."""

    status: str  # "promoted", "kept" (the gate said no), "nothing new"
    reason: str
    model: str
    production: int | None  # the production version after the run
    candidate: int | None = None  # the version registered, if any
    days: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # model -> metrics on the newest day
    drift: dict = field(default_factory=dict)
    report: str | None = None
    seconds: float = 0.0
    # The groups trained on and judged, and the gate's paired difference (gain, half_width).
    judged: dict = field(default_factory=dict)
    # The app's /feedback outcomes: joined, and those left out by why (data/outcomes.py).
    feedback: dict = field(default_factory=dict)

    def line(self) -> str:
        """The one line a scheduler's log needs."""
        if self.status == "promoted":
            return f"promoted {self.model} v{self.candidate} to production: {self.reason}"
        return f"kept production: {self.reason}"


def day_partitions(roots: list[str]) -> dict[str, list[str]]:
    """day -> its `dt=YYYY-MM-DD` folders under the roots (local folders or URIs); a root
    that does not exist yet gives none."""
    days: dict[str, list[str]] = {}
    for root in roots:
        fs, base = read.resolve(root)
        kind = fs.get_file_info(base).type
        if kind == pafs.FileType.NotFound:  # e.g. an app that has not served yet
            log(f"retrain.events: {root} does not exist (yet): no days from it")
            continue
        if kind != pafs.FileType.Directory:
            raise FileNotFoundError(
                f"retrain.events: {root} is not a folder; give events folders holding "
                "dt=YYYY-MM-DD/ partitions (the shop's events, the app's impressions_dir)"
            )
        for info in fs.get_file_info(pafs.FileSelector(base)):
            m = _DAY.match(info.base_name)
            if m and info.type == pafs.FileType.Directory:
                where = info.path if "://" not in root else f"{root.rstrip('/')}/{m.group(0)}"
                days.setdefault(m.group(1), []).append(where)
    return dict(sorted(days.items()))


def trained_through(version: Version | None, since: date | None) -> str | None:
    """The newest day a version was trained on: what its registry metadata records, else
    `retrain.since`."""
    if version is None:
        return None
    recorded = (version.metadata.get("days") or {}).get("trained_through")
    if recorded:
        return recorded
    if since is not None:
        return since.isoformat()
    raise ValueError(
        f"{version.name} v{version.version} does not record the newest day it was trained on "
        "(it was registered by jobs/train.py, not by a retraining): give it once as "
        "retrain.since=YYYY-MM-DD, the last dt= partition it was trained on"
    )


def _uniform(batch: pa.Table) -> pa.Table:
    """Every source's rows in one schema (the served-events columns, absent ones null): the
    shop's events and the app's log have different optional columns."""
    n, have = batch.num_rows, set(batch.column_names)
    return pa.table(
        {
            f.name: batch[f.name].cast(f.type) if f.name in have else pa.nulls(n, f.type)
            for f in SERVED_EVENTS_SCHEMA
        },
        schema=SERVED_EVENTS_SCHEMA,
    )


def start_weights(start_from: str, production_dir: str | None, base_model: str) -> str:
    """The weights a candidate trains from: production's folder unless `retrain.start_from`
    asks for the base model, or there is no production yet."""
    return production_dir if production_dir and start_from == "production" else base_model


def _local_folder(registry: Registry, version: Version, out: Path) -> str:
    """A folder that loaders can read: the version itself, or its download (object stores)."""
    if registry.local:
        return version.uri
    folder = out / f"{version.name}-v{version.version:04d}"
    if not folder.exists():
        registry.download(version.name, version.version, str(folder))
    return str(folder)


def retrain(cfg: Config, out: Path) -> Outcome:
    """One retraining run of `cfg.registry.model` (default `run.name`); see the module doc.
    Raises `Refused` when another run holds the lock; any other error leaves production as
    it was."""
    registry = Registry(cfg.registry.root)
    name = cfg.registry.model or cfg.run.name
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(registry.hold(name, LOCK))
        except RegistryError as err:
            raise Refused(str(err)) from None
        return _retrain(cfg, Path(out), registry, name)


def _retrain(cfg: Config, out: Path, registry: Registry, name: str) -> Outcome:
    started = time.perf_counter()
    r = cfg.retrain
    prod_n = registry.aliases(name).get(PRODUCTION)
    production = registry.get(name, prod_n) if prod_n is not None else None
    through = trained_through(production, r.since)

    # Days: the held-out newest, the window before it, older ones for histories.
    roots = r.events or [cfg.data.events]
    days = day_partitions(roots)
    if not days:
        raise FileNotFoundError(
            f"retrain.events={roots}: no dt=YYYY-MM-DD partitions there; give the folders "
            "the shop's events and the app's impressions_dir are written to"
        )
    newest = max(days)
    earlier = [d for d in days if d < newest]
    train_days = earlier[-r.window_days :]
    new_days = [d for d in days if through is None or d > through]
    plan = {
        "production_trained_through": through,
        "new": new_days,
        "held_out": newest,
        "window": [train_days[0], train_days[-1]] if train_days else None,
    }
    kept = None
    if not new_days:
        kept = f"no day partition after {through}, the newest production v{prod_n} was trained on"
    elif not [d for d in train_days if through is None or d > through]:
        kept = (
            f"the only new day, {newest}, is held out to judge a candidate; no new day to train "
            f"on before it (production v{prod_n} was trained through {through})"
        )
    if kept:
        log(f"retrain {name}: {kept}")
        return Outcome("nothing new", kept, name, prod_n, days=plan, seconds=_since(started))
    first = train_days[0]
    oldest = (date.fromisoformat(first) - timedelta(days=r.history_days)).isoformat()
    read_days = [d for d in days if d >= oldest]
    plan.update(history=[read_days[0], first] if read_days[0] < first else None)
    log(
        f"retrain {name}: production "
        + (f"v{prod_n} trained through {through}" if production else "none yet")
        + f"; new days {', '.join(new_days)}; training on {first}..{train_days[-1]}, "
        f"judged on {newest}"
    )

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    run_dir = out / f"retrain-{newest}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    prod_dir = _local_folder(registry, production, run_dir) if production else None
    base = start_weights(r.start_from, prod_dir, cfg.model.name)
    tree = cfg.model_dump(mode="json")
    tree["model"]["name"] = base
    tree["train"]["early_stopping_patience"] = None  # validation reads the held-out day
    train_cfg = Config.model_validate(tree)

    # Data: the days read, validated (bad rows quarantined and counted), split by day.
    phases = _Phases()
    dirs = [folder for d in read_days for folder in days[d]]
    # /feedback's outcomes (any replica logged them) joined to their answers' impressions.
    joined, feedback = join_logged(roots, read_days, str(run_dir / "feedback"), r.late_after_s)
    (run_dir / "feedback.json").write_text(json.dumps(feedback, indent=2))
    log(f"retrain {name}: {feedback_summary(feedback)}")
    dirs += joined
    data = load_validated(cfg.data, str(run_dir / "quarantine"), events_from=dirs)
    log("data quality:\n" + counts_table(data.counts))
    events = data.events.map_batches(_uniform, batch_format="pyarrow")
    events = split_by_day(events, newest, first).materialize()
    groups = example_groups(events, data.catalog, cfg.data, cfg.run.seed)
    train = groups.filter(expr=col("split") == "train").random_shuffle(seed=cfg.run.seed)
    if cfg.data.max_train_positives:
        train = train.limit(cfg.data.max_train_positives)
    train = train.materialize()
    test = with_keys(
        first_by_user_hash(groups.filter(expr=col("split") == "test"), cfg.data.test_users)
    ).materialize()
    n_train, n_test = train.count(), test.count()
    if not n_test:
        raise ValueError(
            f"the newest day, {newest}, has no positive to judge a candidate on"
            + (
                " among explored answers (data.explored_only): serve with the app's "
                "explore_share above 0, or set data.explored_only=false"
                if cfg.data.explored_only
                else ""
            )
        )
    valid = test.limit(cfg.data.val_users or n_test).materialize()  # (test: users in hash order)
    judged = {"training_groups": n_train, "groups": n_test}
    log(f"{n_train} training groups ({first}..{train_days[-1]}), {n_test} groups on {newest}")
    phases.done("data and groups")

    # Train from production's weights (or the base); export the last checkpoint.
    started_from = "production's weights" if base == prod_dir else f"the base model {base}"
    from shoprank.train.datasets import training_datasets
    from shoprank.train.export import export_model
    from shoprank.train.loop import fit, saved_state

    datasets = training_datasets(train_cfg, data.catalog, {"train": train, "valid": valid})
    phases.done("tokens")
    result = fit(train_cfg, "ranker", datasets, n_train, name=f"{cfg.run.name}-{run_dir.name}")
    phases.done("training (Ray Train)")
    state = saved_state(result.checkpoint)
    last = state.history[-1] if state.history else {}
    record = {
        "trained_through": train_days[-1],
        "window": [first, train_days[-1]],
        "held_out": newest,
        "new_days": new_days,
        "events": roots,
    }
    with result.checkpoint.as_directory() as ckpt:
        export = export_model(
            ckpt,
            train_cfg,
            str(run_dir / "export"),
            {
                "metrics": {k: v for k, v in last.items() if k.startswith("val_")},
                "days": record,
                "data": {
                    "events": read.snapshot(dirs),
                    "catalog": read.snapshot([cfg.data.catalog]),
                },
                "data_quality": data.counts,
                "history": state.history,
                "steps": state.steps,
                "parent": {"name": name, "version": prod_n},
            },
        )

    phases.done("export")

    # Candidate vs production on the newest day, like with like; the baselines beside them.
    models = {"candidate": export}
    if production:
        models["production"] = prod_dir
    baselines = fit_baselines(cfg, data.catalog, *train_pairs(train))
    precision = ranker_precision(cfg)
    table, raw = score_models(
        test, models, precision, baselines, cfg.eval.num_cpus, cfg.eval.score_in_process_below
    )
    metric = f"heldout_{r.metric}"
    meta_path = Path(export) / METADATA
    meta = json.loads(meta_path.read_text())
    meta["metrics"].update({f"heldout_{k}": v for k, v in table["candidate"].items()})
    meta_path.write_text(json.dumps(meta, indent=2, default=str))

    phases.done("scoring the newest day")

    # Drift: the newest day against the window, production's scores on both.
    reference = "production" if production else "candidate"
    sample = train.limit(max(n_test, 1)).materialize()
    window_scores = collect_scores(
        sample,
        CrossEncoderScorer,
        {"model_dir": models[reference], "precision": precision},
        cfg.eval.num_cpus,
        in_process_below=cfg.eval.score_in_process_below,
    )[:2]
    drift = drift_report(
        count_events(events, newest, first),
        data.catalog,
        {"window": window_scores, "newest": raw[reference]},
        run_dir,
        (first, train_days[-1]),
        newest,
    )

    phases.done("drift")

    # The registry: the candidate, then the gate, against production measured on the same day.
    version = registry.register(
        name,
        export,
        metadata={"days": record, "retrain": {"report": str(run_dir / "report.md")}},
        parent=prod_n,
        alias="candidate",
    )
    measured = (prod_n, table["production"][r.metric]) if production else None
    margin, noise = cfg.registry.margin, ""
    if production and r.confidence is not None:
        gain, half = paired_interval(raw["candidate"], raw["production"], r.metric, r.confidence)
        margin += half
        noise = (
            f" (the margin: registry.margin {cfg.registry.margin:g} + {half:.4f}, the half-width "
            f"of the {r.confidence:.0%} paired interval of {gain:+.4f} over {n_test} groups)"
        )
        judged.update(gain=gain, half_width=half)
    decision = registry.promote(
        name, version.version, metric, margin, cfg.train.metric_mode, measured
    )
    phases.done("registry")
    status = "promoted" if decision.promoted else "kept"
    outcome = Outcome(
        status,
        decision.reason + noise,
        name,
        version.version if decision.promoted else prod_n,
        version.version,
        plan,
        table,
        drift.numbers,
        str(run_dir / "report.md"),
        _since(started),
        judged,
        feedback,
    )
    sections = [
        ("Decision", outcome.line()),
        (
            "Days",
            f"Production {f'v{prod_n}' if production else '(none)'} was trained through "
            f"{through or '–'}; new day partitions: {', '.join(new_days)}. The candidate "
            f"trained from {started_from} on {first}..{train_days[-1]} ({n_train} groups) "
            f"and is judged on {newest} ({n_test} groups: each positive of that day"
            + (" in an answer shown in a random order" if cfg.data.explored_only else "")
            + f" among {cfg.data.eval_candidates - 1} candidates"
            + (", the other items shown first" if cfg.data.shown_candidates else ", sampled")
            + f"); histories from {read_days[0]}. "
            f"Events read from: {', '.join(roots)}.",
        ),
        ("Newest day", report.metrics_table(table, COLUMNS)),
        *drift.sections,
        ("Data quality", counts_table(data.counts)),
        ("Feedback", feedback_summary(feedback) + " (feedback.json)"),
        ("Training time", report.training_time(state.timing, state.steps) or "–"),
        ("Where the run's time went", phases.line()),
    ]
    images = dict(drift.images)
    if state.history or state.steps:
        images["Training"] = report.training_curve(
            state.history, state.steps, ["val_ndcg@10", "val_auc"], run_dir / "training.png"
        )
    report.write_report(run_dir, f"shoprank retraining: {name} on {newest}", sections, images)
    (run_dir / "outcome.json").write_text(json.dumps(asdict(outcome), indent=2, default=str))
    log(f"retrain {name}: {phases.line()}")
    log(f"retrain {name}: {outcome.line()} ({outcome.seconds:.0f} s; report {outcome.report})")
    return outcome


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 1)


class _Phases:
    """Seconds per step of a run, for its log and report."""

    def __init__(self) -> None:
        self.last, self.seconds = time.perf_counter(), {}

    def done(self, what: str) -> None:
        now = time.perf_counter()
        self.seconds[what] = now - self.last
        self.last = now

    def line(self) -> str:
        return ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())
