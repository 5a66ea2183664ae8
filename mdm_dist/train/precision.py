"""Whether this CPU computes bf16 in hardware (no torch import: ``launch/demo.py`` asks before
it starts any stage)."""

from __future__ import annotations


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """x86 AVX512-BF16 or AMX-BF16 in the kernel's CPU flags; False where they cannot be read
    (e.g. off Linux). There, bf16 matmuls run ~4x faster than fp32 (benchmarks/demo_results.md);
    elsewhere they are emulated and slower."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


__all__ = ["cpu_has_native_bf16"]
