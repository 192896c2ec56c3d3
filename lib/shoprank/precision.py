"""Which float precision to compute in: bf16 only where the device computes it natively.

On a CPU with AMX or AVX512-BF16 (and on most GPUs) bf16 matrix products run several times
faster than fp32; on an AVX2-only CPU torch emulates them in a reference loop, ~50x slower than
fp32. Every place that picks a precision (training autocast, embedding, the evaluation scorers,
the Serve app, the loop simulation) takes `auto | bf16 | fp32` and resolves it here, so that
evaluation and serving on the same host compute alike.

`SHOPRANK_NATIVE_BF16=1|0` forces the answer of the check. `ATEN_CPU_CAPABILITY=avx2` and
`ONEDNN_MAX_CPU_ISA=AVX2` (set before torch loads) make torch and oneDNN use AVX2 kernels on a
CPU that has more: the check then answers "no native bf16", as it would on an AVX2 host.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Literal

import torch

from shoprank.console import log

ENV = "SHOPRANK_NATIVE_BF16"
# The variables that pin torch, oneDNN and MKL to AVX2 kernels (tests rerun parity under them).
AVX2_ONLY = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
Choice = Literal["auto", "bf16", "fp32"]
CHOICES: tuple[str, ...] = ("auto", "bf16", "fp32")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) that still allow bf16 instructions.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10", "ALL", "DEFAULT")
_warned: set[str] = set()


def _forced() -> bool | None:
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    if raw:
        raise ValueError(f"{ENV}={raw!r}: use 1 (native bf16) or 0 (none), or unset it")
    return None


@functools.cache
def _cpu_native_bf16() -> bool:
    if platform.machine().lower() in ("x86_64", "amd64"):
        if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            return False  # AVX2 kernels (the CPU's best, or ATEN_CPU_CAPABILITY=avx2)
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
        if isa and not isa.upper().startswith(_BF16_ISAS):
            return False
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # e.g. Arm with BF16 (SVE)


def native_bf16(device: str | torch.device | None = None) -> bool:
    """Whether `device` (default: the GPU when there is one, else the CPU) computes bf16
    matrix products natively."""
    forced = _forced()
    if forced is not None:
        return forced
    kind = torch.device(device).type if device is not None else _default_device()
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return kind == "cpu" and _cpu_native_bf16()


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(choice: str, device: str | torch.device | None = None) -> str:
    """`auto` -> bf16 where native, else fp32; an explicit bf16 on a device without it still
    runs, and the job says once that it is emulated. Other backends (int8, onnx) pass through."""
    if choice == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if choice == "bf16" and not native_bf16(device) and "bf16" not in _warned:
        _warned.add("bf16")
        log(
            "precision bf16 asked for on a device without native bf16 "
            f"({describe()['cpu_capability']}): it is emulated, many times slower than fp32; "
            "use precision auto (or fp32)"
        )
    return choice


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ranker_backend(choice: str, device: str | torch.device | None = None) -> str:
    """The cross-encoder's backend for `choice`: auto = torch bf16 weights where bf16 is
    native; on a CPU without it, ONNX Runtime fp32 (the same network, logits within 1e-4 of
    torch fp32, tests/test_precision.py; its MLAS kernels scored 1.75x torch fp32's pairs/s on
    an AVX2 host, where MKL takes its slow path on AMD CPUs); on a GPU without it, fp32.
    Evaluation and the Serve app both resolve through here, so both score alike."""
    if choice != "auto":
        return resolve(choice, device)
    if native_bf16(device):
        return "bf16"
    kind = torch.device(device).type if device is not None else _default_device()
    return "onnx" if kind == "cpu" else "fp32"


def describe() -> dict:
    """What reports, benches and /version record about the host's precision."""
    forced = _forced()
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        "forced_by": ENV if forced is not None else None,
        "device": _default_device(),
    }


def host_line(computed: str) -> str:
    """One line for a report or bench: which CPU, whether bf16 is native, what ran."""
    d = describe()
    native = "yes" if d["native_bf16"] else "no"
    forced = f" (forced by {d['forced_by']})" if d["forced_by"] else ""
    return (
        f"CPU {d['cpu']}, torch kernels {d['cpu_capability']}, native bf16 {native}{forced}; "
        f"computed in {computed}"
    )
