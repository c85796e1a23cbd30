"""What this machine's CPU can do, as far as quantized kernels care.

Read from the kernel's view of the CPU (/proc/cpuinfo flags) rather than torch's dispatch level,
because other runtimes (onnxruntime, oneDNN) pick their integer kernels from the CPU itself:
`ATEN_CPU_CAPABILITY=avx2` caps torch, not them.
"""

from __future__ import annotations

import functools
import platform


def arch() -> str:
    """'x86_64', 'arm64' or the machine name as Python reports it."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "aarch64": "arm64"}.get(m, m)


@functools.cache
def flags() -> frozenset[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def has_int8_dot() -> bool:
    """Whether u8 x s8 products accumulate without 16-bit saturation: VNNI on x86 (AVX512-VNNI or
    AVX-VNNI); ARM64's int8 kernels always widen first."""
    if arch() == "arm64":
        return True
    return bool(flags() & {"avx512_vnni", "avx_vnni"})


def describe() -> str:
    """One phrase for messages: the architecture and its int8 dot-product support."""
    if arch() == "x86_64":
        return f"x86-64 {'with' if has_int8_dot() else 'without'} VNNI"
    return arch()
