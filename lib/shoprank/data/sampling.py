"""Negative sampling from the catalog."""

from __future__ import annotations

import hashlib

import numpy as np


def user_rng(seed: int, user_id: str, salt: str = "") -> np.random.Generator:
    """A generator fixed by (seed, user): the same negatives however Ray partitions the data."""
    digest = hashlib.blake2b(f"{seed}:{salt}:{user_id}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def sample_negatives(
    rng: np.random.Generator, n_items: int, exclude: np.ndarray, k: int
) -> np.ndarray:
    """k distinct catalog indices, uniformly drawn, none of them in `exclude` (the positives)."""
    excluded = np.unique(np.asarray(exclude, dtype=np.int64))
    available = n_items - len(excluded)
    if available < k:
        raise ValueError(
            f"cannot sample {k} negatives: the catalog has {n_items} items and {len(excluded)} "
            "are excluded; lower data.negatives or data.eval_candidates"
        )
    picked: list[int] = []
    seen = set(excluded.tolist())
    while len(picked) < k:
        for idx in rng.integers(0, n_items, size=2 * (k - len(picked)) + 8).tolist():
            if idx not in seen:
                seen.add(idx)
                picked.append(idx)
                if len(picked) == k:
                    break
    return np.asarray(picked, dtype=np.int64)
