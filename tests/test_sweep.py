"""The sweep end to end on a real local Ray: Tune over Train, ASHA, export, registry."""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import shop_overrides
from shoprank.config import ConfigError, load_config
from shoprank.registry import Registry
from shoprank.train.sweep import concurrency, data_variants, param_space, start_points

SWEEP = Path(__file__).resolve().parents[1] / "tune" / "sweep.py"


def test_space_points_and_concurrency():
    cfg = load_config(
        None,
        [
            "sweep.space={train.lr: {loguniform: [1e-5, 1e-2]}, lora.r: {choice: [4, 8]}}",
            "sweep.points=[{train.lr: 1e-4}]",
            "train.num_workers=2",
        ],
    )
    assert set(param_space(cfg)) == {"train.lr", "lora.r"}
    # The config's own values first, then the points (missing keys from the config).
    assert start_points(cfg) == [{"train.lr": 1e-3, "lora.r": 8}, {"train.lr": 1e-4, "lora.r": 8}]
    assert concurrency(cfg, {"CPU": 4}) == 2
    assert concurrency(cfg, {"CPU": 1}) == 1  # never 0: the trial waits for resources
    gpu = load_config(None, ["train.use_gpu=true", "train.num_workers=2"])
    assert concurrency(gpu, {"CPU": 64, "GPU": 8}) == 4
    assert data_variants(cfg) == [{}]
    neg = load_config(None, ["sweep.space={data.negatives: {choice: [1, 3]}}"])
    assert data_variants(neg) == [{"data.negatives": 1}, {"data.negatives": 3}]


def test_bad_sweeps_are_named():
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(None, ["sweep.space={train.lrr: {choice: [1]}}"])
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(None, ["sweep.space={train.lr: {choice: [1], uniform: [0, 1]}}"])
    outside = load_config(None, ["sweep.space={lora.r: {choice: [4, 16]}}"])  # r is 8
    with pytest.raises(ConfigError, match="lora.r=8"):
        start_points(outside)
    with pytest.raises(ConfigError, match="sweep.space is empty"):
        param_space(load_config(None, []))
    with pytest.raises(ConfigError, match="as a choice"):
        data_variants(load_config(None, ["sweep.space={data.negatives: {uniform: [1, 3]}}"]))


def test_extends_overlays_a_training_config(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("run: {name: base}\ntrain: {lr: 5.0e-5, epochs: 2}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain: {lr: 1.0e-3}\n")
    cfg = load_config(child)
    assert (cfg.run.name, cfg.train.lr, cfg.train.epochs) == ("base", 1e-3, 2)
    base.write_text("extends: child.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(child)


def test_a_restored_silent_trial_and_a_published_winner(tmp_path):
    """A trial restored from disk that never reported still has its values (from params.json),
    and a winner already in the registry is found, so running a finished sweep again registers
    nothing new."""
    import pyarrow.fs as pafs
    from ray import tune

    from shoprank.train.sweep import Trial, published, trial_values

    cfg = load_config("tune/synthetic.yaml", [f"registry.root={tmp_path / 'reg'}"])
    folder = tmp_path / "train_trial_x"
    folder.mkdir()
    values = start_points(cfg)[0]
    (folder / "params.json").write_text(json.dumps({**values, "other": 1}))
    silent = tune.Result(None, None, None, str(folder), _storage_filesystem=pafs.LocalFileSystem())
    assert silent.config is None and trial_values(cfg, silent) == values

    row = {"trial": "t1", "checkpoint": "/runs/x/trials/t1/checkpoint_1"}
    trial = Trial(row, cfg, [])
    assert published(cfg, trial) is None  # no registry yet
    export = tmp_path / "export"
    export.mkdir()
    meta = {"kind": "ranker", "base_model": "minilm", "max_length": 64, "config": {}}
    (export / "shoprank.json").write_text(json.dumps(meta))
    name = cfg.registry.model or cfg.run.name
    sweep_meta = {"sweep": {"name": cfg.run.name, **row}}
    Registry(cfg.registry.root).register(name, str(export), sweep_meta)
    assert published(cfg, trial).version == 1
    later = Trial({**row, "checkpoint": "/runs/x/trials/t1/checkpoint_2"}, cfg, [])
    assert published(cfg, later) is None


def test_warm_start_tells_optuna_the_earlier_trials(tmp_path):
    import pyarrow as pa

    from shoprank.train.sweep import WarmOptunaSearch, earlier_trials

    earlier = tmp_path / "old" / "sweep"
    earlier.mkdir(parents=True)
    rows = [
        {"trial": "a", "train.lr": 1e-3, "lora.r": 8, "best": 0.05},
        {"trial": "b", "train.lr": 2e-4, "lora.r": 4, "best": 0.04},
        {"trial": "c", "train.lr": 5e-4, "lora.r": 64, "best": 0.06},  # r outside this space
        {"trial": "d", "train.lr": 7e-4, "lora.r": 8, "best": float("nan")},  # never validated
    ]
    pq.write_table(pa.Table.from_pylist(rows), earlier / "results.parquet")
    base = [f"run.storage={tmp_path}", "sweep.num_samples=3"]
    cfg = load_config("tune/synthetic.yaml", [*base, "sweep.warm_start=[old]"])
    found = earlier_trials(cfg)
    assert found == [
        ({"train.lr": 1e-3, "lora.r": 8}, 0.05),
        ({"train.lr": 2e-4, "lora.r": 4}, 0.04),
    ]
    search = WarmOptunaSearch(found, seed=0)
    assert search.set_search_properties("val_ndcg@10", "max", param_space(cfg))
    done = search._ot_study.trials
    assert [t.value for t in done] == [0.05, 0.04] and done[0].params["lora.r"] == 8
    assert search.suggest("t1") is not None  # and it goes on searching
    with pytest.raises(ConfigError, match="no .*results.parquet"):
        earlier_trials(load_config("tune/synthetic.yaml", [*base, "sweep.warm_start=[nope]"]))
    random = [*base, "sweep.warm_start=[old]", "sweep.algorithm=random"]
    with pytest.raises(ConfigError, match="optuna"):
        earlier_trials(load_config("tune/synthetic.yaml", random))


@pytest.mark.slow
def test_sweep_stops_a_trial_registers_the_winner(
    ray_local, tmp_path, tiny_shop, tiny_model_dir, monkeypatch, capsys
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # tracking's default store, below
    registry = tmp_path / "registry"
    args = [
        *shop_overrides(tiny_shop),
        f"run.storage={tmp_path}",
        "run.name=sweep",
        f"model.name={tiny_model_dir}",
        "model.max_length=64",
        "model.attn_implementation=null",
        "train.bf16=false",
        "train.batch_size=8",
        "train.max_steps=8",
        "train.eval_every_steps=2",
        "train.warmup_ratio=0",
        "train.early_stopping_patience=null",
        # Logloss falls from ln 2 once the head learns that most candidates are negatives; a
        # trial with lr 1e-9 cannot, so ASHA must stop it before its last validation.
        "train.metric=logloss",
        "train.metric_mode=min",
        "train.loss=bce",  # (the listwise default leaves the logits' level, and logloss, alone)
        "data.val_users=16",
        "data.test_users=12",
        "data.eval_candidates=10",
        "data.max_train_positives=256",
        "data.max_bad_fraction=0.5",
        "eval.zero_shot=false",  # the closing report is the train job's, tested there
        "eval.baselines=[popularity]",
        "sweep.space={train.lr: {loguniform: [1e-9, 1e-2]}, lora.r: {choice: [2, 4, 8]}}",
        "sweep.start_from_config=false",
        "sweep.points=[{train.lr: 1e-2, lora.r: 4}, {train.lr: 1e-9, lora.r: 2}]",
        "sweep.num_samples=3",
        "sweep.max_concurrent_trials=1",
        "sweep.reduction_factor=2",
        f"registry.root={registry}",
        "registry.model=tiny",
    ]
    monkeypatch.setattr(
        sys, "argv", ["sweep.py", "--config", str(SWEEP.parent / "synthetic.yaml"), *args]
    )
    runpy.run_path(str(SWEEP), run_name="__main__")
    printed = capsys.readouterr().out

    # The results: 3 trials (the two points, then Optuna's), the lr-1e-9 one stopped by ASHA
    # after one validation.
    out = tmp_path / "sweep"
    rows = pq.read_table(out / "sweep" / "results.parquet").to_pylist()
    assert len(rows) == 3
    frozen = next(r for r in rows if r["train.lr"] == pytest.approx(1e-9))
    assert frozen["status"] == "stopped early" and frozen["validations"] < 4
    assert any(r["status"] == "completed" and r["validations"] == 4 for r in rows)
    assert frozen["best"] > rows[0]["best"]
    assert rows[0]["best"] == min(r["best"] for r in rows)  # best first (logloss: lower)
    md = (out / "sweep" / "report.md").read_text()
    for png in ("by_train.lr.png", "by_lora.r.png", "curves.png"):
        assert f"({png})" in md
        assert (out / "sweep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Every CPU is free again: stopped trials gave back their workers' placement groups.
    deadline = time.time() + 60
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"]:
        assert time.time() < deadline, ray_local.available_resources()
        time.sleep(1)

    # The winner is exported, registered with its metrics and promoted (no production before).
    meta = json.loads((out / "export" / "shoprank.json").read_text())
    assert meta["sweep"]["trial"] == rows[0]["trial"]
    assert meta["metrics"]["val_logloss"] == pytest.approx(rows[0]["best"])
    reg = Registry(str(registry))
    version = reg.get("tiny", "production")
    assert version.version == 1 and reg.aliases("tiny")["candidate"] == 1
    assert version.metrics["val_logloss"] == pytest.approx(rows[0]["best"])
    assert version.metadata["sweep"]["trial"] == rows[0]["trial"]
    assert "registered tiny v1" in printed and "production ->" in printed
    assert (out / "report_test" / "report.md").exists()

    # MLflow: the sweep's run with one run per trial nested under it, each with its searched
    # values as params and its steps and validations at their steps (the frozen one's cut short).
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = [client.get_experiment_by_name("shoprank").experiment_id]
    (parent,) = client.search_runs(experiment, "tags.`shoprank.kind` = 'sweep'")
    assert f"MLflow run {parent.info.run_id} (the sweep, 3 trial runs nested)" in printed
    assert "sweep/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    nested = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    trials = {t.data.tags["trial"]: t for t in client.search_runs(experiment, nested)}
    assert set(trials) == {r["trial"] for r in rows}
    for row in rows:
        tracked = trials[row["trial"]]
        assert float(tracked.data.params["train.lr"]) == pytest.approx(row["train.lr"])
        assert int(tracked.data.params["lora.r"]) == row["lora.r"]
        assert tracked.data.tags["status"] == row["status"]
        history = client.get_metric_history(tracked.info.run_id, "val/logloss")
        assert sorted(m.step for m in history) == [2, 4, 6, 8][: row["validations"]]
        losses = client.get_metric_history(tracked.info.run_id, "train/loss")
        assert sorted(m.step for m in losses) == [2, 4, 6, 8][: row["validations"]]
