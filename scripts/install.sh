#!/usr/bin/env bash
# Installs shoprank and everything it needs into .venv (idempotent).
# torch goes first, pinned to the CPU wheel: left to resolve by itself, pip would fetch a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip==24.3.1"
# TORCH_CUDA=cu126 (GPU machines: cluster.yaml, scripts/gpu_check.sh): the CUDA build of the same
# torch, from PyTorch's own index; the project's pin (torch==2.13.0) accepts it as it is.
if [ -n "${TORCH_CUDA:-}" ]; then
    if ! [[ "$TORCH_CUDA" =~ ^cu[0-9]+$ ]]; then
        echo "TORCH_CUDA=$TORCH_CUDA: give PyTorch's tag of a CUDA version, such as cu126" >&2
        exit 2
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0+$TORCH_CUDA" \
        --index-url "https://download.pytorch.org/whl/$TORCH_CUDA"
else
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
