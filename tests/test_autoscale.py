"""Autoscaling under real load, losing nothing: the Serve app on a local Ray scales its replica
1 -> 2 under closed-loop load and back to 1 when the load falls, no request fails on the way,
the impressions on disk are exactly the answers served (the removed replica wrote its buffer),
and every click sent, whichever replica took it, joins its answer."""

from __future__ import annotations

import pyarrow.dataset as pads
import pytest

from conftest import free_port, serving_setup
from shoprank.data.outcomes import join_outcomes, read_parquet_folder

pytestmark = pytest.mark.slow

KEY = "autoscale-key-0123456789"
APP, DEPLOYMENT = "shoprank", "Server"
# Small and quick: a replica wants 2 requests in flight; more for 1 s adds one, fewer for 3 s
# takes one away. Half a CPU each, so two fit beside the test's Ray workers.
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 3.0,
    "look_back_period_s": 2.0,
}


def test_replicas_scale_up_and_down_under_load_and_nothing_is_lost(
    ray_local, tmp_path, tiny_shop, tiny_model_dir
):
    from ray import serve

    from shoprank.serving.app import build_app
    from shoprank.serving.features import ParquetFeatureStore
    from shoprank.serving.load import ClosedLoop, running_replicas, scale_cycle

    setup = serving_setup(tmp_path, tiny_shop, tiny_model_dir, KEY)
    served = tmp_path / "served"
    args = {**setup.args, "ranker_precision": "fp32", "poll_s": 5.0, "layout": "one"}
    # Rows written only when a replica stops (or a buffer passes 5,000 rows): what is on disk
    # after the scale-down is what the removed replica wrote on its way out.
    args |= {"impressions_dir": str(served), "impressions_flush_s": 3600, "torch_threads": 1}
    deployment = {"autoscaling_config": AUTOSCALING, "ray_actor_options": {"num_cpus": 0.5}}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    store = ParquetFeatureStore(str(tiny_shop / "events"), setup.catalog["item_id"], None)
    users = store.users(40)  # (users with a history: the shop's planted bad ids are not)
    try:
        serve.run(build_app(args, deployment), name=APP, route_prefix="/")
        assert running_replicas(APP, DEPLOYMENT) == 1
        load = ClosedLoop(f"http://127.0.0.1:{port}", KEY, users, max_clients=8, k=5).start(1)
        try:
            # Up: 8 clients against a target of 2 in flight a replica; down: one client (1 in
            # flight, under the target), still sending requests while a replica goes.
            cycle = scale_cycle(load, APP, DEPLOYMENT, high=8, low=1, replicas=2, hold_s=4)
        finally:
            load.stop()
        on_exit = pads.dataset(served, partitioning="hive").to_table(["request_id"])
    finally:
        serve.shutdown()  # the last replica writes its buffer

    timeline, marks = cycle["timeline"], cycle["marks"]
    counts = [n for _, n in timeline]
    assert counts[0] == 1 and max(counts) == 2 and counts[-1] == 1, timeline
    samples = load.samples
    answers = [s for s in samples if s.route == "recommend"]
    feedback = [s for s in samples if s.route == "feedback"]
    assert not load.errors, load.errors[:3]
    assert {s.status for s in answers} == {200} and {s.status for s in feedback} == {202}
    # Both replicas answered, and took feedback about answers the other one gave.
    assert len({s.replica for s in answers}) >= 2
    answered_by = {s.request_id: s.replica for s in answers}
    crossed = sum(answered_by[s.request_id] != s.replica for s in feedback)
    assert crossed > 0
    # Requests went on during the scale-down too.
    assert any(marks["load_down"] < s.t < marks["scaled_down"] for s in answers)
    # The removed replica wrote its buffer as it went: every answer it gave is on disk.
    # (a second's grace: the proxy learns of the stopping replica a moment after Serve counts it)
    survivor = {s.replica for s in answers if s.t > marks["scaled_down"] + 1.0}
    assert len(survivor) == 1
    removed = {rid for rid, replica in answered_by.items() if replica not in survivor}
    assert removed and set(on_exit["request_id"].to_pylist()) == removed

    impressions = pads.dataset(served, partitioning="hive").to_table()
    assert impressions.num_rows == sum(s.items for s in answers)
    assert set(impressions["request_id"].to_pylist()) == set(answered_by)
    outcomes = read_parquet_folder(str(served / "_outcomes"))
    joined, left_out = join_outcomes(impressions, outcomes)
    assert left_out["joined"] == len(feedback) == sum(left_out.values()), left_out
    assert sorted(joined["request_id"].to_pylist()) == sorted(s.request_id for s in feedback)
