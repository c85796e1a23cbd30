"""AOTInductor lowering for servers: `compile(program, "model.pt2", device="cpu")` and `load_compiled`.

Pipeline (each step a small function, all checks before the first one that costs time):

1. resolve the program (an ExportedProgram or a qexport `.pt2`), check device, options and output;
2. `plan`: ask the backend contract (`plan_regions` on `aoti-<device>`, whose entries are the kernel
   table of `qexport.lower.kernels`) which kernel takes each region;
3. `apply_kernels`: replace the taken regions by those kernels' ops, repacking weights once, here,
   into buffers of the program; the other regions stay `invoke_quant_packed`, which Inductor fuses
   (with `codegen_low_precision` honoured, see `qexport/_upstream.py`);
4. `torch._inductor.aoti_compile_and_package` into a temporary file beside the output, then the
   qexport manifest (regions, schemes and the kernel each got) is added as the archive's extra file
   `extra/qexport/manifest.json`, where `qexport.inspect` reads it, and the file is renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import types
import typing
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import ArtifactError, IncompatibleCPUError, LoweringError, QExportError, UsageError
from ..quiet import log_lines_dropped
from . import resolve_program
from .cpu_target import CPUTarget, compile_target, missing_features
from ._contract import RegionPlan
from ._graph import contiguous_inputs, copy_program
from .kernels import FUSE_MODES, FUSE_OPTION, apply_kernels, inductor_options_for, plan_kernels
from .kernels.cuda_tune import PLAN_MODES as CUDA_PLAN_MODES, PLAN_OPTION as CUDA_PLAN_OPTION
from .report import LoweringReport, RegionReport
from serializers.aoti import DEVICES

__all__ = ["DEVICES", "CompiledModel", "check_cpu", "check_options", "compile", "load_compiled", "plan"]

#: options qexport reads itself; every other key is an Inductor config (torch._inductor.config)
KERNELS_OPTION = "qexport.kernels"
KERNEL_MODES = ("auto", "inductor")
#: how weight-only kernels serve row counts where a float GEMM beats every quantized kernel
#: (compute-bound M): "dequant" (the default) keeps only the quantized weights and decodes them per
#: call (CUDA: in the Triton GEMM's main loop or before cuBLAS); "bf16_weights" also keeps them decoded
#: at compile time for those rows (CUDA: bf16, cuBLAS's speed, +2 bytes per weight in the package and
#: on the GPU; CPU: the target's fastest GEMM dtype, bf16 or fp32). See kernels/cuda.py and kernels/cpu.py.
LARGE_M_OPTION = "qexport.large_m"
LARGE_M_MODES = ("bf16_weights", "dequant")
OPTION_MODES = {KERNELS_OPTION: KERNEL_MODES, LARGE_M_OPTION: LARGE_M_MODES, CUDA_PLAN_OPTION: CUDA_PLAN_MODES,
                FUSE_OPTION: FUSE_MODES}

#: Inductor options that change the package's form, with the value `load_compiled` needs and why
#: another is refused before any work: each one compiled for tens of seconds, then (torch 2.13) wrote a
#: package that crashed or could not be loaded, or failed at the very end
PACKAGE_FORM_OPTIONS: dict[str, tuple[Any, str]] = {
    "aot_inductor.package_constants_in_so": (
        True, "the package would hold no weights, and running it crashed the process (SIGSEGV)"),
    "aot_inductor.package_constants_on_disk_format": (
        None, "the weights would be files beside the model code, which load_compiled refuses as members of a package"),
    "aot_inductor.link_libtorch": (
        True, "a package whose code does not link libtorch fails to load (dlopen refused it)"),
    "aot_inductor.dynamic_linkage": (
        True, "it builds a static library for standalone C++ use, not a package load_compiled can open"),
    "aot_inductor_mode.compile_standalone": (
        False, "it builds standalone C++ (no libtorch, static linkage), not a package load_compiled can open"),
    "aot_inductor.cross_target_platform": (
        None, "a package for another operating system cannot be loaded or checked here"),
}

Progress = Callable[[str], None]


def check_options(device: str, options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `options` into (qexport's, Inductor's), refusing unknown keys before any work."""
    if device not in DEVICES:
        raise LoweringError(f"device={device!r} is not one of {DEVICES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise LoweringError("device='cuda' but this torch sees no CUDA device; compile on a GPU machine or use device='cpu'")
    if options is not None and not isinstance(options, Mapping):
        raise LoweringError(f"options must be a dict of Inductor configs, got {type(options).__name__}")
    if not all(isinstance(k, str) for k in (options or {})):
        bad = next(k for k in options if not isinstance(k, str))  # type: ignore[union-attr]
        raise LoweringError(f"option names are strings (torch._inductor.config names or qexport.*), got {bad!r}")
    ours = {k: v for k, v in (options or {}).items() if k.startswith("qexport.")}
    inductor = {k: v for k, v in (options or {}).items() if not k.startswith("qexport.")}
    unknown = set(ours) - set(OPTION_MODES)
    if unknown:
        raise LoweringError(f"unknown qexport option(s) {sorted(unknown)}; known: {sorted(OPTION_MODES)}")
    for key, value in ours.items():
        if value not in OPTION_MODES[key]:
            raise LoweringError(f"{key}={value!r} is not one of {OPTION_MODES[key]}")
    from torch._inductor import config

    known = config.get_config_copy()
    bad = sorted(k for k in inductor if k not in known)
    if bad:
        raise LoweringError(f"unknown Inductor option(s) {bad}; see torch._inductor.config for valid names")
    for key, value in inductor.items():
        # Inductor's config takes any value and reads it later: max_autotune="maybe" is truthy, a compile went on
        wanted = _simple_types(getattr(getattr(config, "_config", {}).get(key), "value_type", None))
        if wanted and not any(_is(value, t) for t in wanted):
            names = " or ".join("true/false" if t is bool else "none" if t is type(None) else t.__name__ for t in wanted)
            raise LoweringError(f"Inductor option {key}={value!r}: {key} takes {names}")
    if "aot_inductor.output_path" in inductor or "aot_inductor.package" in inductor:
        raise LoweringError("aot_inductor.output_path / aot_inductor.package are set by qexport.compile; pass `output` instead")
    for key, value in inductor.items():
        if key in PACKAGE_FORM_OPTIONS and value != PACKAGE_FORM_OPTIONS[key][0]:
            needed, why = PACKAGE_FORM_OPTIONS[key]
            raise LoweringError(f"Inductor option {key}={value!r}: {why}; qexport packages need {key}={needed!r} "
                                f"(leave it unset)")
    _check_march(inductor.get("cpp.march"))
    return ours, inductor


def _check_march(option: Any) -> None:
    """A `-march` the C++ compiler refuses, refused now (see cpu_target.march_refusal)."""
    from .cpu_target import march_refusal

    source, march = ("option cpp.march", option) if option else ("TORCHINDUCTOR_CPP_MARCH", os.environ.get("TORCHINDUCTOR_CPP_MARCH"))
    if march and (why := march_refusal(str(march))) is not None:
        raise LoweringError(f"{source}={march!r}: the C++ compiler refuses -march={march} ({why}); use a value it "
                            f"takes (native, x86-64-v3, skylake-avx512, ...) or leave it unset")


def _simple_types(annotation: Any) -> tuple[type, ...]:
    """The plain types (bool, int, float, str, None) an Inductor config annotation allows; () for any other."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    simple = (bool, int, float, str, type(None))
    return tuple(args) if args and all(a in simple for a in args) else ()


def _is(value: Any, t: type) -> bool:
    if t is bool or isinstance(value, bool):
        return t is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if t is float else t)


def _example_inputs(ep: torch.export.ExportedProgram, device: str) -> tuple[tuple, dict]:
    """The program's example inputs on `device`; a program loaded without them gets zeros of its
    placeholders' shapes (AOTInductor needs concrete inputs to trace, not particular values)."""
    if ep.example_inputs is not None:
        args, kwargs = ep.example_inputs
    else:
        user = set(ep.graph_signature.user_inputs)
        vals = [n.meta["val"] for n in ep.graph.find_nodes(op="placeholder") if n.name in user]
        hint = lambda d: int(d.node.hint) if isinstance(d, torch.SymInt) else int(d)  # noqa: E731
        args = tuple(torch.zeros([hint(d) for d in v.shape], dtype=v.dtype) for v in vals)
        kwargs = {}
        if len(ep.call_spec.in_spec.children_specs) == 2 and ep.call_spec.in_spec.children_specs[1].num_children:
            raise LoweringError("the program takes keyword inputs and carries no example inputs; re-export it with qexport.export")
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return tuple(torch.utils._pytree.tree_map(move, list(args))), torch.utils._pytree.tree_map(move, dict(kwargs))


def _report(plans: list[RegionPlan], device: str, path: str) -> LoweringReport:
    regions = [RegionReport.from_record(p.region.name, p.region.scheme, p.record()) for p in plans]
    return LoweringReport(target=f"aoti-{device}", path=path, regions=regions)


def _all_to_inductor(ep: torch.export.ExportedProgram, device: str) -> list[RegionPlan]:
    from ..regions import regions

    return [RegionPlan(False, "inductor", f"{KERNELS_OPTION}='inductor'; Inductor fuses the region", region=r,
                       backend=f"aoti-{device}") for r in regions(ep)]


def plan(
    program_or_path: Any, *, device: str = "cpu", options: Mapping[str, Any] | None = None
) -> LoweringReport:
    """Which kernel each region would get, without compiling (what `qexport compile` prints first)."""
    ours, _ = check_options(device, options)
    ep = resolve_program(program_or_path, "plan")
    if ours.get(KERNELS_OPTION, "auto") == "inductor":
        plans = _all_to_inductor(ep, device)
    else:
        plans, _ = plan_kernels(ep, device, ours)
    return _report(plans, device, "")


def compile(  # noqa: A001  (the stage's public name, as in qexport.compile)
    program_or_path: Any,
    output: "str | PathLike[str]",
    *,
    device: str = "cpu",
    options: Mapping[str, Any] | None = None,
    progress: "Progress | bool | None" = None,
) -> str:
    """Compile a quantized program into an AOTInductor package at `output` (a `.pt2`); returns its path.

    `program_or_path` is an ExportedProgram or a qexport `.pt2`. Each region is lowered by the kernel
    the (scheme, device) table picks; `options` are Inductor configs, plus `"qexport.kernels":
    "inductor"` to skip the table (every region fused by Inductor, for comparison) and, on CUDA,
    `"qexport.large_m": "bf16_weights"` to also keep bf16 copies of weight-only weights for the
    compute-bound row counts (the default "dequant" holds only quantized weights) and
    `"qexport.cuda_plan": "static"` to skip tuning the row buckets on the GPU (default "tuned");
    `"qexport.fuse_siblings": "off"` keeps one kernel per region where sibling regions (one input, one
    scheme: q/k/v, gate/up) would otherwise run as one kernel on their stacked weights. The package
    embeds qexport's manifest (`qexport.inspect(output)` lists regions, schemes and kernels) and
    loads with `qexport.load_compiled` or `torch._inductor.aoti_load_package`. On CPU the kernels and
    the C++ are for the target CPU: this one, capped by `ATEN_CPU_CAPABILITY` (`avx2`: any AVX2
    x86-64; see `qexport.lower.cpu_target`), recorded as the manifest's `extra.cpu_target`. The file
    appears complete or not at all. `progress(message)` is called at each stage (True: printed to stderr).
    """
    from serializers.aoti import write_manifest
    from serializers.files import atomic_path, check_writable
    from serializers.manifest import Manifest

    say = _progress(progress)
    ours, inductor_options = check_options(device, options)
    out = check_writable(output, ".pt2")
    if isinstance(program_or_path, (str, PathLike)) and out.exists() and out.resolve() == Path(program_or_path).resolve():
        # the program is read before the package is written, so this would silently replace it
        raise UsageError(f"{out}: the output must differ from the program's .pt2 (the package would replace it)")
    ep = resolve_program(program_or_path, "compile")
    # The manifest describes the regions as exported (the lowered graph no longer has them); built
    # first because it refuses a region whose scheme is not registered here.
    manifest = Manifest.from_program(ep, "aoti", device=device)
    if not manifest.regions:
        say("the program has no quantized regions; compiling it as it is")

    t0 = time.perf_counter()
    work = copy_program(ep)  # the caller's program is never changed (example inputs, device)
    contiguous_inputs(work)
    if device != "cpu":
        from torch.export.passes import move_to_device_pass

        # An indexed device: with a bare "cuda" the pass rewrites ops' device arguments to "cuda" while
        # the tensors are on cuda:0, and export's `_assert_tensor_metadata` nodes (transformers' masks) fail.
        work = move_to_device_pass(work, f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device)
    if ours.get(KERNELS_OPTION, "auto") == "inductor":
        lowered, plans = work, _all_to_inductor(work, device)
    else:
        lowered, plans = apply_kernels(work, device, ours)
        if any(p.taken for p in plans):
            inductor_options = {**inductor_options_for(device), **inductor_options}
    taken = sum(p.taken for p in plans)
    say(f"kernels: {taken}/{len(plans)} regions to scheme kernels, {len(plans) - taken} to Inductor fusion")
    target = {}
    if device == "cpu":
        cpu = compile_target(inductor_options.get("cpp.march"))
        if cpu.march != "native":  # a forced ISA: the C++ too, or the package would not run on that class of CPU
            inductor_options = {**inductor_options, "cpp.march": cpu.march}
        target = {"cpu_target": cpu.to_dict()}
        say(f"target CPU: {cpu.describe()}")
    manifest = dataclasses.replace(manifest.with_lowering([p.record() for p in plans]), extra={
        **manifest.extra,
        **target,
        "inductor_options": {k: v for k, v in inductor_options.items() if _json_safe(v)},
    })
    args, kwargs = _example_inputs(lowered, device)
    lowered.example_inputs = (tuple(args), kwargs)
    t_plan = time.perf_counter() - t0
    say("Inductor: generating and compiling C++ (this takes tens of seconds)")
    with atomic_path(out) as tmp:
        t1 = time.perf_counter()
        try:
            torch._inductor.aoti_compile_and_package(lowered, package_path=str(tmp), inductor_configs=dict(inductor_options))
        except QExportError:
            raise
        except Exception as e:
            raise LoweringError(f"AOTInductor failed to compile the program ({type(e).__name__}: {e})") from e
        t_compile = time.perf_counter() - t1
        write_manifest(tmp, manifest)
    say(f"wrote {out} ({out.stat().st_size:,} bytes; prepare {t_plan:.1f} s, Inductor {t_compile:.1f} s)")
    return str(out)


def _progress(progress: "Progress | bool | None") -> Progress:
    """`progress` as a function: True prints each stage to stderr (as `to_executorch(progress=True)`
    names its stages), False or None says nothing; anything else is refused before any work (a bool
    used to fail with "'bool' object is not callable" after the kernels were applied)."""
    import sys

    if progress is None or progress is False:
        return lambda _msg: None
    if progress is True:
        return lambda msg: print(f"qexport.compile: {msg}", file=sys.stderr, flush=True)
    if not callable(progress):
        raise LoweringError(f"progress must be a function (message: str) -> None or a bool, got {type(progress).__name__}")
    return progress


def _json_safe(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def check_cpu(manifest: Any, path: Any = "the package") -> None:
    """Refuse a CPU package this CPU cannot run, before its code is loaded.

    Why refuse rather than fall back: the package's C++ was compiled for its target's instruction
    set (`-march=native` unless the ISA was forced); run on a CPU without it, the process dies with
    SIGILL, which no fallback can catch. Packages without a target record (older qexport) pass."""
    record = manifest.extra.get("cpu_target")
    if manifest.extra.get("device") != "cpu" or not isinstance(record, dict):
        return
    try:
        target = CPUTarget.from_dict(record)
    except ValueError as e:
        raise ArtifactError(f"{path}: malformed cpu_target in the manifest: {e}") from None
    lacking = missing_features(target)
    if lacking:
        raise IncompatibleCPUError(
            f"{path}: compiled for {target.describe()}; this CPU ({torch.backends.cpu.get_cpu_capability()}) lacks "
            f"{', '.join(lacking)}. Compile it on this machine, or for a whole class of CPUs with the ISA forced, "
            f"e.g. ATEN_CPU_CAPABILITY=avx2 qexport compile ... (runs on any AVX2 x86-64)"
        )
    running = torch.backends.cpu.get_cpu_capability()
    packed = {r.name: layout for r in manifest.regions if r.lowering is not None
              and (layout := str(r.lowering.details.get("aten_layout", running))) != running}
    if packed:  # kernels/cpu.py ATEN_LAYOUT_KERNELS: the run-time kernel would misread them, silently
        layout = next(iter(packed.values()))
        raise IncompatibleCPUError(
            f"{path}: the weights of {len(packed)} region(s) ({', '.join(list(packed)[:3])[:200]}) are packed in torch's "
            f"{layout[:20]} layout (aten._convert_weight_to_int4pack_for_cpu lays them out per ATen CPU "
            f"capability) and torch runs its {running} kernels here, which would misread them: load it with "
            f"ATEN_CPU_CAPABILITY={layout[:20].lower()}, or compile it under this process's capability"
        )


def load_compiled(path: "str | PathLike[str]", *, expected_sha256: str | None = None, **loader_options: Any) -> Any:
    """Load a package written by `compile`: returns a `CompiledModel` (call it like the model), torch's
    runner behind a check of every input against the package's signature (see `CompiledModel`).

    The package is native code. Before anything is loaded, every member is checked against the
    SHA-256 its manifest records (UnsafeArtifactError on a mismatch) and torch gets the checked copy,
    unpacked in a private folder; `expected_sha256` (hex, what `sha256sum` prints) also pins the
    whole file, so a package rebuilt by someone else with fresh digests is refused too (see
    docs/security.md). `loader_options` go to `torch._inductor.aoti_load_package`. A CUDA package
    loads with `run_single_threaded=True` unless told otherwise, so its runner can be captured in a
    CUDA graph (call it from one thread at a time; pass `run_single_threaded=False` for torch's
    thread-safe one).
    """
    from serializers.files import pinned_digest
    from serializers.aoti import load_package
    from serializers.inspect import check_readable

    expected_sha256 = pinned_digest(expected_sha256)
    p = check_readable(path)
    import serializers
    from serializers import kinds

    kinds.check_kind(p, "aoti", "qexport.load_compiled")
    manifest = serializers.inspect(p)  # names what a non-AOTI or non-qexport file is, first
    if manifest.artifact != "aoti":
        raise ArtifactError(f"{path}: a qexport {manifest.artifact} artifact, not an AOTInductor package; use qexport.load")
    if manifest.extra.get("device") == "cuda":
        # torch's default runner syncs its pool of model instances through CUDA events, which fails
        # under stream capture ("operation not permitted when stream is capturing") and poisons the
        # context; the single-threaded runner captures and replays correctly (H200, torch 2.11).
        loader_options = {"run_single_threaded": True, **loader_options}
    check_cpu(manifest, path)
    try:
        # torch 2.13 logs "Device information mismatch for AOTI_CPU_ISA: AVX512 ... vs AVX2. This could cause
        # some issues" whenever the package's vector ISA is not this CPU's: on every load of a package built
        # for a fleet's class (ATEN_CPU_CAPABILITY=avx2, what this module recommends) on a newer server.
        # check_cpu has just compared what the package requires with this CPU and refuses what it cannot run.
        with log_lines_dropped("torch.export.pt2_archive._package", r"^Device information mismatch for AOTI_CPU_ISA: "):
            compiled, manifest = load_package(p, expected_sha256=expected_sha256, **loader_options)
    except QExportError:
        raise
    except Exception as e:
        raise LoweringError(
            f"{path}: AOTInductor could not load the package ({type(e).__name__}: {e}); it was compiled by "
            f"torch {manifest.torch_version} for {manifest.extra.get('device', '?')}; this is torch {torch.__version__}"
        ) from e
    return CompiledModel(compiled, manifest, str(path))


class CompiledModel:
    """What `load_compiled` returns: torch's AOTInductor runner (call it like the model) behind the
    input checks the package itself does not make (`signature.check_tensors`: count, dtype, device,
    shape within the exported bounds, index values; non-contiguous inputs are copied contiguous, the
    layout the package was traced with). `run_flat` takes the flat tensor list; other attributes
    (`loader`, `get_metadata`, `load_constants`, ...) are torch's runner's."""

    def __init__(self, compiled: Any, manifest: Any, path: str) -> None:
        from ..signature import InputSpec

        self.compiled = compiled
        self.qexport_manifest = manifest  # the checked one: runners read it instead of opening the file again
        self.path = path
        self.device = str(manifest.extra.get("device", "cpu"))
        try:  # a package without a usable record (older qexport) runs unchecked, as before
            self.inputs = [InputSpec.from_json(d) for d in manifest.extra["inputs"]]
        except (KeyError, TypeError, ValueError):
            self.inputs = None

    def __getattr__(self, name: str) -> Any:
        if name == "compiled":  # not set yet (unpickling, copy): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.compiled, name)

    def run_flat(self, tensors: "list[torch.Tensor]") -> "list[torch.Tensor]":
        from ..signature import check_tensors

        if self.inputs is None:
            tensors = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in tensors]
        else:
            tensors = check_tensors(self.inputs, tensors, device=self.device, what=self.path)
        return self.compiled.loader.boxed_run(tensors)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.export._tree_utils import reorder_kwargs
        from torch.utils import _pytree as pytree

        if "_specs" not in self.__dict__:  # parsed once: torch's runner parses them on every call
            self._specs = tuple(pytree.treespec_loads(s) for s in self.compiled.loader.get_call_spec()[:2])
        in_spec, out_spec = self._specs
        try:
            kwargs = reorder_kwargs(kwargs, in_spec)
        except (ValueError, AssertionError, KeyError) as e:
            raise UsageError(f"{self.path}: keyword inputs do not match the program's ({e})") from None
        # as torch's runner: the program's tensor inputs, flattened; other values were fixed at export
        leaves = pytree.tree_leaves((args, kwargs))
        flat = [x for x in leaves if isinstance(x, torch.Tensor)]
        others = [x for x in leaves if not isinstance(x, torch.Tensor) and x is not None] \
            if self.inputs is not None and len(flat) != len(self.inputs) else []
        if others:
            # a numpy array or a nested list is not a tensor: dropped here, it left "got 0 (none)" for the one input passed
            kinds = "/".join(sorted({type(x).__name__ for x in others}))
            raise UsageError(f"{self.path} takes {len(self.inputs)} tensor input(s) ({', '.join(s.describe() for s in self.inputs)}); "
                             f"got {len(flat)} tensor(s) and {len(others)} other value(s) ({kinds}): pass torch tensors, "
                             f"e.g. torch.as_tensor(value, dtype=torch.{self.inputs[0].dtype})")
        return pytree.tree_unflatten(self.run_flat(flat), out_spec)
