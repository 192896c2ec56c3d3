"""The DeepSpeed engine of one worker: no gradient all-reduce, the same steps as with it."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist

from shoprank.config import TrainConfig
from shoprank.train.loop import build_engine, deepspeed_config


@pytest.fixture
def one_rank():
    """A real gloo process group of one rank in this process, as a Ray Train worker has."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ[key] = value
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _counting(engine) -> list[int]:
    calls = [0]
    reduce = engine.allreduce_gradients

    def counted(*args, **kwargs):
        calls[0] += 1
        return reduce(*args, **kwargs)

    engine.allreduce_gradients = counted
    return calls


def test_one_worker_skips_the_all_reduce_and_steps_the_same(one_rank):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    twin = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-2, warmup_ratio=0.0, num_workers=1)
    steps = 6

    engine = build_engine(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr), cfg, steps, 1)
    plain, _, _, _ = deepspeed.initialize(
        model=twin,
        optimizer=torch.optim.AdamW(twin.parameters(), lr=cfg.lr),
        config=deepspeed_config(cfg, steps, 1),
    )
    calls, plain_calls = _counting(engine), _counting(plain)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    for _ in range(steps):
        for e in (engine, plain):
            loss = torch.nn.functional.mse_loss(e(x), y)
            e.backward(loss)
            e.step()

    assert plain_calls[0] == steps  # DeepSpeed's own default reduces over the one rank
    assert calls[0] == 0
    pairs = zip(model.parameters(), twin.parameters(), strict=True)
    # Bit for bit: clipping and the optimizer step are unchanged.
    assert all(torch.equal(a, b) for a, b in pairs)
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    assert not torch.equal(first[0].weight, model[0].weight)  # and the steps did train
