"""Callable classes run as Ray Data tasks, each built once per worker process.

A class with a cheap setup (a tokenizer, a catalog lookup) needs no actor of its own: starting
an actor (a process importing torch and transformers) takes ~3 s, while tasks run on Ray's pooled
workers, which keep their imports from one job step to the next, and on every free CPU.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict

# This worker's instances, by map call; the oldest dropped past a few.
_BUILT: OrderedDict[str, object] = OrderedDict()
_KEEP = 4


def _call(batch, cls: type, kwargs: dict, key: str):
    built = _BUILT.get(key)
    if built is None:
        built = _BUILT[key] = cls(**kwargs)
        while len(_BUILT) > _KEEP:
            _BUILT.popitem(last=False)
    return built(batch)


def as_tasks(cls: type, kwargs: dict) -> dict:
    """`map_batches` / `map_groups` arguments that apply `cls(**kwargs)` to each batch, built
    once in each worker process that runs this map."""
    return {"fn": _call, "fn_kwargs": {"cls": cls, "kwargs": kwargs, "key": uuid.uuid4().hex}}
