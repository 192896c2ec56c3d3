"""Held-out users: a sample of them is the same sample every run."""

from __future__ import annotations

import zlib

import pytest

from conftest import shop_overrides
from shoprank.config import load_config
from shoprank.run import Run, output_dir

pytestmark = pytest.mark.slow


def _valid_users(tmp_path, shop, n) -> list[str]:
    cfg = load_config(
        None,
        [
            *shop_overrides(shop),
            f"run.storage={tmp_path}",
            f"data.val_users={n}".replace("None", "null"),
        ],
    )
    examples = Run(cfg, output_dir(cfg)).examples
    return sorted(examples["valid"].unique("user_id"))


def test_val_users_are_the_first_by_a_hash_of_the_id(ray_local, tmp_path, tiny_shop):
    everyone = _valid_users(tmp_path, tiny_shop, None)
    chosen = _valid_users(tmp_path, tiny_shop, 10)
    assert len(everyone) > 10
    assert chosen == sorted(sorted(everyone, key=lambda u: zlib.crc32(u.encode()))[:10])
