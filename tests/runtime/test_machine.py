"""The machine record beside every report: parsed from /proc/cpuinfo, saved, described."""

from __future__ import annotations

from pathlib import Path

from edgeslim.runtime.machine import (
    _cpuinfo,
    describe_machine,
    int8_sums_saturate,
    int8_weight_bits,
    load_machine,
    machine_info,
    save_machine,
)

X86 = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse4_1 avx2 avx512f avx512bw avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse4_1 avx2 avx512f avx512bw avx512_vnni
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm asimddp i8mm
CPU implementer\t: 0x41
"""


def test_cpuinfo_reads_the_model_and_flags_of_x86_and_arm(tmp_path: Path) -> None:
    (tmp_path / "x86").write_text(X86)
    (tmp_path / "arm").write_text(ARM)
    model, flags = _cpuinfo(tmp_path / "x86")
    assert model == "AMD EPYC 9R14" and {"avx2", "avx512_vnni"} <= flags
    model, flags = _cpuinfo(tmp_path / "arm")
    assert model is None and {"asimddp", "i8mm"} <= flags
    assert _cpuinfo(tmp_path / "absent") == (None, set())


def test_machine_info_names_this_machine_and_round_trips(tmp_path: Path) -> None:
    import torch

    from edgeslim.cost.latency import DEFAULT_THREADS

    info = machine_info()
    assert info["timing_threads"] == DEFAULT_THREADS
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()
    assert info["logical_cores"] and info["cpu"]
    line = describe_machine(info)
    assert f"torch {torch.__version__}" in line and "logical cores" in line
    save_machine(tmp_path, info)
    assert load_machine(tmp_path) == info
    assert load_machine(tmp_path / "nowhere") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "machine.json").write_text("[1, 2")
    assert load_machine(tmp_path / "bad") is None


def test_describe_lists_the_int8_extensions_or_says_none() -> None:
    info = {"cpu": "X", "arch": "x86_64", "logical_cores": 2, "int8_isa": ["avx2", "avx512_vnni"],
            "torch_threads": 1, "timing_threads": 2, "torch": "2.13.0",
            "onnxruntime": "1.32.0"}  # fmt: skip
    # the threads latency is timed at, not the process's own (OMP_NUM_THREADS=1 read as 1)
    assert describe_machine(info) == (
        "X (x86_64, 2 logical cores; avx2, avx512_vnni), latency timed at 2 threads, "
        "torch 2.13.0, onnxruntime 1.32.0"
    )
    assert "no SIMD extension listed" in describe_machine({**info, "int8_isa": []})


def test_int8_sums_saturate_on_x86_without_vnni_only() -> None:
    def info(arch: str, *isa: str) -> dict[str, object]:
        return {"arch": arch, "int8_isa": list(isa)}

    assert int8_sums_saturate(info("x86_64", "sse4_1", "avx2"))  # AVX2 (e.g. AMD Zen 2/3)
    assert int8_sums_saturate(info("x86_64", "avx2", "avx512f", "avx512bw"))  # no VNNI
    assert not int8_sums_saturate(info("x86_64", "avx2", "avx_vnni"))
    assert not int8_sums_saturate(info("x86_64", "avx2", "avx512_vnni"))
    assert not int8_sums_saturate(info("aarch64", "asimd", "asimddp"))
    assert not int8_sums_saturate(info("x86_64"))  # flags unreadable (no /proc/cpuinfo)
    assert int8_weight_bits(info("x86_64", "sse4_1", "avx2")) == 7  # reduce_range
    assert int8_weight_bits(info("x86_64", "avx2", "avx512_vnni")) == 8
    assert int8_weight_bits(info("aarch64", "asimd")) == 8
