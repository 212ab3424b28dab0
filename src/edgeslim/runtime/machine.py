"""The machine a measurement ran on, written beside every report that holds latencies.

Speed ratios depend on the CPU more than on run-to-run noise: ONNX Runtime's integer kernels
use whichever dot-product instructions the CPU has (AVX2, AVX-512 VNNI, Arm dotprod): the
int8 MobileNetV3-style model of ``benchmarks/operators`` measured 1.20x over fp32 on the
machine of one run and 1.36x on another (``benchmarks/README.md``). A latency figure without
its machine cannot be compared or reproduced, so the reports name it: CPU model, logical
cores, the SIMD extensions integer kernels use, and the versions of the runtimes.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from edgeslim.jsonfile import save_text

MACHINE_FILE = "machine.json"
# channels ONNX Runtime's conv kernels work on at once (NCHWc blocks of 8, 16 on AVX-512):
# the width a recipe's prune and search stages round kept channels to unless told (free
# widths ran slower than fp32 on 10 of 16 CNNs pruned by 30% of MACs, docs/pruning.md)
KERNEL_BLOCK = 8
# SIMD extensions that decide integer-kernel speed (x86: VNNI/AMX dot products; Arm: dotprod,
# i8mm), in the order they are listed
INT8_ISA = (
    "sse4_1", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "amx_int8",
    "asimd", "asimddp", "i8mm", "sve",
)  # fmt: skip


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, set[str]]:
    """CPU model name and feature flags from ``/proc/cpuinfo`` (Linux); (None, {}) elsewhere."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, set()
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def machine_info() -> dict[str, Any]:
    """What a latency measured here depends on (see the module doc)."""
    import torch

    from edgeslim.cost.latency import DEFAULT_THREADS

    model, flags = _cpuinfo()
    info: dict[str, Any] = {
        "cpu": model or platform.processor() or "unknown",
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "int8_isa": [f for f in INT8_ISA if f in flags],
        "torch_threads": torch.get_num_threads(),
        # what latencies are measured at, whatever the process's own setting (OMP_NUM_THREADS)
        "timing_threads": DEFAULT_THREADS,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


VNNI = ("avx_vnni", "avx512_vnni", "amx_int8")


def int8_sums_saturate(info: dict[str, Any] | None = None) -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels add pairs of products in 16 bits here, and
    saturate: an x86 CPU without VNNI (AVX2, or AVX-512 without VNNI). On such a CPU a full
    range int8 weight file computes differently from the model it was made from; 7-bit
    weights (``reduce_range``) cannot overflow. Arm and VNNI CPUs add in 32 bits. False
    when the CPU's flags cannot be read (no ``/proc/cpuinfo``): unknown is not said."""
    info = machine_info() if info is None else info
    isa = set(info.get("int8_isa") or [])
    x86 = str(info.get("arch", "")).lower() in ("x86_64", "amd64", "i686", "x86")
    return x86 and bool(isa) and not isa & set(VNNI)


def int8_weight_bits(info: dict[str, Any] | None = None) -> int:
    """The weight bits a W8A8 file can use here and still compute as torch does: 7 where
    :func:`int8_sums_saturate` (ONNX Runtime's ``reduce_range``), else 8."""
    return 7 if int8_sums_saturate(info) else 8


def describe_machine(info: dict[str, Any]) -> str:
    """One line for a report: ``AMD EPYC (x86_64, 2 logical cores; avx2, avx512_vnni), ...``."""
    isa = ", ".join(info.get("int8_isa") or []) or "no SIMD extension listed"
    runtimes = f"torch {info.get('torch')}"
    if info.get("onnxruntime"):
        runtimes += f", onnxruntime {info['onnxruntime']}"
    return (
        f"{info.get('cpu', 'unknown')} ({info.get('arch')}, {info.get('logical_cores')} "
        f"logical cores; {isa}), latency timed at "
        f"{info.get('timing_threads', info.get('torch_threads'))} threads, {runtimes}"
    )


def save_machine(out: Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out/machine.json`` (this machine unless ``info`` is given); returns the info."""
    info = machine_info() if info is None else info
    save_text(Path(out) / MACHINE_FILE, json.dumps(info, indent=1))
    return info


def load_machine(run: Path) -> dict[str, Any] | None:
    """The ``machine.json`` a run folder holds, or None (older runs, or unreadable)."""
    path = Path(run) / MACHINE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
