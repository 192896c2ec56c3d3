"""A run: its resolved config, its output folder, and what its steps share, built once.

Every entry point starts the same way (`start`): parse `--config FILE` and `section.key=value`
overrides, print and save the resolved config, start or join Ray. The `Run` it returns carries
what the steps need (validated data, example groups, fitted baselines), each built on first use
and kept, so that no step takes six arguments and nothing is fitted twice.

Ray: under `ray job submit` (RAY_ADDRESS set) the job joins the cluster; run as plain
`python jobs/...` it starts a local Ray by itself.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray

from shoprank.config import Config, differences, load_config
from shoprank.console import log, quiet
from shoprank.data import read


def init_ray(num_cpus: int | None = None) -> None:
    # Blocks leave every Ray Data step in the order they came in (else in the order their tasks
    # finish), so that a run builds and reads the same training batches every time. Datasets
    # take a copy of this context when they are created: it must be set before any read.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if ray.is_initialized():
        return
    quiet()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner asks
        # whether a run's controller is still alive: without it, a sweep trial stopped early
        # keeps its CPUs and the next trial waits for them forever.
        ray.init(num_cpus=num_cpus, include_dashboard=True)
    resources = ray.cluster_resources()
    log(
        f"Ray {ray.__version__} at {address or 'local'}: "
        f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
    )


def parser(doc: str, default_config: str | None = None) -> argparse.ArgumentParser:
    """The arguments every job takes: `--config FILE` and `section.key=value` overrides."""
    p = argparse.ArgumentParser(
        description=doc.strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    helptext = "YAML config" + (
        " (default: %(default)s)" if default_config else " (default: the built-in synthetic shop)"
    )
    p.add_argument("--config", default=default_config, help=helptext)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def output_dir(cfg: Config) -> Path:
    """Reports, exports and quarantine files: beside the checkpoints when storage is local."""
    root = cfg.run.storage if "://" not in cfg.run.storage else "outputs"
    out = Path(root).resolve() / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    return out


def start(args: argparse.Namespace, with_ray: bool = True) -> Run:
    """Load, print and save the resolved config; start or join Ray; the run's context."""
    cfg = load_config(args.config, args.overrides)
    if not cfg.train.use_gpu:  # as in the workers: else DeepSpeed warns on import (export)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run = Run(cfg, output_dir(cfg))
    (run.out / "config.yaml").write_text(cfg.to_yaml())
    changed = "\n".join(f"  {k}: {v}" for k, v in differences(cfg).items()) or "  (none)"
    log(f"resolved config saved to {run.out / 'config.yaml'}; it differs from the defaults in:")
    print(changed, flush=True)
    from shoprank.evaluation.scorers import precision_words
    from shoprank.precision import host_line

    log(f"precision: {host_line(precision_words(cfg))}")
    if with_ray:
        init_ray()
    return run


def ensure_data(cfg: Config) -> None:
    """Write the built-in synthetic shop when the configured catalog does not exist yet."""
    if read.exists(cfg.data.catalog) or cfg.data.generate_if_missing is None:
        return
    from shoprank.data.synthetic import generate_shop

    target = Path(cfg.data.catalog).parent
    log(f"{cfg.data.catalog} not found: generating the synthetic shop in {target}")
    made = generate_shop(target, seed=cfg.run.seed)
    planted = sum(n for kind in made["planted"].values() for n in kind.values())
    log(
        f"synthetic shop: {made['items']} items, {made['users']} users, {made['events']} events "
        f"in {made['partitions']} day partitions, {made['judgments']} search judgments; "
        f"{planted} bad rows planted on purpose (validation must catch them)"
    )


@dataclass
class Run:
    """One job's context. Derived runs (`with_config`) share the data and examples."""

    cfg: Config
    out: Path
    # The training run being evaluated: its validation reports and its logged steps.
    history: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    timing: dict = field(default_factory=dict)  # where its wall time went (train.loop)
    _shared: dict = field(default_factory=dict, repr=False)

    def with_config(self, cfg: Config) -> Run:
        """The same data and examples under another config (a sweep trial's values)."""
        return replace(self, cfg=cfg, _shared=self._shared)

    def _once(self, key: str, build):
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    @property
    def data(self):
        """Validated catalog, events and judgments (bad rows quarantined under `out`)."""
        from shoprank.data.load import counts_table, load_validated

        def build():
            ensure_data(self.cfg)
            data = load_validated(self.cfg.data, str(self.out / "quarantine"))
            log("data quality:\n" + counts_table(data.counts))
            return data

        return self._once("data", build)

    @property
    def examples(self) -> dict[str, ray.data.Dataset]:
        """Per-split example groups as `cfg.data` asks for them."""
        from shoprank.data.examples import build_examples

        def build():
            cfg = self.cfg
            examples = build_examples(self.data.events, self.data.catalog, cfg.data, cfg.run.seed)
            if cfg.data.hard_negatives:
                from shoprank.retrieval.hard_negatives import mine_hard_negatives

                mined = mine_hard_negatives(examples["train"], cfg, self.data.catalog)
                examples["train"] = mined.materialize()
                log(f"{cfg.data.hard_negatives} hard negatives added to each training group")
            return examples

        return self._once("examples", build)

    @property
    def baselines(self) -> dict:
        """Popularity, TF-IDF and co-visitation, fitted once on the training groups."""
        from shoprank.evaluation.baselines import fit_baselines, train_pairs

        def build():
            return fit_baselines(self.cfg, self.data.catalog, *train_pairs(self.examples["train"]))

        return self._once("baselines", build)
