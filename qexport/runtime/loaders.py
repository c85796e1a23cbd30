"""Loading any qexport artifact as a `Runner`: the kind table (`serializers.kinds`) tells the kind
from the file's bytes and names the loader below that runs it; the public stages (`qexport.save`,
`compile`, ...) are resolved here with one clear error when this installation lacks them."""

from __future__ import annotations

import importlib
from os import PathLike
from pathlib import Path
from typing import Any, Mapping

import torch

from serializers import kinds
from serializers.files import check_readable, pinned_digest

from ..extras import missing_extra, require
from ..quiet import first_call_quiet, native_stderr
from ..errors import ArtifactError, BackendUnavailableError, CorruptArtifactError, QExportError
from .runner import Flat, InputInfo, Runner, flat_tensors, input_infos, program_runner

ARTIFACT_KINDS = kinds.BUILTIN

# --------------------------------------------------------------------------------------------------
# stages

#: what each public stage needs installed (from the kind table); `stage()` turns a missing module
#: into one clear line
STAGES: dict[str, tuple[str, str]] = kinds.stages()


def stage(name: str) -> Any:
    """`qexport.<name>` (save, compile, to_executorch, ...), or BackendUnavailableError if this
    installation does not provide it."""
    module, what = STAGES[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (extra := missing_extra(e, f"the {what}")) is not None:
            raise extra from None
        if e.name and module.startswith(e.name):
            raise BackendUnavailableError(f"the {what} is not available in this installation ({module} is missing)") from None
        raise BackendUnavailableError(f"the {what} cannot be imported: {e}") from e
    fn = getattr(mod, name, None)
    if fn is None:
        raise BackendUnavailableError(f"the {what} does not provide {name}() yet ({module})")
    for kind in kinds.kinds():
        if name in kind.stages() and kind.extra:
            require(kind.extra, f"the {what}")
    return fn


# --------------------------------------------------------------------------------------------------
# loading


def artifact_kind(path: "str | PathLike[str]") -> str:
    """'pt2' (an ExportedProgram archive), 'aoti' (an AOTInductor package), 'pte' or 'onnx', told
    from the file's content, not its name (AOTI packages and programs are both `.pt2` zips)."""
    return kinds.sniff(check_readable(path)).name


def load(path: "str | PathLike[str]", *, expected_sha256: str | None = None) -> Runner:
    """Load any qexport artifact as a Runner. Raises ArtifactError subclasses for unreadable files
    and BackendUnavailableError when the runtime it needs is not installed. `expected_sha256` (hex,
    what `sha256sum` prints) pins the file: any other file is refused with UnsafeArtifactError."""
    expected_sha256 = pinned_digest(expected_sha256)
    p = check_readable(path)
    kind = kinds.sniff(p)
    try:
        return kind.open_runner(p, expected_sha256)
    except QExportError:
        raise
    except ImportError as e:  # the installation, not the file
        raise BackendUnavailableError(f"{p}: loading a {kind.name} artifact failed on an import: {e}") from e
    except Exception as e:  # runtimes raise RuntimeError for anything; name the file and the kind
        raise CorruptArtifactError(f"{p}: cannot be loaded as {kind.name}: {type(e).__name__}: {first_line(e)}") from e


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def pinned(pins: "Mapping[str | PathLike[str], str] | None", p: Path) -> str | None:
    """The pinned digest of `p` in `pins` (keys compared as resolved paths)."""
    if not pins:
        return None
    resolved = {Path(k).resolve(): v for k, v in pins.items()}
    return resolved.get(p.resolve())


def load_program(path: "str | PathLike[str]", expected_sha256: str | None = None) -> torch.export.ExportedProgram:
    """The ExportedProgram in a qexport `.pt2` (through qexport.load: the archive is checked, nothing
    is unpickled, the manifest must match the graph)."""
    p = check_readable(path)
    try:
        return stage("load")(p, expected_sha256=expected_sha256)
    except QExportError as e:
        if _is_missing_manifest(e):
            # A plain torch archive may hold pickled example inputs, which torch.export.load would
            # unpickle; qexport only runs files it can check.
            raise ArtifactError(
                f"{p}: not written by qexport (no manifest); if you trust it, re-save it with "
                f"qexport.save(torch.export.load(path), path)"
            ) from None
        raise


def _is_missing_manifest(e: QExportError) -> bool:
    return "no qexport manifest" in str(e) or "without a qexport manifest" in str(e)


# --------------------------------------------------------------------------------------------------
# one loader per kind (named by the kind table)


def load_pt2(p: Path, expected_sha256: str | None) -> Runner:
    return program_runner(load_program(p, expected_sha256), p)


def load_aoti(p: Path, expected_sha256: str | None) -> Runner:
    try:
        compiled = stage("load_compiled")(str(p), expected_sha256=expected_sha256)
    except QExportError as e:
        if _is_missing_manifest(e):
            raise ArtifactError(f"{p}: an AOTInductor package not written by qexport (no manifest); compile the "
                                f"program with qexport.compile, which also takes a program without regions") from None
        raise

    def call(flat: Flat) -> Flat:
        with torch.no_grad():  # the flat calling convention is the package's own, behind load_compiled's checks
            return flat_tensors(compiled.run_flat(list(flat)))

    extra = compiled.qexport_manifest.extra
    return Runner("aoti", p, call, device=extra.get("device", "cpu"), inputs=_manifest_inputs(extra), call_checks_inputs=True)


def _manifest_specs(extra: Mapping[str, Any]) -> list[Any]:
    """The `signature.InputSpec`s the manifest records; [] when it says nothing usable (the file is
    untrusted: a malformed entry is not an error here, bench then asks for --input)."""
    from ..signature import InputSpec

    raw = extra.get("inputs")
    try:
        return [InputSpec.from_json(d) for d in raw] if isinstance(raw, list) else []
    except ValueError:
        return []


def _manifest_inputs(extra: Mapping[str, Any]) -> list[InputInfo] | None:
    """The inputs the manifest says the program takes (shapes at each dim's example size), so that a
    package alone can be benchmarked; None when it says nothing usable."""
    return input_infos(_manifest_specs(extra), generating="generation" in extra) or None


def _with_specs(inputs: list[InputInfo], extra: Mapping[str, Any]) -> list[InputInfo]:
    """`inputs` (what a runtime reports: a .pte's planned sizes, an .onnx's shapes) with the specs the
    manifest records, where they line up, so that `input_mismatch` knows static sizes and ranges."""
    specs = _manifest_specs(extra)
    if len(specs) == len(inputs) and all(len(s.shape) == len(i.shape) for s, i in zip(specs, inputs)):
        for info, spec in zip(inputs, specs):
            info.spec = spec
    return inputs


def load_pte(p: Path, expected_sha256: str | None) -> Runner:
    try:
        from serializers.pte import ET_DTYPES, open_program, program_manifest
    except ImportError as e:
        raise missing_extra(e, f"{p}: running a .pte") or BackendUnavailableError(f"{p}: running a .pte needs executorch ({e})") from None
    with native_stderr():  # the runtime's cpuinfo lines come from the probe child and the load alike
        program = open_program(p, expected_sha256=expected_sha256)
        method = program.load_method("forward")
    if method is None:
        raise CorruptArtifactError(f"{p}: the program has no 'forward' method")
    meta = method.metadata
    inputs = []
    for i in range(meta.num_inputs()):
        t = meta.input_tensor_meta(i)
        inputs.append(InputInfo(f"input_{i}", tuple(t.sizes()), getattr(torch, ET_DTYPES.get(int(t.dtype()), "float32"))))
    _with_specs(inputs, program_manifest(program, p).extra)

    execute = first_call_quiet(method.execute)

    def call(flat: Flat, _program: Any = program) -> Flat:  # the Program owns the bytes `method` runs from
        for info, x in zip(inputs, flat):  # the runtime's own refusal is "error 0x10" and a native log line
            if x.dim() != len(info.shape) or any(n > cap for n, cap in zip(x.shape, info.shape)):
                raise ArtifactError(
                    f"{p}: {info.name} has shape {tuple(x.shape)}; this .pte takes at most {info.shape} (ExecuTorch "
                    f"plans memory for each dim's upper bound, and a dim exported without one at the example's "
                    f"size: export with torch.export.Dim(name, max=N), CLI --dynamic DIM:NAME:N, for larger inputs)")
        return flat_tensors(execute([x.contiguous() for x in flat]))

    rec = program.qexport_data_file
    return Runner("pte", p, call, inputs=inputs, data_files=(rec.path_beside(p),) if rec is not None else ())


_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
               "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(int8)": torch.int8,
               "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool, "tensor(double)": torch.float64}


def load_onnx(p: Path, expected_sha256: str | None) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise missing_extra(e, f"{p}: running an .onnx file") or BackendUnavailableError(f"{p}: running an .onnx file needs onnxruntime ({e})") from None
    from serializers.onnx import read_model

    from ..lower.onnx import check_target_runs_here

    model = read_model(p, expected_sha256)
    check_target_runs_here(model.manifest.extra.get("target"), str(p))
    options = ort.SessionOptions()
    # Same thread budget as torch, so `bench --threads N` compares like with like.
    options.intra_op_num_threads = torch.get_num_threads()
    if "generation" in model.manifest.extra:
        # onnxruntime's default MatMulNBits (int4 regions) re-quantizes each activation block to int8
        # (accuracy level 4): within the scheme's tolerance per call, but greedy decoding feeds every
        # argmax back, and a 2-layer int4 Llama's tokens left eager's at the 2nd of 32. Level 0 computes
        # the region's own fp32 math, so an LM file generates eager's tokens.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = _onnx_session(ort, p, model.data, options)
    names = [i.name for i in session.get_inputs()]
    inputs = [
        InputInfo(i.name, tuple(d if isinstance(d, int) else 2 for d in i.shape), _ORT_DTYPES.get(i.type, torch.float32))
        for i in session.get_inputs()
    ]

    def feed(flat: Flat) -> dict[str, Any]:
        if len(flat) != len(names):
            raise ArtifactError(f"{p}: the model takes {len(names)} inputs ({', '.join(names)}), got {len(flat)}")
        return {n: x.detach().contiguous().numpy() for n, x in zip(names, flat)}

    def call(flat: Flat) -> Flat:
        return [torch.from_numpy(o) for o in session.run(None, feed(flat))]

    return Runner("onnx", p, call, inputs=_with_specs(inputs, model.manifest.extra), region_call=_onnx_region_call(model, options, feed))


def _onnx_session(ort: Any, p: Path, data: bytes, options: Any) -> Any:
    """An onnxruntime CPU session; BackendUnavailableError where the CPU provider has no kernel for one of
    the file's ops at its dtype (a model exported in bfloat16: onnxruntime's CPU kernels for Mul, Add, Relu
    ... take float32 and float16 only), which is a limit of this runtime, not a damaged file."""
    try:
        with native_stderr():  # onnxruntime logs a model's node names as they are
            return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        if type(e).__name__ != "NotImplemented":
            raise
        raise BackendUnavailableError(
            f"{p}: onnxruntime's CPU provider cannot run this file ({first_line(e)}): it has no kernel for that op "
            f"at the file's dtype. A model exported in bfloat16 does not run there: export it in float32 "
            f"(model.float()) or float16 for onnxruntime's CPU provider") from None


def _onnx_region_call(model: Any, options: Any, feed: Any) -> Any:
    """For an .onnx that keeps its regions as local functions: a second session whose outputs also
    include every region call's output, keyed by the region name its metadata records."""
    import onnxruntime as ort

    calls = model.region_calls()
    if not calls:
        return None
    session = None

    def region_call(flat: Flat) -> dict[str, tuple[str, torch.Tensor]]:
        nonlocal session
        if session is None:  # built on first use: most runs never ask for regions
            data = model.with_outputs([out for out, _, _ in calls])
            session = _onnx_session(ort, model.path, data, options)
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, feed(flat))))
        return {module: (fname, torch.from_numpy(values[out])) for out, module, fname in calls}

    return region_call


__all__ = ["ARTIFACT_KINDS", "STAGES", "artifact_kind", "load", "load_aoti", "load_onnx", "load_program", "load_pt2",
           "load_pte", "stage"]
