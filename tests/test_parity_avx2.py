"""Parity on the other kind of CPU: tests/test_parity.py again in a fresh process whose torch,
oneDNN and MKL use AVX2 kernels only (`shoprank.precision.AVX2_ONLY`, set before torch loads),
as on the AVX2-only hosts most rented machines are. On such a host the suite's own run already
was that, and this test says so and skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _avx2_env() -> dict[str, str]:
    from shoprank.precision import AVX2_ONLY, ENV

    env = {k: v for k, v in os.environ.items() if k != ENV}
    return {**env, **AVX2_ONLY}


def test_the_variables_pin_avx2_kernels():
    """Under the variables the capability check answers: AVX2, no native bf16, auto = fp32."""
    probe = (
        "import torch; from shoprank import precision as p; "
        "print(torch.backends.cpu.get_cpu_capability(), p.native_bf16('cpu'), p.resolve('auto'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=_avx2_env(), capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["AVX2", "False", "fp32"], out.stdout + out.stderr


@pytest.mark.slow
def test_parity_holds_with_avx2_kernels():
    import torch

    from shoprank.precision import ENV, native_bf16

    if torch.backends.cpu.get_cpu_capability() == "AVX2" and not os.environ.get(ENV):
        assert not native_bf16("cpu")
        pytest.skip("this host's CPU has AVX2 at most: tests/test_parity.py ran on its kernels")
    got = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_parity.py"],
        cwd=ROOT,
        env=_avx2_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    tail = "\n".join(got.stdout.splitlines()[-15:])
    assert got.returncode == 0, tail
    assert "3 passed" in tail, tail
