"""Running on a Ray cluster: cluster.yaml read by Ray's own launcher code, and a real multi-node
cluster on this machine that a training job is submitted to through the Jobs API.

The multi-node cluster is separate `ray start --block` processes (a head and a worker node, each
with its own temp dir and ports, token authentication on), reached by address only: nothing here
calls `ray.init`, so the session's in-process `ray_local` cluster is untouched.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import free_port, shop_overrides
from shoprank.cluster import job_runtime_env

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
REMOTE_HOME = "/home/ubuntu"  # the ssh_user's home on the nodes


def prepared_cluster_config() -> dict:
    """cluster.yaml as `ray up` sees it: merged with the provider's defaults, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)
    return config


def node_commands(config: dict, node_type: str) -> dict[str, list[str]]:
    """The commands the launcher runs on a node of this type, in its order (a node type's own
    lists override the cluster-wide ones, as in Ray's NodeUpdater)."""
    head = node_type == config["head_node_type"]
    spec = config["available_node_types"][node_type]
    setup_key = "head_setup_commands" if head else "worker_setup_commands"
    start_key = "head_start_ray_commands" if head else "worker_start_ray_commands"
    return {
        "init": spec.get("initialization_commands", config["initialization_commands"]),
        "setup": spec.get(setup_key, config[setup_key]),
        "start": config[start_key],
    }


def test_cluster_yaml_passes_rays_validator_and_installs_the_project():
    config = prepared_cluster_config()
    assert set(config["available_node_types"]) == {"head", "gpu_worker"}
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1
    # The repository reaches every node (file_mounts go to workers too), without what git
    # ignores (.venv, data, runs, registry).
    mounts = config["file_mounts"]
    assert mounts[f"{REMOTE_HOME}/shoprank"] == "."
    assert ".gitignore" in config["rsync_filter"]
    python = platform.python_version()  # the venv's, which the tests run on
    for node_type in config["available_node_types"]:
        setup = "\n".join(node_commands(config, node_type)["setup"])
        # Python pinned to the local patch version, then scripts/install.sh with its pins and a
        # CUDA build of torch, and a check that fails `ray up` if the venv got another Python.
        assert f"uv python install {python}" in setup, node_type
        assert re.search(r"TORCH_CUDA=cu\d+ .*bash scripts/install\.sh", setup), node_type
        assert f"sys.version_info[:3] == {tuple(int(p) for p in python.split('.'))}" in setup
        # Nothing installed unpinned (Ray's AWS defaults would add `pip install boto3>=...`).
        assert not re.search(r"pip install(?![^\n]*==)", setup), setup
    # Nothing secret is written into the file itself: only paths to files outside the repo.
    text = CLUSTER_YAML.read_text()
    for pattern in (r"AKIA[0-9A-Z]{12,}", r"(?i)secret_access_key\s*[:=]\s*\S", r"RAY_AUTH_TOKEN="):
        assert not re.search(pattern, text), pattern
    local_secrets = [p for remote, p in mounts.items() if remote != f"{REMOTE_HOME}/shoprank"]
    assert local_secrets and all(p.startswith("~/") for p in local_secrets)


def _fake_node(tmp: Path, config: dict) -> tuple[Path, Path]:
    """A home folder laid out as a node's after the file mounts: the token and the secrets
    file (test values), and a `ray` that records what it was started with."""
    home = tmp / "home"
    for remote, local in config["file_mounts"].items():
        if local == ".":
            continue
        target = home / Path(remote).relative_to(REMOTE_HOME)
        target.parent.mkdir(parents=True, exist_ok=True)
        name = Path(local).name
        target.write_text(
            "test-token-0123" if name == "auth_token" else "AWS_ACCESS_KEY_ID=test-key-id\n"
        )
    venv_bin = home / "shoprank" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    record = tmp / "ray-starts.jsonl"
    ray = venv_bin / "ray"
    ray.write_text(
        "#!/bin/sh\n"
        f'exec {sys.executable} -c "import json, os, sys; '
        f"open('{record}', 'a').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd(), "
        "'env': dict(os.environ)}) + '\\n')\" \"$@\"\n"
    )
    ray.chmod(0o755)
    return home, record


@pytest.mark.parametrize("node_type", ["head", "gpu_worker"])
def test_every_node_type_starts_ray_with_token_auth_and_storage_credentials(tmp_path, node_type):
    """Runs the node type's initialization and start commands the way the launcher runs them
    over ssh (Ray's own command wrapping: an interactive login bash), in a fake home holding
    the mounted files, with `ray` recording its environment: each `ray start` must see token
    auth on, the mounted token, the mounted secrets and the project's venv first on PATH."""
    from ray.autoscaler._private.command_runner import _with_interactive
    from ray.autoscaler._private.util import with_head_node_ip

    config = prepared_cluster_config()
    home, record = _fake_node(tmp_path, config)
    commands = node_commands(config, node_type)
    start = commands["start"]
    if node_type != config["head_node_type"]:
        start = with_head_node_ip(start, "10.0.0.1")  # as the autoscaler starts a worker node
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "TERM": "dumb"}
    for cmd in [*commands["init"], *start]:
        wrapped = _with_interactive(cmd)  # what the launcher runs over ssh
        run = subprocess.run(
            " ".join(wrapped), shell=True, env=env, capture_output=True, text=True, timeout=30
        )
        assert run.returncode == 0, (cmd, run.stdout, run.stderr)
    starts = [json.loads(line) for line in record.read_text().splitlines()]
    started = [s for s in starts if s["argv"][:1] == ["start"]]
    assert len(started) == 1, starts
    ray_start = started[0]
    assert ray_start["env"]["RAY_AUTH_MODE"] == "token"
    assert (home / ".ray" / "auth_token").read_text() == "test-token-0123"
    assert ray_start["env"]["AWS_ACCESS_KEY_ID"] == "test-key-id"
    assert ray_start["env"]["PATH"].split(":")[0] == str(home / "shoprank" / ".venv" / "bin")
    assert ray_start["cwd"] == str(home / "shoprank")
    if node_type == "head":
        assert "--head" in ray_start["argv"]
    else:
        assert "--address=10.0.0.1:6379" in ray_start["argv"]


def test_job_runtime_env_ships_the_code_and_refuses_secrets(tmp_path):
    env = job_runtime_env(ROOT)
    assert env["working_dir"] == str(ROOT)
    assert env["py_modules"] == [str(ROOT / "lib" / "shoprank")]
    printed = subprocess.run(
        [sys.executable, "-m", "shoprank.cluster"], cwd=ROOT, capture_output=True, text=True
    )
    assert json.loads(printed.stdout) == env
    with pytest.raises(ValueError, match=r"repo=.* is not the shoprank repository"):
        job_runtime_env(tmp_path)
    with pytest.raises(ValueError, match=r"\['AWS_SECRET_ACCESS_KEY'\] look like secrets"):
        job_runtime_env(ROOT, {"AWS_SECRET_ACCESS_KEY": "x", "MLFLOW_TRACKING_URI": "file:///m"})


class LocalCluster:
    """A head and worker nodes on this machine: `ray start --block` processes, each in its own
    session (process group) with its own temp dir and ports, token authentication on. Stopped by
    signalling those processes, never `ray stop` (which stops every Ray on the machine)."""

    def __init__(self, root: Path, cpus_per_node: int = 1):
        self.root, self.cpus = root, cpus_per_node
        self.token = secrets.token_hex(16)
        token_file = root / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        venv_bin = str(Path(sys.executable).parent)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token_file),
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{venv_bin}:{env.get('PATH', '')}",  # `python` in a job is the venv's
        )
        self.env = env
        self.taken: set[int] = set()
        self.gcs_port, self.dashboard_port, self.client_port = self._ports(3)
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []

    def _ports(self, n: int) -> list[int]:
        """n free TCP ports, none given out before (a port just freed can come back)."""
        out: list[int] = []
        while len(out) < n:
            port = free_port()
            if port not in self.taken:
                self.taken.add(port)
                out.append(port)
        return out

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _start(self, name: str, args: list[str]) -> None:
        temp = self.root / name
        temp.mkdir()
        flags = (
            "node-manager-port",
            "object-manager-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
        ports = [
            f"--{flag}={port}" for flag, port in zip(flags, self._ports(len(flags)), strict=True)
        ]
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--block",
            f"--temp-dir={temp}",
            f"--num-cpus={self.cpus}",
            "--num-gpus=0",
            f"--object-store-memory={300 * 1024**2}",
            *ports,
            *args,
        ]
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        self.nodes.append(
            subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def start(self, workers: int = 1, timeout: float = 60) -> None:
        self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.client_port}",
            ],
        )
        self.wait_for_nodes(1, timeout)
        for i in range(workers):
            self._start(f"worker{i}", [f"--address=127.0.0.1:{self.gcs_port}"])
        self.wait_for_nodes(1 + workers, timeout)

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray's State API over HTTP (what `ray list` calls)."""
        params = {"detail": "true", "limit": "1000"}
        if filters:
            params |= {
                "filter_keys": list(filters),
                "filter_predicates": ["="] * len(filters),
                "filter_values": list(filters.values()),
            }
        got = httpx.get(f"{self.url}/api/v0/{resource}", params=params, headers=self.headers)
        got.raise_for_status()
        return got.json()["data"]["result"]["result"]

    def wait_for_nodes(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.nodes:
                if p.poll() is not None:
                    logs = "\n".join(f.read_text()[-3000:] for f in self.root.glob("*.log"))
                    raise RuntimeError(f"a ray start process exited ({p.returncode}):\n{logs}")
            try:
                alive = self.state("nodes", state="ALIVE")
                if len(alive) >= n:
                    return
            except httpx.HTTPError:
                pass  # the dashboard is not up yet
            time.sleep(0.5)
        raise TimeoutError(f"{n} Ray nodes were not alive after {timeout} s")

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops the processes it started), then SIGKILL
        whatever is left in its process group."""
        for p in reversed(self.nodes):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.nodes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError):  # the group is gone already
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture
def local_cluster():
    # A short temp dir: Ray's Unix socket paths under it must stay under 107 characters.
    root = Path(tempfile.mkdtemp(prefix="srk-", dir="/tmp"))
    cluster = LocalCluster(root)
    try:
        cluster.start(workers=1)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_training_job_runs_across_two_nodes(local_cluster, tmp_path, tiny_shop, tiny_model_dir):
    from ray.job_submission import JobStatus, JobSubmissionClient

    cluster = local_cluster
    # Token auth is on: the Jobs API refuses a client without the token.
    assert httpx.get(f"{cluster.url}/api/jobs/").status_code == 401
    nodes = {n["node_id"] for n in cluster.state("nodes", state="ALIVE")}
    assert len(nodes) == 2

    storage = tmp_path / "shared"  # a local folder is storage both nodes see, on one machine
    overrides = [
        *shop_overrides(tiny_shop),
        f"run.storage={storage}",
        f"registry.root={tmp_path / 'registry'}",
        "run.name=cluster-job",
        f"model.name={tiny_model_dir}",
        "model.max_length=64",
        "train.num_workers=2",
        "train.cpus_per_worker=1",  # each node has one CPU: one worker per node
        "train.max_steps=4",
        "train.batch_size=4",
        "train.lr=1e-3",
        "data.val_users=8",
        "data.test_users=8",
        "data.eval_candidates=10",
        "data.max_train_positives=100",
        "data.max_bad_fraction=0.5",
        "eval.num_cpus=1",
        "eval.zero_shot=false",  # the fine-tuned ranker alone: each scorer is an actor to start
        "eval.baselines=[]",
    ]
    where = (
        "import os, shoprank; print('shoprank imported from', shoprank.__path__[0]); "
        "print('working dir holds', sorted(os.listdir('.')))"
    )
    entrypoint = f"python -c {shlex.quote(where)} && python jobs/train.py " + " ".join(
        shlex.quote(o) for o in overrides
    )
    client = JobSubmissionClient(cluster.url, headers=cluster.headers)
    job = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env(ROOT))
    # Measured: about 200 s on a 2-core machine, nearly all of it processes starting cold (each
    # Ray Data actor, Ray Train worker and scorer imports torch anew on a fresh cluster).
    deadline = time.monotonic() + 400
    while not (status := client.get_job_status(job)).is_terminal() and (
        time.monotonic() < deadline
    ):
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]

    # The job ran the uploaded code (py_modules), not the copy installed in the venv.
    imported = re.search(r"shoprank imported from (\S+)", logs).group(1)
    assert "runtime_resources" in imported and str(ROOT) not in imported, imported
    # ... in a copy of the repository without what .gitignore lists (local data, outputs).
    listed = re.search(r"working dir holds (\[.*\])", logs).group(1)
    assert {"jobs", "configs", "tune", "serve"} <= set(ast.literal_eval(listed)), listed
    assert not {"data", "runs", "registry", ".venv", ".git"} & set(ast.literal_eval(listed)), listed

    # Its two training workers ran on different nodes.
    ray_job_id = client.get_job_info(job).job_id
    workers = cluster.state("actors", class_name="RayTrainWorker", job_id=ray_job_id)
    placement = {w["pid"]: w["node_id"] for w in workers}
    print(f"training workers (pid: node): {placement}")
    assert len(workers) == 2 and set(placement.values()) == nodes

    # Both wrote their shard of each checkpoint into the same folder of the shared storage.
    out = storage / "cluster-job"
    checkpoints = sorted(p for p in out.glob("checkpoint_*") if p.is_dir())
    assert checkpoints, sorted(p.name for p in out.iterdir())
    shards = {p.name for p in (checkpoints[-1] / "deepspeed").rglob("*optim_states.pt")}
    assert len(shards) == 2, shards
    assert (out / "export" / "shoprank.json").is_file()
    assert json.loads((out / "report_test" / "metrics.json").read_text())["fine-tuned ranker"]
