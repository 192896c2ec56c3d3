"""Start or join Ray: under `ray job submit` (RAY_ADDRESS set) the job joins the cluster;
run as plain `python jobs/...` it starts a local Ray by itself."""

from __future__ import annotations

import os

import ray

# No phoning home from a closed network, and no tokenizer thread pools fighting Ray workers.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def init_ray(num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner asks
        # whether a run's controller is still alive: without it, a sweep trial stopped early
        # keeps its CPUs and the next trial waits for them forever.
        ray.init(num_cpus=num_cpus, include_dashboard=True)
    resources = ray.cluster_resources()
    print(
        f"[shoprank] Ray {ray.__version__} at {address or 'local'}: "
        f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
    )
