"""Held-out users: a sample of them is the same sample every run."""

from __future__ import annotations

import zlib

import pytest

from conftest import shop_overrides
from shoprank.config import load_config
from shoprank.data.examples import first_by_user_hash
from shoprank.run import Run, output_dir

pytestmark = pytest.mark.slow


def test_val_users_are_the_first_by_a_hash_of_the_id(ray_local, tmp_path, tiny_shop):
    cfg = load_config(
        None, [*shop_overrides(tiny_shop), f"run.storage={tmp_path}", "data.val_users=null"]
    )
    valid = Run(cfg, output_dir(cfg)).examples["valid"]
    everyone = sorted(valid.unique("user_id"))
    assert len(everyone) > 10
    # What data.val_users=10 keeps (data/examples.py): whichever order Ray Data's groups came in.
    for shuffled in (valid, valid.random_shuffle(seed=1)):
        chosen = sorted(first_by_user_hash(shuffled, 10).unique("user_id"))
        assert chosen == sorted(sorted(everyone, key=lambda u: zlib.crc32(u.encode()))[:10])


def test_a_task_builds_its_class_once_per_map_call_and_keeps_a_few():
    """data.tasks: a worker builds each map call's instance once, whatever the batches."""
    from shoprank.data import tasks

    built = []

    class Counter:
        def __init__(self, name):
            built.append(name)

        def __call__(self, batch):
            return batch + 1

    first = tasks.as_tasks(Counter, {"name": "a"})
    assert [first["fn"](b, **first["fn_kwargs"]) for b in (1, 2, 3)] == [2, 3, 4]
    assert built == ["a"]
    second = tasks.as_tasks(Counter, {"name": "a"})  # another map call: its own instance
    second["fn"](0, **second["fn_kwargs"])
    assert built == ["a", "a"]
    for i in range(tasks._KEEP + 1):  # older instances go past a few
        other = tasks.as_tasks(Counter, {"name": str(i)})
        other["fn"](0, **other["fn_kwargs"])
    assert len(tasks._BUILT) == tasks._KEEP and first["fn_kwargs"]["key"] not in tasks._BUILT
