"""Retraining on the newest days: day partitions, shown-not-clicked negatives, the drift report,
the retraining lock, the gate against production measured on the same day, and the job end to
end on a tiny shop (real Ray, real training, real registry)."""

from __future__ import annotations

import datetime as dt
import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from conftest import make_export, shop_overrides
from shoprank.config import DataConfig, RetrainConfig, load_config
from shoprank.data.examples import ExampleBuilder
from shoprank.evaluation.drift import drift_report, js_divergence
from shoprank.loop.retrain import day_partitions, start_weights, trained_through
from shoprank.registry import Registry, RegistryError
from test_registry import fake_export

JOB = Path(__file__).resolve().parents[1] / "jobs" / "retrain.py"
T0 = dt.datetime(2024, 3, 1, 12)


# -- fast: the pieces -----------------------------------------------------------------------


def _event(item, event, session=None, request=None, sec=0, pos=None, split="train", **extra):
    return {
        **extra,
        "user_id": "u",
        "item_id": item,
        "ts": T0 + dt.timedelta(seconds=sec),
        "event": event,
        "query": None,
        "session_id": session,
        "position": pos,
        "request_id": request,
        "split": split,
    }


def test_shown_not_clicked_items_become_negatives():
    """A served answer (request_id) and a shop session (session_id): each positive's training
    negatives are first the items shown with it and not engaged with, then sampled ones."""
    catalog = pa.table({"item_id": [f"I{i}" for i in range(500)], "title": ["t"] * 500})
    rows = [_event("I0", "click", session="s0", sec=1)]
    rows += [
        _event(i, "impression", request="r1", sec=10, pos=p)
        for p, i in enumerate(["I1", "I2", "I3", "I4", "I5"])
    ]
    rows += [_event("I2", "click", request="r1", sec=20, pos=1)]
    rows += [
        _event(i, "impression", session="s2", sec=30, pos=p)
        for p, i in enumerate(["I6", "I7", "I0"])
    ]
    rows += [_event("I7", "purchase", session="s2", sec=40, pos=1)]
    events = pa.Table.from_pylist(rows)

    def groups(shown: bool, negatives: int = 3) -> list[dict]:
        cfg = DataConfig(
            negatives=negatives,
            shown_negatives=shown,
            shown_share=1.0,  # every negative from the shown items while they last
            eval_candidates=5,
            item_template="{title}",
        )
        source = events if shown else events.filter(pc.not_equal(events["event"], "impression"))
        return ExampleBuilder(catalog, cfg, seed=0)(source).to_pylist()

    served, session = groups(shown=True)
    assert served["item_ids"][0] == "I2" and served["labels"] == [1.0, 0.0, 0.0, 0.0]
    assert set(served["item_ids"][1:]) <= {"I1", "I3", "I4", "I5"}  # shown with it, not clicked
    # The session showed I6, I7 and I0: I7 is the positive, I0 the user's own earlier click.
    assert session["item_ids"][:2] == ["I7", "I6"]
    assert not {"I0", "I2", "I7"} & set(session["item_ids"][1:])
    # More negatives than were shown: the rest are sampled, never a positive of the user.
    wide = groups(shown=True, negatives=8)[0]["item_ids"][1:]
    assert {"I1", "I3", "I4", "I5"} <= set(wide) and not {"I0", "I2", "I7"} & set(wide)
    assert len(set(wide)) == 8
    # Off: sampled negatives only.
    plain = groups(shown=False)[0]["item_ids"][1:]
    assert len(set(plain) & {"I1", "I3", "I4", "I5"}) < 3
    # data.shown_share: at most that share of the negatives shown, the rest sampled.
    cfg = DataConfig(negatives=4, shown_negatives=True, shown_share=0.5, item_template="{title}")
    half = ExampleBuilder(catalog, cfg, seed=0)(events).to_pylist()[0]["item_ids"][1:]
    assert set(half[:2]) <= {"I1", "I3", "I4", "I5"} and len(set(half)) == 4
    assert not set(half[2:]) & {"I0", "I1", "I2", "I3", "I4", "I5", "I7"}
    # data.shown_above: only what was shown above the click (I1; I2 itself was clicked).
    cfg = DataConfig(negatives=3, shown_negatives=True, shown_above=True, item_template="{title}")
    above = ExampleBuilder(catalog, cfg, seed=0)(events).to_pylist()[0]["item_ids"][1:]
    assert above[0] == "I1" and not set(above[1:]) & {"I0", "I2", "I3", "I4", "I5", "I7"}


def test_a_funnel_after_a_click_is_one_positive_unless_asked_otherwise():
    """Click, cart and purchase of one item: with repeat_positives="first" (the default) the
    item is one positive and one history entry; "all" predicts the cart from the click."""
    catalog = pa.table({"item_id": [f"I{i}" for i in range(50)], "title": ["t"] * 50})
    rows = [_event("I0", "click", sec=1), _event("I1", "click", sec=2)]
    rows += [_event("I1", "add_to_cart", sec=3), _event("I1", "purchase", sec=4)]
    rows += [_event("I2", "click", sec=5)]
    events = pa.Table.from_pylist(rows)

    def groups(repeats: str) -> list[tuple[str, list[str]]]:
        cfg = DataConfig(negatives=2, repeat_positives=repeats, item_template="{title}")
        built = ExampleBuilder(catalog, cfg, seed=0)(events).to_pylist()
        return [(g["item_ids"][0], g["history_ids"]) for g in built]

    assert groups("first") == [("I1", ["I0"]), ("I2", ["I1", "I0"])]
    assert groups("all") == [
        ("I1", ["I0"]),
        ("I1", ["I1", "I0"]),
        ("I1", ["I1", "I1", "I0"]),
        ("I2", ["I1", "I1", "I1", "I0"]),
    ]


def test_held_out_groups_can_be_judged_on_what_was_shown():
    """data.shown_candidates: a held-out positive among the other items of its answer first,
    sampled items after; training groups keep data.shown_negatives' rule."""
    catalog = pa.table({"item_id": [f"I{i}" for i in range(500)], "title": ["t"] * 500})
    rows = [_event("I0", "click", request="r0", sec=1)]
    rows += [
        _event(i, "impression", request="r1", sec=10, pos=p, split="test")
        for p, i in enumerate(["I1", "I2", "I3", "I4", "I5"])
    ]
    rows += [_event("I3", "click", request="r1", sec=20, pos=2, split="test")]
    events = pa.Table.from_pylist(rows)

    def test_group(**kw) -> dict:
        cfg = DataConfig(eval_candidates=8, item_template="{title}", **kw)
        (group,) = [g for g in ExampleBuilder(catalog, cfg, 0)(events).to_pylist()]
        assert group["split"] == "test" and group["item_ids"][0] == "I3"
        return group

    shown = test_group(shown_candidates=True)["item_ids"][1:]
    assert set(shown[:4]) == {"I1", "I2", "I4", "I5"} and len(set(shown)) == 7
    assert "I0" not in shown  # the user's own click is never a negative
    sampled = test_group(shown_negatives=True)["item_ids"][1:]  # training's rule only
    assert len(set(sampled) & {"I1", "I2", "I4", "I5"}) < 2


def test_held_out_groups_can_be_judged_on_explored_answers_only():
    """data.explored_only: a held-out positive is judged only when its answer was shown in a
    random order (`explored`), and only such answers give training its shown negatives."""
    catalog = pa.table({"item_id": [f"I{i}" for i in range(500)], "title": ["t"] * 500})
    rows = [_event(i, "click", sec=s, explored=None) for s, i in enumerate(["I0", "I9", "I8"])]
    answers = [("r1", False, "test"), ("r2", True, "test"), ("r3", None, "test")]
    answers += [("r4", True, "train"), ("r5", False, "train")]
    for n, (request, flag, split) in enumerate(answers):
        shown = [f"I{10 * (n + 1) + p}" for p in range(5)]
        where = {"request": request, "split": split, "explored": flag}
        rows += [_event(i, "impression", sec=10 + n, pos=p, **where) for p, i in enumerate(shown)]
        rows += [_event(shown[2], "click", sec=20 + n, pos=2, **where)]
    events = pa.Table.from_pylist(rows)

    def groups(explored_only: bool) -> tuple[list[str], dict[str, list[str]]]:
        cfg = DataConfig(
            negatives=4,
            eval_candidates=5,
            shown_negatives=True,
            shown_share=1.0,
            shown_candidates=True,
            explored_only=explored_only,
            item_template="{title}",
        )
        built = ExampleBuilder(catalog, cfg, 0)(events).to_pylist()
        train = {g["item_ids"][0]: g["item_ids"][1:] for g in built if g["split"] == "train"}
        return [g["item_ids"] for g in built if g["split"] == "test"], train

    test, train = groups(False)
    assert [g[0] for g in test] == ["I12", "I22", "I32"]
    assert set(train["I42"]) == {"I40", "I41", "I43", "I44"}  # shown negatives, both answers
    assert set(train["I52"]) == {"I50", "I51", "I53", "I54"}
    test, train = groups(True)
    assert [g[0] for g in test] == ["I22"] and set(test[0][1:]) == {"I20", "I21", "I23", "I24"}
    assert list(train) == ["I9", "I8", "I42", "I52"]
    assert set(train["I42"]) == {"I40", "I41", "I43", "I44"}  # explored: its shown negatives
    assert not set(train["I52"]) & {"I50", "I51", "I53", "I54"}  # in order: sampled only


def test_negatives_can_come_from_the_items_the_events_hold():
    """data.negatives_from=events: sampled negatives only among the items the events read
    hold, so an item nobody was shown yet (a new arrival) is never taught as a negative."""
    catalog = pa.table({"item_id": [f"I{i}" for i in range(500)], "title": ["t"] * 500})
    rows = [_event(f"I{i}", "click", sec=i) for i in range(6)]
    events = pa.Table.from_pylist(rows)
    pool = [f"I{i}" for i in range(12)]  # what the events read hold (here: I0-I11)
    cfg = DataConfig(negatives=4, negatives_from="events", item_template="{title}")
    groups = ExampleBuilder(catalog, cfg, 0, pool=pool)(events).to_pylist()
    assert len(groups) == 5
    clicked = {f"I{i}" for i in range(6)}
    for g in groups:
        negatives = g["item_ids"][1:]
        assert len(set(negatives)) == 4 and set(negatives) <= set(pool) - clicked
    # Too few items left to sample from: the error names the setting.
    with pytest.raises(ValueError, match="data.negatives_from"):
        ExampleBuilder(catalog, cfg, 0, pool=pool[:8])(events)


def test_items_first_seen_on_the_held_out_day_are_no_training_negatives(ray_local):
    """data.negatives_from=events with a held-out day (split `test`): the pool is what the
    events held before it, so a new arrival first shown that day is no training negative."""
    import ray

    from shoprank.data.examples import example_groups

    catalog = pa.table({"item_id": [f"I{i}" for i in range(40)], "title": ["t"] * 40})
    rows = []
    for u in range(3):
        user = {"user_id": f"u{u}"}
        for n in range(4):  # each click shown beside I20+n
            clicked, request, sec = f"I{4 * u + n}", f"r{u}{n}", 10 * n
            rows += [
                {**_event(clicked, "impression", request=request, sec=sec, pos=0), **user},
                {**_event(f"I{20 + n}", "impression", request=request, sec=sec, pos=1), **user},
                {**_event(clicked, "click", request=request, sec=sec + 1, pos=0), **user},
            ]
        # The held-out day shows and sells new arrivals, I30-I33.
        rows += [
            {**_event("I30", "impression", request=f"t{u}", sec=99, split="test"), **user},
            {**_event(f"I3{u + 1}", "click", request=f"t{u}", sec=99, split="test"), **user},
        ]
    events = pa.Table.from_pylist(rows)
    cfg = DataConfig(
        negatives=3, eval_candidates=4, negatives_from="events", item_template="{title}"
    )
    groups = example_groups(ray.data.from_arrow(events), catalog, cfg, 0).take_all()
    before = {f"I{i}" for i in range(12)} | {f"I{i}" for i in range(20, 24)}
    train = [g for g in groups if g["split"] == "train"]
    assert len(train) == 9 and len([g for g in groups if g["split"] == "test"]) == 3
    for g in groups:
        assert set(g["item_ids"][1:]) <= before, g
    # data.explored_only on events that cannot say what was explored: refused, not emptied.
    explored = cfg.model_copy(update={"explored_only": True})
    with pytest.raises(ValueError, match="no `explored` column.*data.explored_only=false"):
        example_groups(ray.data.from_arrow(events), catalog, explored, 0)


def test_drift_report_has_its_sections(tmp_path):
    catalog = pa.table(
        {
            "item_id": ["A", "B", "C", "D"],
            "category": ["Home > X", "Home > Y", "Office > Z", "Office > Z"],
            "price": [10.0, 20.0, 30.0, 40.0],
        }
    )
    names = ["period", "item_id", "event", "search", "count"]
    rows = [
        ("window", "A", "impression", False, 80),
        ("window", "A", "click", False, 8),
        ("window", "B", "click", True, 2),
        ("newest", "A", "impression", False, 10),
        ("newest", "C", "impression", False, 10),
        ("newest", "A", "click", False, 1),
        ("newest", "C", "click", False, 3),
    ]
    counts = pa.Table.from_pylist([dict(zip(names, row, strict=True)) for row in rows])
    rng = np.random.default_rng(0)
    scores = {
        "window": (rng.normal(0, 1, (50, 4)), np.tile([1, 0, 0, 0], (50, 1))),
        "newest": (rng.normal(1, 1, (50, 4)), np.tile([1, 0, 0, 0], (50, 1))),
    }
    drift = drift_report(
        counts, catalog, scores, tmp_path, ("2024-03-01", "2024-03-03"), "2024-03-04"
    )
    titles = [t for t, _ in drift.sections]
    assert titles == [
        "Drift: traffic",
        "Drift: what was engaged with",
        "Drift: production's scores",
    ]
    traffic = drift.numbers["traffic"]
    assert traffic["window"]["click_rate"] == pytest.approx(0.125)  # 8 + 2 clicks, 80 shown
    assert traffic["newest"]["click_rate"] == pytest.approx(0.2)
    assert traffic["window"]["search_share"] == pytest.approx(0.2)
    assert traffic["newest"]["new_item_share"] == pytest.approx(0.75)  # C: never seen before
    assert traffic["newest"]["new_item_impressions"] == pytest.approx(0.5)
    assert traffic["window"]["median_price"] == 10.0
    assert drift.numbers["categories"]["newest"] == {"Home": 0.25, "Office": 0.75}
    assert 0 < drift.numbers["popularity_js"] <= 1
    assert drift.numbers["category_js"] == pytest.approx(
        js_divergence({"Home": 10}, {"Home": 1, "Office": 3})
    )
    q = drift.numbers["score_quantiles"]
    assert q["newest"]["positives"][2] > q["window"]["positives"][2]  # production's scores moved
    assert "| newest | positives |" in drift.sections[2][1]
    for image in drift.images.values():
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert js_divergence({"a": 1}, {"a": 5}) == 0.0 and js_divergence({"a": 1}, {"b": 1}) == 1.0


def test_day_partitions_and_the_snapshot(tmp_path):
    for root, day in [("shop", "2024-03-01"), ("shop", "2024-03-02"), ("served", "2024-03-02")]:
        (tmp_path / root / f"dt={day}").mkdir(parents=True)
    (tmp_path / "shop" / "notes").mkdir()  # not a partition
    roots = [str(tmp_path / "shop"), str(tmp_path / "served"), str(tmp_path / "not-yet")]
    days = day_partitions(roots)
    assert list(days) == ["2024-03-01", "2024-03-02"]
    assert [Path(p).parent.name for p in days["2024-03-02"]] == ["shop", "served"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="retrain.events"):
        day_partitions([str(tmp_path / "file")])

    registry = Registry(str(tmp_path / "registry"))
    export = fake_export(tmp_path / "export")
    plain = registry.register("m", str(export))
    recorded = registry.register(
        "m", str(export), metadata={"days": {"trained_through": "2024-03-05"}}
    )
    assert trained_through(recorded, None) == "2024-03-05"
    assert trained_through(plain, dt.date(2024, 3, 2)) == "2024-03-02"
    assert trained_through(None, None) is None
    with pytest.raises(ValueError, match=r"retrain.since=YYYY-MM-DD"):
        trained_through(plain, None)


def test_candidates_start_from_production_or_the_base():
    cfg = load_config(None, ["retrain.start_from=base"])
    assert cfg.retrain.start_from == "base"
    assert start_weights("production", "/reg/ranker/v3", "minilm") == "/reg/ranker/v3"
    assert start_weights("base", "/reg/ranker/v3", "minilm") == "minilm"
    assert start_weights("production", None, "minilm") == "minilm"  # no production yet
    with pytest.raises(ValueError, match="start_from"):
        load_config(None, ["retrain.start_from=scratch"])


@pytest.mark.parametrize("store", ["local", "object store"])
def test_a_second_retraining_is_refused_while_one_holds_the_lock(tmp_path, store):
    if store == "local":
        registry = Registry(str(tmp_path / "reg"))
    else:
        registry = Registry(
            "reg", filesystem=pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
        )
    with registry.hold("shop", "retrain"):
        second = registry.hold("shop", "retrain")
        with pytest.raises(RegistryError, match=r"already running|another retrain holds") as err:
            second.__enter__()
        assert "pid" in str(err.value)  # names the holder
        registry.register("shop", str(fake_export(tmp_path / "e")))  # writers are not blocked
    with registry.hold("shop", "retrain"):  # released: the next run goes
        pass


def test_the_gate_margin_grows_with_the_days_noise():
    """retrain.confidence: the paired interval of two models' per-group NDCG@10 on the same
    groups; a gain of noise alone straddles 0, a real one does not, and more groups narrow it."""
    from shoprank.evaluation.metrics import paired_interval

    rng = np.random.default_rng(0)

    def model(n: int, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores putting each group's positive (column 0) at `rank` among 20 candidates."""
        scores = np.tile(-np.arange(20.0), (n, 1))
        scores[:, 0] = -rank.astype(float) - 0.5
        labels = np.zeros((n, 20), np.float32)
        labels[:, 0] = 1
        return scores, labels

    first = np.zeros(200, int)
    second = np.ones(200, int)
    gain, half = paired_interval(model(200, first), model(200, second), "ndcg@10", 0.95)
    assert gain == pytest.approx(1 - 1 / np.log2(3)) and half == pytest.approx(0.0)
    noise_a, noise_b = (model(200, rng.integers(0, 15, 200)) for _ in range(2))
    gain, half = paired_interval(noise_a, noise_b, "ndcg@10", 0.95)
    assert abs(gain) < half  # two equally good models: the interval straddles 0
    wide = paired_interval(
        model(50, rng.integers(0, 15, 50)), model(50, rng.integers(0, 15, 50)), "ndcg@10", 0.95
    )[1]
    assert wide > half
    with pytest.raises(ValueError, match="per-group metric"):
        paired_interval(noise_a, noise_b, "auc", 0.95)
    with pytest.raises(ValueError, match="retrain.confidence=null"):
        RetrainConfig(metric="auc")
    assert RetrainConfig(metric="auc", confidence=None).confidence is None


def test_the_gate_compares_production_measured_on_the_same_data(tmp_path):
    registry = Registry(str(tmp_path / "reg"))
    registry.register("m", str(fake_export(tmp_path / "a", ndcg=0.9)))  # recorded 0.9
    registry.promote("m", 1, "val_ndcg@10")
    registry.register("m", str(fake_export(tmp_path / "b", ndcg=0.5, seed=1)))
    assert not registry.promote("m", 2, "val_ndcg@10").promoted  # against the recorded 0.9
    decision = registry.promote("m", 2, "val_ndcg@10", measured=(1, 0.4))  # measured today
    assert decision.promoted and decision.production_value == 0.4
    assert registry.history("m")[-1]["production_measured"] is True
    registry.register("m", str(fake_export(tmp_path / "c", ndcg=0.6, seed=2)))
    with pytest.raises(RegistryError, match="production is v2, not v1"):
        registry.promote("m", 3, "val_ndcg@10", measured=(1, 0.4))  # production moved since
    assert registry.aliases("m")["production"] == 2


# -- slow: the job end to end (real Ray, training, registry) ---------------------------------


def _served_copy(src: Path, dst: Path, day: str) -> None:
    """A shop day rewritten as the app's served-events log writes it: each session an answer
    with its request_id, the registry versions that made it, explored (as by an app whose
    explore_share is 1: what configs/retrain-synthetic.yaml judges on): its impressions as
    events, its clicks, carts and purchases as /feedback's outcome rows in `_outcomes/`, for
    the retraining to join."""
    table = pq.read_table(src / f"dt={day}" / "part-0.parquet")
    good = pc.and_(pc.is_valid(table["user_id"]), pc.is_valid(table["ts"]))
    table = table.filter(good)
    n = table.num_rows
    served = pa.table(
        {
            "user_id": table["user_id"],
            "item_id": table["item_id"],
            "ts": table["ts"],
            "event": table["event"],
            "query": table["query"],
            "session_id": pa.nulls(n, pa.string()),
            "position": table["position"],
            "request_id": table["session_id"],
            "retriever_version": pa.array(np.ones(n, dtype=np.int64)),
            "ranker_version": pa.array(np.ones(n, dtype=np.int64)),
            "explored": pa.array(np.ones(n, dtype=bool)),
        }
    )
    shown = pc.equal(served["event"], "impression")
    (dst / f"dt={day}").mkdir(parents=True)
    pq.write_table(served.filter(shown), dst / f"dt={day}" / "part-1.parquet")
    outcomes = served.filter(pc.invert(shown)).select(["request_id", "item_id", "event", "ts"])
    (dst / "_outcomes" / f"dt={day}").mkdir(parents=True)
    pq.write_table(outcomes, dst / "_outcomes" / f"dt={day}" / "part-1.parquet")


def _constant_ranker(folder: Path, tiny_model_dir: str, cfg) -> Path:
    """A tiny ranker export whose classifier is all zeros: every item scores alike, the worst
    ranking there is (ties count against the model), so any trained candidate beats it."""
    from transformers import AutoModelForSequenceClassification

    make_export(folder, "ranker", tiny_model_dir, cfg, seed=1)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.classifier.weight.data.zero_()
    model.classifier.bias.data.zero_()
    model.save_pretrained(folder)
    return folder


def _job(args: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["retrain.py", *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(JOB), run_name="__main__")
    return done.value.code


def test_retrain_job_end_to_end(
    ray_local, tmp_path, tiny_shop, tiny_model_dir, monkeypatch, capsys
):
    """Production v1 (trained through 03-03) and days up to 03-05 in two folders (the shop's
    events, the app's log): the job finds 03-04 and 03-05, trains from v1's weights on
    03-03..03-04, judges both on 03-05 and promotes; run again, nothing is new; a second run
    while another holds the lock is refused; a run that fails leaves production alone."""
    events, served = tmp_path / "events", tmp_path / "served"
    for day in ("2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04"):
        shutil.copytree(tiny_shop / "events" / f"dt={day}", events / f"dt={day}")
    _served_copy(tiny_shop / "events", served, "2024-03-05")
    args = [
        *shop_overrides(tiny_shop),
        f"data.events={events}",
        f"run.storage={tmp_path / 'runs'}",
        "run.name=rt",
        f"registry.root={tmp_path / 'registry'}",
        "registry.model=ranker",
        f"model.name={tiny_model_dir}",
        "model.max_length=64",
        "model.attn_implementation=null",
        "lora.enabled=false",
        "train.bf16=false",
        "train.num_workers=1",
        "train.batch_size=8",
        "train.lr=3e-3",
        "train.max_steps=8",
        "train.epochs=50",
        "train.warmup_ratio=0",
        "data.val_users=8",
        "data.test_users=40",
        "data.eval_candidates=20",
        "data.max_bad_fraction=0.5",
        f"retrain.events=[{events},{served}]",
        "retrain.window_days=2",
        "retrain.since=null",
        "eval.num_cpus=1",
        "tracking.enabled=false",
    ]
    cfg = load_config(JOB.parents[1] / "configs" / "retrain-synthetic.yaml", args)
    registry = Registry(cfg.registry.root)
    v1 = _constant_ranker(tmp_path / "v1", tiny_model_dir, cfg)
    registry.register("ranker", str(v1), metadata={"days": {"trained_through": "2024-03-03"}})
    registry.promote("ranker", 1, "val_ndcg@10")

    assert _job(args, monkeypatch) == 0
    printed = capsys.readouterr().out
    assert (
        "new days 2024-03-04, 2024-03-05; training on 2024-03-03..2024-03-04, judged on "
        "2024-03-05" in printed
    )
    v2 = registry.get("ranker", 2)
    assert v2.metadata["days"]["trained_through"] == "2024-03-04"
    assert v2.metadata["days"]["held_out"] == "2024-03-05" and v2.metadata["parent"] == 1
    meta = json.loads((Path(v2.uri) / "shoprank.json").read_text())
    assert meta["base_model"] == registry.get("ranker", 1).uri  # trained from production
    promoted = registry.history("ranker")[-1]
    assert promoted["event"] == "promote" and promoted["production_measured"] is True
    assert promoted["production_value"] == 0.0  # v1 ties every item: the worst ranking
    assert promoted["candidate_value"] == v2.metrics["heldout_ndcg@10"] > 0
    assert registry.aliases("ranker")["production"] == 2
    assert "promoted ranker v2 to production: v2 heldout_ndcg@10=" in printed
    joined = re.search(r"feedback: (\d+) of (\d+) outcomes joined", printed)
    assert joined and 0 < int(joined[1]) < int(joined[2])  # (the shop's planted bad rows)
    assert "the half-width of the 95% paired interval of +" in printed  # retrain.confidence
    report = Path(v2.metadata["retrain"]["report"]).read_text()
    for section in (
        "## Decision",
        "## Days",
        "## Newest day",
        "## Drift: traffic",
        "## Drift: what was engaged with",
        "## Drift: production's scores",
    ):
        assert section in report
    assert "| candidate |" in report and "| production |" in report

    # Again: production v2 was trained through 03-04; 03-05 alone is new, and held out.
    assert _job(args, monkeypatch) == 0
    assert "kept production: the only new day, 2024-03-05, is held out" in capsys.readouterr().out
    assert [v.version for v in registry.versions("ranker")] == [1, 2]

    # Another retraining holds the lock (another process): this one is refused, changes nothing.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom shoprank.registry import Registry\n"
            "with Registry(sys.argv[1]).hold('ranker', 'retrain'):\n"
            "    print('held', flush=True); time.sleep(120)",
            str(tmp_path / "registry"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _job(args, monkeypatch) == 3
        refused = capsys.readouterr().out
        assert "refused: ranker: a retrain is already running" in refused
        assert f"pid {holder.pid}" in refused
    finally:
        holder.kill()
        holder.wait()

    # A day's file that cannot be read (a truncated upload): the run fails, says why, and
    # production stays v2.
    (served / "dt=2024-03-07").mkdir()
    (served / "dt=2024-03-07" / "part-0.parquet").write_bytes(b"PAR1 cut short")
    assert _job(args, monkeypatch) == 1
    failed = capsys.readouterr().out
    assert "retraining failed, production untouched (v2): " in failed
    assert registry.aliases("ranker")["production"] == 2
    assert [v.version for v in registry.versions("ranker")] == [1, 2]
