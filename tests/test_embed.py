"""Ray Data batch inference of contexts on a cluster its embedding actors fill."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest

from shoprank.config import Config
from shoprank.models.retriever import EncoderSpec
from shoprank.retrieval.embed import embed_contexts

pytestmark = pytest.mark.usefixtures("ray_local")


def test_embed_contexts_when_the_pool_holds_every_cpu(ray_local, tiny_model_dir) -> None:
    """The embedding actors ask for all of the cluster's CPUs (a 2-core machine's default):
    the positive-only projection upstream of them must not wait for a CPU (it once hung)."""
    cpus = ray_local.cluster_resources()["CPU"]
    cfg = Config.model_validate({"model": {"name": tiny_model_dir}, "eval": {"num_cpus": cpus}})
    ids = [f"i{j}" for j in range(6)]
    groups = ray_local.data.from_arrow(
        pa.table(
            {
                "user_id": ["u2", "u1", "u3"],
                "context": ["red mug", "blue pan", "green bottle"],
                "history_ids": [["i1"], ["i2", "i3"], ["i4"]],
                "item_ids": [["i5", "i0"], ["i1", "i4"], ["i3", "i2"]],
                "item_texts": [["a", "b"], ["c", "d"], ["e", "f"]],
                "labels": [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],
            }
        )
    )
    # A liveness bound, not a speed goal: the call takes seconds; a hang never ends (a daemon
    # thread, so that a hung call fails the test instead of the whole run).
    out: list = []
    worker = threading.Thread(
        target=lambda: out.append(embed_contexts(groups, EncoderSpec.zero_shot(cfg), cfg, ids)),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=240)
    assert out, "embed_contexts did not return within 240 s: its pipeline waits for CPUs"
    contexts = out[0]
    assert list(contexts.user_id) == ["u1", "u2", "u3"]
    np.testing.assert_array_equal(contexts.target, [1, 5, 3])
    assert contexts.history_ids == [["i2", "i3"], ["i1"], ["i4"]]
    assert contexts.embedding.shape[0] == 3 and np.isfinite(contexts.embedding).all()
