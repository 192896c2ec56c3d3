"""Negative sampling from the catalog."""

from __future__ import annotations

import hashlib

import numpy as np


def user_rng(seed: int, user_id: str, salt: str = "") -> np.random.Generator:
    """A generator fixed by (seed, user): the same negatives however Ray partitions the data."""
    digest = hashlib.blake2b(f"{seed}:{salt}:{user_id}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def sample_negatives(
    rng: np.random.Generator,
    n_items: int,
    exclude: np.ndarray,
    k: int,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """k distinct catalog indices, uniformly drawn from `pool` (sorted catalog indices;
    default: the whole catalog), none of them in `exclude` (the positives)."""
    excluded = np.unique(np.asarray(exclude, dtype=np.int64))
    seen = set(excluded.tolist())
    if pool is None:
        size, blocked = n_items, len(excluded)
    else:  # per group: a binary search, not a pass over the pool
        size = len(pool)
        at = np.minimum(np.searchsorted(pool, excluded), max(size - 1, 0))
        blocked = int(np.count_nonzero(pool[at] == excluded)) if size else 0
    available = size - blocked
    if available < k:
        where = "the catalog" if pool is None else "the items the events hold (data.negatives_from)"
        raise ValueError(
            f"cannot sample {k} negatives: {where} has {size} items and "
            f"{blocked} are excluded; lower data.negatives or data.eval_candidates"
        )
    picked: list[int] = []
    while len(picked) < k:
        for idx in rng.integers(0, size, size=2 * (k - len(picked)) + 8).tolist():
            idx = idx if pool is None else int(pool[idx])
            if idx not in seen:
                seen.add(idx)
                picked.append(idx)
                if len(picked) == k:
                    break
    return np.asarray(picked, dtype=np.int64)
