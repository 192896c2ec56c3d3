"""What a job submitted to a Ray cluster carries: the project's code as it is on your machine now.

cluster.yaml installs the pinned dependencies (and a copy of the project) on every node once, at
`ray up`: torch, DeepSpeed and Ray are gigabytes of compiled wheels that must not be reinstalled
per job. The code, small and changing, travels with each submission instead: the repository as
the job's `working_dir` (jobs/, configs/, tune/, serve/) and lib/shoprank as a `py_modules`
entry, which Ray puts on every job process's PYTHONPATH, ahead of the installed copy. A code
change then reaches every node with the next `ray job submit`, without another `ray up`.

    ray job submit --address http://127.0.0.1:8265 \\
        --runtime-env-json "$(.venv/bin/python -m shoprank.cluster)" -- python jobs/train.py ...
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# Not uploaded: what .gitignore lists (.venv/, data/, runs/, registry/, outputs/: Ray honours
# .gitignore files, and leaves out .git and .venv by itself). No `excludes` of our own: Ray applies
# them to py_modules too, where a pattern like `/data/` drops shoprank.data. Relative paths in a
# submitted job resolve inside the uploaded copy, so data and outputs must be URIs (or absolute
# paths) that every node sees.

# What a job process needs besides the nodes' environment (console.ENVIRONMENT covers the rest,
# set by the job itself).
ENV_VARS = {"TOKENIZERS_PARALLELISM": "false"}

# env_vars are stored with the job and shown on the dashboard: secrets belong in the nodes'
# ~/.shoprank/secrets.env (cluster.yaml), never here.
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def job_runtime_env(repo: str | Path = ".", env_vars: dict[str, str] | None = None) -> dict:
    """The runtime_env for `ray job submit` of any entry point (jobs/*.py, tune/sweep.py)."""
    root = Path(repo).resolve()
    package = root / "lib" / "shoprank"
    if not (package / "__init__.py").is_file() or not (root / "jobs").is_dir():
        raise ValueError(
            f"repo={str(root)!r} is not the shoprank repository (it needs lib/shoprank/ and "
            "jobs/): run from the repository root or pass its path"
        )
    secret = sorted(k for k in env_vars or {} if SECRET_NAME.search(k))
    if secret:
        raise ValueError(
            f"env_vars {secret} look like secrets: a job's runtime_env is stored with the job "
            "and shown on the dashboard; put them in ~/.shoprank/secrets.env, which cluster.yaml "
            "gives every node (docs/OPERATIONS.md)"
        )
    return {
        "working_dir": str(root),
        "py_modules": [str(package)],
        "env_vars": {**ENV_VARS, **(env_vars or {})},
    }


def main(argv: list[str] | None = None) -> None:
    """Print the runtime_env as JSON, for `ray job submit --runtime-env-json`."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--repo", default=".", help="the repository root (default: the current folder)")
    args = p.parse_args(argv)
    try:
        print(json.dumps(job_runtime_env(args.repo)))
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
