"""The CPU an AOTInductor package is compiled for, and whether the loading CPU can run it.

Two things depend on the target CPU and neither is visible in the package without this record:

- the C++ Inductor generates: by default it is built with `-march=native`, so a package compiled on
  an AVX-512 machine may hold AVX-512 instructions anywhere and dies with SIGILL on an AVX2 one;
- the kernel plan (`kernels/cpu.py`): which aten kernel wins at which row count depends on VNNI
  (int8 x int8 dot products) and AVX512-BF16 / AMX (bf16 GEMMs), measured per ISA.

The target is this process's CPU, capped by `ATEN_CPU_CAPABILITY` (torch's own switch, which also
picks Inductor's vector ISA): forcing `avx2` or `default` makes the plan assume that ISA and compiles
the C++ for `x86-64-v3` (AVX2, FMA, F16C, BMI) or `x86-64` instead of `native`, so the package runs
on any CPU of that class. `TORCHINDUCTOR_CPP_MARCH` / the `cpp.march` option, when set, win, and the
package also requires the extensions that march enables (`march_features`).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["CPUTarget", "compile_target", "describe_host", "has_int8_dot", "host_features", "missing_features"]

#: features (names as `torch.cpu.get_capabilities()` spells them) that each forced capability keeps;
#: None keeps everything the CPU has
_X86_KEPT = {
    "DEFAULT": frozenset({"sse", "sse2"}),
    "AVX2": frozenset({"sse", "sse2", "sse3", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma3", "f16c", "bmi", "bmi2", "lzcnt"}),
}
#: -march for a forced capability (x86-64-v3 is the AVX2 level of the x86-64 psABI)
_X86_MARCH = {"DEFAULT": "x86-64", "AVX2": "x86-64-v3"}
#: keys of get_capabilities() that are not instruction sets
_NOT_ISA = frozenset({"architecture", "cpu_name"})


@functools.cache
def host_features() -> frozenset[str]:
    """The instruction-set extensions this CPU has (cpuinfo's view through torch, so qemu's model
    of a CPU is reported as that CPU); on ARM64 /proc/cpuinfo's `Features` too (asimddp, sve, i8mm)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    found = {k for k, v in caps.items() if v is True and k not in _NOT_ISA}
    if platform.machine() in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.lower().startswith("features"):
                        found.update(line.split(":", 1)[1].split())
        except OSError:
            pass
    return frozenset(found)


@functools.cache
def march_features(march: str) -> frozenset[str] | None:
    """The x86 extensions Inductor's C++ compiler enables for `-march=<march>`, named as
    `torch.cpu.get_capabilities()` names them (read from the compiler's predefined macros), or None
    when no compiler answers. A caller's `cpp.march` builds the package's C++ whatever ATen is capped
    to, so the package needs what that march enables: `native` under ATEN_CPU_CAPABILITY=avx2 was
    recorded as needing AVX2 only while its code used AVX-512."""
    out = _predefined_macros(march)
    if out is None or out.returncode:
        return None
    found = set()
    for macro in re.findall(r"#define __([A-Z0-9_]+)__ 1", out.stdout):
        name = macro.lower()
        if not re.fullmatch(r"(s?sse\w*|avx\w*|fma|f16c|bmi2?|lzcnt|popcnt|amx\w*)", name) or name.endswith("_math"):
            continue
        name = {"fma": "fma3", "avxvnni": "avx_vnni"}.get(name, name)
        found.add(re.sub(r"^(avx512|amx)_?(\w+)$", r"\1_\2", name))
    return frozenset(found)


@functools.cache
def _predefined_macros(march: str) -> "subprocess.CompletedProcess[str] | None":
    """Inductor's C++ compiler run on nothing with `-march=<march>`: its predefined macros, or its refusal;
    None when no compiler answers."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return subprocess.run([get_cpp_compiler(), f"-march={march}", "-dM", "-E", "-x", "c++", "-"], input="",
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError, RuntimeError, ImportError):
        return None


def march_refusal(march: str) -> str | None:
    """The C++ compiler's first error line when it refuses `-march=<march>` (a typo in `cpp.march` or
    TORCHINDUCTOR_CPP_MARCH), None when it takes it or no compiler answers. Checked before any work:
    Inductor meets it only at its C++ build, after the kernels are chosen, with a page of compiler output."""
    out = _predefined_macros(march)
    if out is None or not out.returncode:
        return None
    lines = [ln.strip() for ln in out.stderr.splitlines() if ln.strip()]
    return lines[0] if lines else f"exit status {out.returncode}"


@dataclass(frozen=True)
class CPUTarget:
    """What a CPU package is compiled for (recorded in its manifest as `extra.cpu_target`)."""

    arch: str
    #: torch's ATen CPU capability in force when compiling ("AVX2", "AVX512", "DEFAULT", "SVE256", ...)
    capability: str
    #: the -march the C++ was compiled with ("native" unless forced)
    march: str
    #: the instruction-set extensions the package's code and plan may use: a loading CPU needs all
    requires: tuple[str, ...] = ()
    #: whether ATEN_CPU_CAPABILITY capped the host's ISA
    forced: bool = False

    @property
    def vnni(self) -> bool:
        """int8 x int8 dot-product instructions: what makes aten._int_mm faster than fp32 GEMMs."""
        return bool({"avx512_vnni", "amx_int8"} & set(self.requires))

    @property
    def bf16_gemm(self) -> bool:
        """bf16 dot-product instructions: without them a bf16 GEMM runs at ~0.3x fp32 (AVX2)."""
        return bool({"avx512_bf16", "amx_bf16"} & set(self.requires))

    def describe(self) -> str:
        extras = [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "sve", "asimddp") if f in self.requires]
        forced = " (forced by ATEN_CPU_CAPABILITY)" if self.forced else ""
        return f"{self.arch} {self.capability}{forced}, -march={self.march}" + (f", {' '.join(extras)}" if extras else "")

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "capability": self.capability, "march": self.march,
                "requires": list(self.requires), "forced": self.forced}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CPUTarget":
        req = data.get("requires", [])
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise ValueError("cpu_target.requires must be a list of strings")
        return cls(arch=str(data.get("arch", "?")), capability=str(data.get("capability", "?")),
                   march=str(data.get("march", "?")), requires=tuple(req), forced=bool(data.get("forced", False)))


def compile_target(march_option: str | None = None) -> CPUTarget:
    """The target of a compile in this process: this CPU, capped by ATEN_CPU_CAPABILITY.

    `march_option`: the caller's `cpp.march` Inductor option, if any (it wins over ours)."""
    arch = platform.machine()
    capability = torch.backends.cpu.get_cpu_capability()
    host = host_features()
    forced = bool(os.environ.get("ATEN_CPU_CAPABILITY"))
    kept = _X86_KEPT.get(capability) if arch in ("x86_64", "AMD64") else None
    requires = host if kept is None else host & kept
    user_march = march_option or os.environ.get("TORCHINDUCTOR_CPP_MARCH")
    if user_march:
        march = user_march
        enabled = march_features(march) if arch in ("x86_64", "AMD64") else None
        requires = requires | (host if enabled is None else enabled)  # unknown: assume it may use all of this CPU
    elif kept is not None:
        march = _X86_MARCH[capability]
    else:
        march = "native"
    return CPUTarget(arch=arch, capability=capability, march=march, requires=tuple(sorted(requires)),
                     forced=forced and kept is not None)


def missing_features(target: CPUTarget, host: frozenset[str] | None = None) -> list[str]:
    """What `target` needs that the (loading) CPU lacks; [] when it can run the package."""
    host = host_features() if host is None else host
    if target.arch != platform.machine():
        return [f"arch {target.arch}"]
    return [f for f in target.requires if f not in host]


def has_int8_dot() -> bool:
    """Whether this CPU adds u8 x s8 products without 16-bit saturation: VNNI on x86 (AVX512-VNNI or
    AVX-VNNI; onnxruntime's fused int8 kernels saturate without it), always on ARM64."""
    if platform.machine() in ("aarch64", "arm64"):
        return True
    return bool({"avx512_vnni", "avx_vnni"} & host_features())


def describe_host() -> str:
    """One phrase for messages: this CPU's architecture and int8 dot-product support."""
    arch = platform.machine()
    if arch in ("x86_64", "AMD64"):
        return f"x86-64 {torch.backends.cpu.get_cpu_capability()} {'with' if has_int8_dot() else 'without'} VNNI"
    return arch
