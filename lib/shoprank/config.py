"""One typed config schema for every job, loaded from YAML with `key=value` overrides.

Every job prints the resolved config and saves it next to its outputs, so a run can always be
repeated exactly.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    # Unknown keys are errors: a typo in a YAML file must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class RunConfig(Section):
    name: str = "synthetic-ranker"
    # Where checkpoints, reports and exports go: a local path or a pyarrow filesystem URI.
    storage: str = "runs"
    seed: int = 0


class DataConfig(Section):
    catalog: str = "data/synthetic/catalog.parquet"
    events: str = "data/synthetic/events"
    judgments: str | None = "data/synthetic/judgments.parquet"
    # When the catalog is missing and this names a built-in generator, the job writes it first.
    generate_if_missing: Literal["synthetic"] | None = "synthetic"
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    task: Literal["recommend", "search"] = "recommend"
    # Python format string over catalog columns; missing fields render as empty.
    item_template: str = "{title}. {category}. {brand}."
    # How an item reads inside a context, as one of a user's history (None: as
    # `item_template`): a shorter text fits more of the history into `model.max_length`.
    history_template: str | None = None
    # Most recent items in a context, newest first.
    # (5 on the built-in shop: a longer history is cut by model.max_length anyway.)
    history_len: int = Field(5, ge=1)
    history_separator: str = " | "
    # A user's later engagements with an item they already engaged with (the cart and the
    # purchase after its click, a re-purchase): "first" keeps only the first, so each positive
    # is an item new to the user's history and each history names an item once; "all" keeps
    # every one (a shop funnel's repeats are then answered by the history's own text: on the
    # synthetic shop 56% of test positives were). The published Amazon split keeps them all.
    repeat_positives: Literal["first", "all"] = "first"
    # Sampled negatives per training positive (never the positive itself); the retriever can
    # use 0, since every other item of its batch is a negative already.
    negatives: int = Field(3, ge=0)
    # Training negatives taken first from the items shown in the same request (request_id, else
    # session_id) and not engaged with: the click model's negatives (impressions, such as the
    # serving app's event log writes); sampled items fill the rest.
    # On by default: the shop's impressions teach the tastes that decide between items of one
    # kind (brand, price, quality), which random negatives do not (RESULTS.md, "The built-in
    # default run"); data without impressions gets sampled negatives only.
    shown_negatives: bool = True
    # At most this share of a training group's negatives from the shown items; sampled ones
    # fill the rest, so the model keeps learning what is plainly irrelevant too. (0.5: two of
    # three negatives shown, one sampled; on the built-in shop +0.008 NDCG@10 on 500 valid users
    # and +0.03 AUC over shown ones alone: RESULTS.md, "The built-in default run".)
    shown_share: float = Field(0.5, ge=0.0, le=1.0)
    # Of the shown items, only those shown above the engaged one (looked at and passed over):
    # the ones below may never have been looked at, and teaching them as negatives teaches
    # the old ranking's position bias back ("skip-above", Joachims 2002).
    shown_above: bool = False
    # Where sampled negatives come from: any catalog item, or only the items the events read
    # hold (shown or engaged with; a `test` split's events do not count: the held-out day
    # was not known when training). "events" keeps a new arrival that nobody was shown yet from
    # being taught as a negative before anyone could pick it (it would then never be shown,
    # never clicked, and never learned: the loop's cold-start trap).
    negatives_from: Literal["catalog", "events"] = "catalog"
    # Validation / test groups likewise: a positive among the other items shown in its request
    # first, sampled ones after: the judge of a reranker on the kind of list it reorders (a
    # positive that production put before random items is no contest for any model).
    shown_candidates: bool = False
    # Only explored answers (the served-events log's `explored`: shown in a random order, the
    # app's explore_share) count as shown lists (shown negatives, shown candidates), and
    # validation / test groups are built only for their positives. Clicks on a list in the
    # serving model's own order favour that model (shoppers click what is on top); on a random
    # order they favour no one: the fair judge of a retraining's candidate against production,
    # and negatives free of the old ranking's position bias.
    explored_only: bool = False
    # Candidates per validation / test user: 1 positive + (eval_candidates - 1) sampled;
    # 1 keeps only the positive (the full-catalog protocol ranks every item anyway).
    eval_candidates: int = Field(100, ge=1)
    # Hard negatives per training positive, mined with an exported retriever (its folder,
    # holding an index from jobs/embed.py) from ranks [hard_negative_ranks) of its results.
    hard_negatives: int = Field(0, ge=0)
    hard_negatives_from: str | None = None
    hard_negative_ranks: tuple[int, int] = (10, 100)
    # Validation users scored during training (cross-encoder scoring is the costly part).
    # The defaults keep the built-in run short on a 2-core laptop; real runs raise them.
    # None = every user (what the full-catalog protocol reports).
    val_users: int | None = Field(64, ge=1)
    test_users: int | None = Field(500, ge=1)
    # Cap on training groups (None = all).
    max_train_positives: int | None = 5000


class ModelConfig(Section):
    # ranker: cross-encoder over (context, item); retriever: bi-encoder with two shared towers.
    kind: Literal["ranker", "retriever"] = "ranker"
    # A Hugging Face model id or path; "minilm" is the bundled all-MiniLM-L6-v2.
    name: str = "minilm"
    max_length: int = Field(96, ge=8)
    # "eager" attention and no dropout make bf16 autocast pay off on CPU (docs/DESIGN.md).
    attn_implementation: str | None = "eager"
    dropout: float | None = 0.0

    @field_validator("name")
    @classmethod
    def _absolute_when_local(cls, name: str) -> str:
        """A local folder (e.g. an export to start from) made absolute: Ray Train workers run
        in their own directory, where a relative path would be read as a hub id."""
        path = Path(name)
        return str(path.resolve()) if not path.is_absolute() and path.is_dir() else name


class LoraConfig(Section):
    enabled: bool = True
    r: int = Field(8, ge=1)
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = ["query", "key", "value", "dense"]
    # Trained in full and saved with the adapter; names absent from the model are skipped.
    # (BERT's pooler is adapted through its `dense` layer, a target module.)
    modules_to_save: list[str] = ["classifier"]


class RetrieverConfig(Section):
    pooling: Literal["mean", "cls"] = "mean"
    # Softmax temperature of the contrastive loss; learned (from this start) when asked.
    temperature: float = Field(0.05, gt=0)
    learn_temperature: bool = True
    # Contexts (histories) are longer than items; items use model.max_length.
    context_max_length: int = Field(256, ge=8)
    # Training runs each tower's batch as up to this many passes of similar-length rows, each
    # trimmed to its longest (models/encoder.py: encode): the same loss, less padding computed,
    # but smaller passes; on Amazon 4 was no faster than 1 (RESULTS.md, "length buckets").
    length_buckets: int = Field(1, ge=1)


class IndexConfig(Section):
    # auto: exact inner product below `exact_below` items, HNSW above.
    kind: Literal["auto", "flat", "hnsw"] = "auto"
    exact_below: int = 50_000
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(200, ge=8)
    ef_search: int = Field(256, ge=8)
    # Ray Data batch inference over the catalog: items per batch and embedding actors.
    embed_batch_size: int = Field(256, ge=1)  # texts per Ray Data batch (one actor call)
    # Tokens a forward pass holds inside it (texts sorted by length, rows x max_length): 64
    # items of 64 tokens, 32 contexts of 128. On 2 cores bigger passes were slower, and so were
    # passes of 16 items (bench/bench_embed.py; RESULTS.md, "Catalog embedding throughput").
    embed_pass_tokens: int = Field(4096, ge=1)
    embed_actors: int = Field(1, ge=1)
    # Text lists up to this many are embedded in the calling process: a Ray Data actor's start
    # (a process, torch, the model) costs more than embedding a few thousand texts
    # (bench/bench_embed.py); longer lists go to the actor pool, which scales out. 0: always Ray.
    embed_in_process_below: int = Field(20_000, ge=0)


class TrainConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    # auto: bf16 autocast where the device computes bf16 natively (an AMX or AVX512-BF16 CPU,
    # most GPUs), else fp32 (lib/shoprank/precision.py). Embedding, the evaluation scorers and
    # the loop simulation follow it. `train.bf16=true|false` is still read as bf16 | fp32.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    batch_size: int = Field(8, ge=1)  # groups per worker and micro step (x (1 + negatives) pairs)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)  # LoRA; full fine-tuning wants ~1e-4
    weight_decay: float = 0.01
    epochs: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.06, ge=0, le=1)
    max_steps: int | None = None  # optimizer steps, across epochs
    # Validate and checkpoint every N optimizer steps (None = once per epoch).
    eval_every_steps: int | None = None
    # listwise: a softmax over each group (the positive against its negatives), what NDCG@10
    # rewards; bce scores each pair as a click probability (better AUC and logloss).
    loss: Literal["bce", "listwise"] = "listwise"
    metric: str = "ndcg@10"
    metric_mode: Literal["max", "min"] = "max"
    keep_checkpoints: int = Field(2, ge=1)
    # Also checkpoint every N optimizer steps between validations (None = at validations only):
    # bounds the steps a failure loses. These carry no metric, so Ray ranks them below every
    # validated one: it keeps the latest checkpoint (what a restart resumes) and the best
    # `keep_checkpoints` validated ones (what the export picks from).
    checkpoint_every_steps: int | None = Field(None, ge=1)
    # Restarts of the worker group after a worker or node fails, each from the latest checkpoint
    # (Ray Train FailureConfig; -1 = no limit). Sweep trials are retried by sweep.max_failures.
    max_failures: int = Field(2, ge=-1)
    # Elastic: carry on with as few as this many workers when workers or nodes are lost, and grow
    # back to num_workers when they return (None = exactly num_workers). Needs zero_stage=0.
    min_workers: int | None = Field(None, ge=1)
    # Stop after this many validations without improvement (None = never).
    early_stopping_patience: int | None = 2
    eval_batch_size: int = 200  # pairs per validation forward pass
    log_every_steps: int = 10
    # Batches of rows of similar length (within each shuffle window, as transformers'
    # group_by_length): each batch is trimmed to its longest row, so one long row no longer pads
    # the rest. The batches' order stays shuffled; which rows share a batch changes.
    group_by_length: bool = False

    @model_validator(mode="before")
    @classmethod
    def _bf16_flag(cls, data: Any) -> Any:
        """The old `bf16: true|false` (configs and exports written before `precision`)."""
        if isinstance(data, dict) and "bf16" in data:
            data = dict(data)
            flag = data.pop("bf16")
            if not isinstance(flag, bool):
                raise ValueError(f"train.bf16={flag!r}: use true or false, or train.precision")
            data.setdefault("precision", "bf16" if flag else "fp32")
        return data

    @property
    def bf16(self) -> bool:
        """Whether this run computes in bf16 on this host (`precision` resolved)."""
        from shoprank.precision import resolve

        return resolve(self.precision, "cuda" if self.use_gpu else "cpu") == "bf16"

    @model_validator(mode="after")
    def _elastic_needs_stage_0(self) -> TrainConfig:
        if self.min_workers is None:
            return self
        if self.min_workers > self.num_workers:
            raise ValueError(
                f"train.min_workers={self.min_workers} exceeds train.num_workers="
                f"{self.num_workers}; set it at most num_workers (or null for a fixed count)"
            )
        if self.min_workers < self.num_workers and self.zero_stage != 0:
            # DeepSpeed 0.19.8 refuses a ZeRO checkpoint saved at another data-parallel world
            # size ("Automatic adjustment of ZeRO's optimizer state partitioning ... is not
            # currently supported"): each rank's optimizer shard is its own file.
            raise ValueError(
                f"train.min_workers={self.min_workers} with train.zero_stage={self.zero_stage}: "
                "ZeRO optimizer shards cannot be resumed on fewer workers; set "
                "train.zero_stage=0 (LoRA's optimizer state is small) or train.min_workers=null"
            )
        return self


class EvalConfig(Section):
    # CPUs for each scoring actor (its torch threads); GPUs when train.use_gpu.
    num_cpus: float = 2
    # Evaluations of up to this many (context, item) pairs are scored in the job's own process:
    # a scoring actor is a new process importing torch, seconds before its first pair.
    score_in_process_below: int = Field(20_000, ge=0)
    baselines: list[Literal["popularity", "tfidf", "covisit"]] = ["popularity", "tfidf", "covisit"]
    # Weight of the i-th newest history item in TF-IDF, co-visitation and the blend: decay**i.
    # (Called eval.tfidf_decay before co-visitation used it too: exports that say so still load.)
    history_decay: float = Field(
        0.5, ge=0, validation_alias=AliasChoices("history_decay", "tfidf_decay")
    )
    covisit_window: int = Field(3, ge=1)  # co-visitation pairs: items at most this far apart
    zero_shot: bool = True
    split: Literal["valid", "test"] = "test"
    # sampled: rank 1 positive + sampled candidates per user (the ranker's protocol);
    # full_catalog: retrieve from every item, then rerank (two-stage, Recall/NDCG@ks).
    protocol: Literal["sampled", "full_catalog"] = "sampled"
    ks: list[int] = [10, 50]
    # Exported models for the full-catalog protocol (folders written by jobs/train.py).
    retriever: str | None = None
    ranker: str | None = None
    retrieve_top: int = Field(100, ge=1)  # N candidates from stage one
    # Blended stage one (lib/shoprank/retrieval/blend.py): the retriever's weights for the
    # other signals are searched on valid after training (this many Optuna trials; 0 = no
    # blend) and stored beside the export; weights given here override the stored ones.
    blend_trials: int = Field(60, ge=0)
    blend_weights: dict[str, float] | None = None
    # Fusion (lib/shoprank/retrieval/fusion.py): a LightGBM LambdaMART model reorders the
    # blend's top fusion_top (0 = no fusion), fitted on the same valid users as the blend
    # weights; its boosting rounds are chosen among fusion_rounds by fusion_folds-fold
    # cross-fitting on them.
    fusion_top: int = Field(100, ge=0)
    fusion_rounds: list[int] = Field([50, 100, 200], min_length=1)
    fusion_folds: int = Field(2, ge=2)
    # Candidate-to-history features for the fusion (retrieval/fusion.py, PAIR_FEATURES): the
    # encoder's similarity to the newest history items, co-visitation with the newest one.
    fusion_pairs: bool = True
    # Also fit the blend (and fusion) without each signal in turn and keep the signal set with
    # the best valid figure: one signal can add more noise than information (RESULTS.md).
    signal_selection: bool = True
    # How many of them the ranker rescores (None = all N): the cost of stage two on a CPU.
    rerank_top: int | None = None
    # Stage two's order: (1 - mix) z(stage one) + mix z(ranker), one report row per mix
    # (1 = the ranker alone); try several on valid, keep the best for test.
    rerank_mix: list[float] = [1.0]
    # Weights the ranker scores with: auto (bf16 where native, else fp32), fp32, bf16, int8
    # dynamic quantization (CPU), or ONNX Runtime fp32 / int8 (CPU); None = train.precision.
    # The serving app takes the same choice (its ranker_precision), resolved by the same rule.
    ranker_precision: Literal["auto", "fp32", "bf16", "int8", "onnx", "onnx-int8"] | None = None
    # The ranker's pair length in tokens; None = the length it was trained at (its export's).
    # Shorter pairs cost less (serving's ranker_max_length takes the same choice): measure the
    # quality it costs here before serving it.
    ranker_max_length: int | None = Field(None, ge=8)


class Dimension(Section):
    """One searched hyper-parameter: exactly one of the three."""

    loguniform: tuple[float, float] | None = None  # e.g. learning rates
    uniform: tuple[float, float] | None = None
    choice: list[Any] | None = None  # e.g. LoRA ranks, ZeRO stages

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [k for k in ("loguniform", "uniform", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, choice (got {given})")
        bounds = self.loguniform or self.uniform
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"bounds {list(bounds)}: the low end must be below the high end")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform {list(self.loguniform)}: bounds must be > 0")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: give at least one value")
        return self


class SweepConfig(Section):
    """Ray Tune over Ray Train (tune/sweep.py): each trial is one training run of this config
    with the `space` keys (dotted config paths) replaced by the searched values."""

    space: dict[str, Dimension] = {}
    # The first trial runs the config's own values of the space keys (the "defaults" to beat),
    # then `points` in order, then the search algorithm's picks.
    start_from_config: bool = True
    points: list[dict[str, Any]] = []
    num_samples: int = Field(8, ge=1)
    # None = as many as the cluster's CPUs (GPUs with train.use_gpu) hold at once.
    max_concurrent_trials: int | None = Field(None, ge=1)
    algorithm: Literal["optuna", "random"] = "optuna"
    # asha stops trials whose validation metric trails the others' at the same validation.
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)  # validations every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)
    time_budget_s: float | None = Field(None, gt=0)  # then running trials stop, results stay
    max_failures: int = Field(1, ge=0)  # retries of a failed trial, resuming its checkpoint
    # Earlier sweeps (run names under run.storage) whose trials Optuna starts from, as if run
    # here: a search continues where they stopped without training them again.
    warm_start: list[str] = []


class RegistryConfig(Section):
    """Where jobs/train.py's export and a sweep's winner go (lib/shoprank/registry.py), and the
    gate to production."""

    publish: bool = True  # jobs/train.py registers its export as the model's `candidate`
    root: str = "registry"  # a local folder or a pyarrow filesystem URI
    model: str | None = None  # the registered model's name (default: run.name)
    metric: str | None = None  # a key of the export's metrics (default: val_<train.metric>)
    margin: float = Field(0.0, ge=0)  # production moves only for a gain above this
    promote: bool = True


class TrackingConfig(Section):
    """MLflow experiment tracking (lib/shoprank/tracking.py): each training run and each sweep
    trial becomes an MLflow run with its config, its metrics per step, its report and export."""

    enabled: bool = True
    # An MLflow tracking URI (sqlite:///PATH, http://HOST:5000, ...). None: $MLFLOW_TRACKING_URI
    # when set, else a SQLite store beside the runs: mlflow.db and mlartifacts/ under
    # run.storage (under outputs/ when run.storage is remote), as reports and exports are.
    uri: str | None = None
    experiment: str = "shoprank"


# Gate metrics that are a mean over the held-out groups (a paired interval needs one).
PER_GROUP_METRICS = ("ndcg@10", "recall@10")


class RetrainConfig(Section):
    """jobs/retrain.py (lib/shoprank/loop/retrain.py): train production further on the day
    partitions newer than its snapshot, judged on the newest day, promoted through the gate."""

    # Events folders with dt=YYYY-MM-DD partitions, read as one log: the shop's own events and
    # the serving app's impressions_dir. Empty: data.events alone.
    events: list[str] = []
    # Days trained on, ending the day before the newest (which is held out: the gate's data).
    window_days: int = Field(3, ge=1)
    # What the candidate starts from: production's weights (continued training on the new
    # days) or model.name, the pretrained base (a full retraining on the window, the recipe
    # production itself was trained with: give a window as long as its).
    start_from: Literal["production", "base"] = "production"
    # The app's /feedback outcomes (<impressions_dir>/_outcomes/) are joined to their answers'
    # impressions by request_id (data/outcomes.py); one later than this after its answer is
    # counted late and left out.
    late_after_s: float = Field(1_800.0, gt=0)
    # Earlier days read only for users' histories (the contexts), never trained on.
    history_days: int = Field(14, ge=0)
    # The newest day production was trained on, for a production version that does not record
    # it (registered by jobs/train.py); versions a retraining registers record their own.
    since: date | None = None
    # What the gate compares on the newest day's groups (higher or lower is better as
    # train.metric_mode says), with registry.margin.
    metric: Literal["ndcg@10", "recall@10", "auc", "logloss"] = "ndcg@10"
    # The gate asks for a gain beyond the day's noise: the candidate must beat production by
    # registry.margin plus the half-width of the paired interval (this level) of their
    # per-group difference on the held-out groups. A few hundred groups leave +-0.02 NDCG@10
    # of noise; a fixed margin of 0 promotes it. null: the fixed margin alone.
    confidence: float | None = Field(0.95, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _paired_metric(self) -> RetrainConfig:
        if self.confidence is not None and self.metric not in PER_GROUP_METRICS:
            raise ValueError(
                f"retrain.confidence={self.confidence} needs a per-group metric (ndcg@10 or "
                f"recall@10), not retrain.metric={self.metric}; or set retrain.confidence=null"
            )
        return self


class Config(Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    retriever: RetrieverConfig = RetrieverConfig()
    index: IndexConfig = IndexConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    sweep: SweepConfig = SweepConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()
    retrain: RetrainConfig = RetrainConfig()

    @model_validator(mode="after")
    def _space_keys_exist(self) -> Config:
        for key in [*self.sweep.space, *(k for p in self.sweep.points for k in p)]:
            section, _, leaf = key.partition(".")
            node = getattr(self, section, None) if section not in ("sweep", "registry") else None
            if not isinstance(node, Section) or leaf not in type(node).model_fields:
                raise ValueError(
                    f"sweep: {key!r} is not a config key; use section.key, e.g. train.lr or lora.r"
                )
        return self

    @field_validator("train")
    @classmethod
    def _steps_positive(cls, v: TrainConfig) -> TrainConfig:
        if v.max_steps is not None and v.max_steps < 1:
            raise ValueError(f"train.max_steps={v.max_steps}: use a positive number or null")
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    pass


def differences(cfg: Config, base: Config | None = None) -> dict[str, Any]:
    """The dotted keys whose values differ from `base` (the defaults): what a run changed."""
    ours, theirs = cfg.model_dump(mode="json"), (base or Config()).model_dump(mode="json")
    return {
        f"{section}.{key}": value
        for section, values in ours.items()
        for key, value in values.items()
        if value != theirs[section][key]
    }


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted keys replaced (a sweep trial's hyper-parameters)."""
    tree = cfg.model_dump(mode="json")
    for key, value in values.items():
        section, leaf = key.split(".", 1)
        tree[section][leaf] = value
    return Config.model_validate(tree)


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}={raw}: '{key}' is not a section")
    # YAML parsing gives numbers, booleans, null and lists their natural types.
    try:
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {dotted}={raw}: not a YAML value ({str(e).splitlines()[0]}); quote a "
            f"text with spaces, braces or colons: '{dotted}=\"{raw}\"'"
        ) from None


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML file's sections; `extends: FILE` (relative to it) is read first and overlaid."""
    if path in seen:
        raise ConfigError(f"{path}: 'extends' loops back to it ({' -> '.join(map(str, seen))})")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    base = _read_tree((path.parent / parent).resolve(), (*seen, path))
    for section, values in tree.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the built-in defaults) and apply `section.key=value` overrides."""
    tree: dict = {}
    if path is not None:
        tree = _read_tree(Path(path).resolve())
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
        source = path or "defaults"
        raise ConfigError(f"invalid config ({source}):\n" + "\n".join(lines)) from None
