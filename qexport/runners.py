"""Run any qexport artifact: one loader for `.pt2` programs, AOTInductor packages, ExecuTorch `.pte`
and ONNX files, plus what `verify`, `bench` and the demo build on it (example inputs from a program,
comparison against the scheme's tolerance, median latency).

Every runner takes and returns a *flat* list of tensors (the program's user inputs in graph order,
its outputs flattened), because that is the one calling convention all four runtimes share.
"""

from __future__ import annotations

import importlib
import statistics
import time
import zipfile
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from ._extras import missing_extra
from ._quiet import native_stderr
from .errors import ArtifactError, BackendUnavailableError, CorruptArtifactError, QExportError
from serializers.inspect import check_readable

ARTIFACT_KINDS = ("pt2", "aoti", "pte", "onnx")
#: used when a program has no quantized region (an fp32 model against its own lowering)
FLOAT_TOLERANCE = 1e-3

Flat = list[torch.Tensor]


# --------------------------------------------------------------------------------------------------
# stages

# What each stage needs installed; `stage()` turns a missing module into one clear line.
STAGES = {
    "save": ("serializers.pt2", ".pt2 serializer"),
    "load": ("serializers.pt2", ".pt2 serializer"),
    "compile": ("qexport.lower.aoti", "AOTInductor backend"),
    "load_compiled": ("qexport.lower.aoti", "AOTInductor backend"),
    "to_executorch": ("qexport.lower.executorch", "ExecuTorch backend"),
    "to_onnx": ("qexport.lower.onnx", "ONNX backend"),
}


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
    return fn


# --------------------------------------------------------------------------------------------------
# kinds


def artifact_kind(path: "str | PathLike[str]") -> str:
    """'pt2' (an ExportedProgram archive), 'aoti' (an AOTInductor package), 'pte' or 'onnx', told
    from the file's content, not its name (AOTI packages and programs are both `.pt2` zips)."""
    p = check_readable(path)
    with open(p, "rb") as f:
        head = f.read(8)
    if head[4:8] == b"ET12":  # ExecuTorch's flatbuffer file identifier
        return "pte"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CorruptArtifactError(f"{p}: a damaged zip archive ({e})") from None
        if any("/data/aotinductor/" in n or n.startswith("data/aotinductor/") for n in names):
            return "aoti"
        return "pt2"
    if p.suffix == ".onnx":
        return "onnx"
    raise CorruptArtifactError(
        f"{p}: not a qexport artifact (expected a .pt2 program, an AOTI package, a .pte or an .onnx file)"
    )


# --------------------------------------------------------------------------------------------------
# runners


@dataclass
class InputInfo:
    """What a runner knows about one of its inputs: enough to generate a valid example."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    #: integer inputs are drawn from [0, high); None means "not an index": filled with ones (masks)
    high: int | None = None
    #: token positions (where a KV cache writes): 0, 1, ... as a generation's first call has them; ones
    #: would write two tokens to one cache slot, which runtimes resolve differently
    positions: bool = False

    def make(self, generator: torch.Generator) -> torch.Tensor:
        if self.positions:
            return torch.arange(self.shape[-1], dtype=self.dtype).expand(self.shape).contiguous()
        if self.dtype.is_floating_point:
            return torch.randn(self.shape, generator=generator).to(self.dtype)
        if self.high is None or self.dtype == torch.bool:
            return torch.ones(self.shape, dtype=self.dtype)
        return torch.randint(0, self.high, self.shape, generator=generator, dtype=self.dtype)


@dataclass
class Runner:
    """A loaded artifact: `runner(flat_inputs) -> flat_outputs`."""

    kind: str
    path: Path
    call: Callable[[Flat], Flat]
    #: the ExportedProgram for a .pt2 (lets verify compare region by region)
    program: torch.export.ExportedProgram | None = None
    inputs: list[InputInfo] | None = None
    #: flat inputs -> {module path: (region name, first output)}, where the runtime exposes regions
    #: (a .pt2, an .onnx written with keep_regions=True); None elsewhere
    region_call: Callable[[Flat], dict[str, tuple[str, torch.Tensor]]] | None = None

    def __call__(self, inputs: Sequence[torch.Tensor]) -> Flat:
        return self.call(list(inputs))

    def region_outputs(self, inputs: Sequence[torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]] | None:
        return self.region_call(list(inputs)) if self.region_call is not None else None

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def load(path: "str | PathLike[str]", *, expected_sha256: str | None = None) -> Runner:
    """Load any qexport artifact as a Runner. Raises ArtifactError subclasses for unreadable files
    and BackendUnavailableError when the runtime it needs is not installed. `expected_sha256` (hex,
    what `sha256sum` prints) pins the file: any other file is refused with UnsafeArtifactError."""
    p = check_readable(path)
    kind = artifact_kind(p)
    try:
        return _LOADERS[kind](p, expected_sha256)
    except QExportError:
        raise
    except ImportError as e:  # the installation, not the file
        raise BackendUnavailableError(f"{p}: loading a {kind} artifact failed on an import: {e}") from e
    except Exception as e:  # runtimes raise RuntimeError for anything; name the file and the kind
        raise CorruptArtifactError(f"{p}: cannot be loaded as {kind}: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


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


def _load_pt2(p: Path, expected_sha256: str | None) -> Runner:
    return program_runner(load_program(p, expected_sha256), p)


def program_runner(ep: torch.export.ExportedProgram, path: "Path | None" = None) -> Runner:
    """A Runner over an in-memory ExportedProgram (eager, through `ep.module()`)."""
    module = ep.module()

    def call(flat: Flat) -> Flat:
        args, kwargs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
        with torch.no_grad():
            return _flat_tensors(module(*args, **kwargs))

    return Runner("pt2", path or Path("<program>"), call, program=ep, inputs=program_inputs(ep),
                  region_call=lambda flat: region_outputs(ep, flat))


def _load_aoti(p: Path, expected_sha256: str | None) -> Runner:
    try:
        compiled = stage("load_compiled")(str(p), expected_sha256=expected_sha256)
    except QExportError as e:
        if _is_missing_manifest(e):
            raise ArtifactError(f"{p}: an AOTInductor package not written by qexport (no manifest); compile the "
                                f"program with qexport.compile, which also takes a program without regions") from None
        raise
    loader = getattr(compiled, "loader", None)

    def call(flat: Flat) -> Flat:
        with torch.no_grad():
            if loader is not None:  # AOTICompiledModel: the flat calling convention is native
                return _flat_tensors(loader.boxed_run(list(flat)))
            return _flat_tensors(compiled(*flat))

    return Runner("aoti", p, call)


def _load_pte(p: Path, expected_sha256: str | None) -> Runner:
    try:
        from serializers.pte import ET_DTYPES, open_program
    except ImportError as e:
        raise missing_extra(e, f"{p}: running a .pte") or BackendUnavailableError(f"{p}: running a .pte needs executorch ({e})") from None
    try:  # the portable quantized kernels, for regions no delegate took
        import executorch.kernels.quantized  # noqa: F401
    except Exception:
        pass
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

    def call(flat: Flat, _program: Any = program) -> Flat:  # the Program owns the bytes `method` runs from
        return _flat_tensors(method.execute([x.contiguous() for x in flat]))

    return Runner("pte", p, call, inputs=inputs)


_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
               "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(int8)": torch.int8,
               "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool, "tensor(double)": torch.float64}


def _load_onnx(p: Path, expected_sha256: str | None) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise missing_extra(e, f"{p}: running an .onnx file") or BackendUnavailableError(f"{p}: running an .onnx file needs onnxruntime ({e})") from None
    from serializers.onnx import read_checked, read_manifest

    from .lower.onnx import check_target_runs_here

    data = read_checked(p, expected_sha256)
    check_target_runs_here(read_manifest(p, data).extra.get("target"), str(p))
    options = ort.SessionOptions()
    # Same thread budget as torch, so `bench --threads N` compares like with like.
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
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

    return Runner("onnx", p, call, inputs=inputs, region_call=_onnx_region_call(data, options, feed))


def _onnx_region_call(data: bytes, options: Any, feed: Callable[[Flat], dict[str, Any]]):
    """For an .onnx that keeps its regions as local functions: a second session whose outputs also
    include every region call's output, keyed by the module path its metadata records."""
    import json

    import onnx
    import onnxruntime as ort

    try:
        from serializers.onnx import REGION_DOMAIN, REGION_KEY
    except ImportError:  # no qexport ONNX format here: nothing names the regions
        return None
    model = onnx.load_model_from_string(data)
    meta = {}
    for f in model.functions:
        if f.domain == REGION_DOMAIN:
            props = {m.key: m.value for m in f.metadata_props}
            try:
                meta[f.name] = json.loads(props.get(REGION_KEY, "{}")).get("module_path") or f.name
            except ValueError:
                meta[f.name] = f.name
    calls = [(n.output[0], meta.get(n.op_type, n.op_type), n.op_type) for n in model.graph.node
             if n.domain == REGION_DOMAIN and n.output]
    if not calls:
        return None
    session = None

    def region_call(flat: Flat) -> dict[str, tuple[str, torch.Tensor]]:
        nonlocal session
        if session is None:  # built on first use: most runs never ask for regions
            full = onnx.load_model_from_string(data)
            known = {o.name for o in full.graph.output}
            full.graph.output.extend(onnx.helper.make_empty_tensor_value_info(out) for out, _, _ in calls if out not in known)
            session = ort.InferenceSession(full.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, feed(flat))))
        return {module: (fname, torch.from_numpy(values[out])) for out, module, fname in calls}

    return region_call


def _pin(pins: "Mapping[str | PathLike[str], str] | None", p: Path) -> str | None:
    """The pinned digest of `p` in `pins` (keys compared as resolved paths)."""
    if not pins:
        return None
    resolved = {Path(k).resolve(): v for k, v in pins.items()}
    return resolved.get(p.resolve())


_LOADERS: dict[str, Callable[[Path, "str | None"], Runner]] = {"pt2": _load_pt2, "aoti": _load_aoti, "pte": _load_pte, "onnx": _load_onnx}


def _flat_tensors(out: Any) -> Flat:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


# --------------------------------------------------------------------------------------------------
# inputs


def program_inputs(ep: torch.export.ExportedProgram) -> list[InputInfo]:
    """The program's user inputs (graph order), with concrete shapes: a dynamic dim takes its
    lower bound (at least 2, so it stays dynamic-looking), capped by its upper bound.

    Integer inputs that index an embedding (a region with op "embedding" or aten.embedding) are
    drawn from [0, rows); other integer and bool inputs (attention masks) are ones."""
    from .regions import iter_region_nodes, region_payload

    high: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
            w, idx = node.args[0], node.args[1]
            rows = w.meta["val"].shape[0] if isinstance(w, torch.fx.Node) and "val" in w.meta else None
            if isinstance(idx, torch.fx.Node) and isinstance(rows, int):
                high[idx.name] = min(high.get(idx.name, rows), rows)
    for node in iter_region_nodes(ep):
        payload = region_payload(node) or {}
        if payload.get("op") == "embedding" and payload.get("weight_shape") and isinstance(node.args[1], torch.fx.Node):
            rows = int(payload["weight_shape"][0])
            high[node.args[1].name] = min(high.get(node.args[1].name, rows), rows)
    from serializers.manifest import GENERATION_META

    from .signature import program_inputs as signature

    infos = [InputInfo(i.name, tuple(d.example() for d in i.shape), i.torch_dtype, high.get(i.name))
             for i in signature(ep, require_tensors=True)]
    if GENERATION_META in ep.graph_module.meta.get("custom", {}) and len(infos) > 1:
        infos[1].positions = True  # a generating LM's inputs are (input_ids, cache_position, ...): qexport.generation
    return infos


def make_inputs(infos: Sequence[InputInfo], seed: int = 0) -> Flat:
    g = torch.Generator().manual_seed(seed)
    return [i.make(g) for i in infos]


# --------------------------------------------------------------------------------------------------
# verify


@dataclass
class RegionError:
    name: str
    module_path: str
    max_abs: float
    rel: float


@dataclass
class VerifyResult:
    path: Path
    kind: str
    tolerance: float
    max_abs: float | None = None
    rel: float | None = None
    error: str | None = None
    regions: list[RegionError] | None = None
    #: relative error against the unquantized (fp32) program's outputs, when verify had one
    rel_vs_baseline: float | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.rel is not None and self.rel <= self.tolerance


def tolerance_for(ep: torch.export.ExportedProgram) -> tuple[float, list[str]]:
    """The loosest documented tolerance among the program's schemes (and their names)."""
    from .regions import regions
    from .schemes import math_for

    schemes = {r.scheme.name: r.scheme for r in regions(ep) if r.scheme is not None}
    if not schemes:
        return FLOAT_TOLERANCE, []
    return max(math_for(s).tolerance for s in schemes.values()), sorted(schemes)


def compare(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max-abs error, max-abs error relative to the expected outputs' max-abs) over all outputs.
    Raises ArtifactError when the outputs do not line up (count or shape)."""
    if len(expected) != len(got):
        raise ArtifactError(f"returned {len(got)} outputs, the reference {len(expected)}")
    max_abs, scale = 0.0, 0.0
    for i, (e, g) in enumerate(zip(expected, got)):
        if tuple(e.shape) != tuple(g.shape):
            raise ArtifactError(f"output {i} has shape {tuple(g.shape)}, the reference {tuple(e.shape)}")
        e, g = e.detach().float(), g.detach().float()
        if e.numel():
            max_abs = max(max_abs, (e - g).abs().max().item())
            scale = max(scale, e.abs().max().item())
    return max_abs, max_abs / max(scale, 1e-12)


def region_outputs(ep: torch.export.ExportedProgram, flat: Flat) -> dict[str, tuple[str, torch.Tensor]]:
    """Each region's first output when the program runs on `flat`, keyed by module path (or node name)."""
    from .regions import HOP_TARGETS, region_payload

    gm = ep.module()
    captured: dict[str, tuple[str, torch.Tensor]] = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.op == "call_function" and n.target in HOP_TARGETS:
                payload = region_payload(n) or {}
                key = payload.get("module") or n.name
                first = out[0] if isinstance(out, (tuple, list)) else out
                captured[key] = (n.name, first.detach())
            return out

    args, kwargs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    flat_args = pytree.arg_tree_leaves(*args, **kwargs)
    with torch.no_grad():
        Capture(gm).run(*flat_args)
    return captured


def verify(
    reference: "str | PathLike[str] | torch.export.ExportedProgram",
    artifacts: Sequence["str | PathLike[str]"],
    *,
    seed: int = 0,
    per_region: bool = True,
    tolerance: float | None = None,
    on_artifact: Callable[[Path], Any] | None = None,
    expected_sha256: "Mapping[str | PathLike[str], str] | None" = None,
    baseline: "str | PathLike[str] | torch.export.ExportedProgram | None" = None,
) -> list[VerifyResult]:
    """Run each artifact on the same inputs as the reference program (generated from its input
    specs) and compare outputs, against the loosest tolerance of the reference's schemes.

    An artifact that cannot be loaded or run gives a failed result with the reason; a missing
    path is an error before any work. Region-by-region errors are reported where the artifact
    exposes its regions: a `.pt2`, an `.onnx` written with keep_regions=True (AOTI and ExecuTorch
    fuse them away). `tolerance` replaces the schemes' bound: the family
    tolerances bound one region, and errors compound over a deep model. `expected_sha256` maps
    paths (the reference's too) to the SHA-256 each must have (see `load`). `baseline` (the unquantized
    program, e.g. the demo's model_fp32.pt2) adds each artifact's error against the float model
    (`rel_vs_baseline`): what quantization plus lowering cost, next to what lowering alone cost."""
    if tolerance is not None and not tolerance > 0:
        raise ArtifactError(f"tolerance must be positive, got {tolerance}")
    paths = [check_readable(a) for a in artifacts]
    if isinstance(reference, torch.export.ExportedProgram):
        ref = reference
    else:
        rp = check_readable(reference)
        kind = artifact_kind(rp)
        if kind != "pt2":
            raise ArtifactError(f"{rp}: the reference must be an exported program (.pt2 from qexport export), not {kind}")
        ref = load_program(rp, _pin(expected_sha256, rp))
    tol = tolerance if tolerance is not None else tolerance_for(ref)[0]
    infos = program_inputs(ref)
    flat = make_inputs(infos, seed)
    ref_runner = program_runner(ref)
    expected = ref_runner(flat)
    ref_regions = region_outputs(ref, flat) if per_region else {}
    float_out = None
    if baseline is not None:
        base = baseline if isinstance(baseline, torch.export.ExportedProgram) else load_program(check_readable(baseline))
        float_out = program_runner(base)([x.clone() for x in flat])
    results = []
    for p in paths:
        if on_artifact is not None:
            on_artifact(p)
        res = VerifyResult(p, "?", tol)
        try:
            runner = load(p, expected_sha256=_pin(expected_sha256, p))
            res.kind = runner.kind
            got = runner([x.clone() for x in flat])
            res.max_abs, res.rel = compare(expected, got)
            if float_out is not None:
                res.rel_vs_baseline = compare(float_out, got)[1]
            if per_region and ref_regions and runner.region_call is not None:
                res.regions = _region_errors(ref_regions, runner.region_outputs(flat))
        except QExportError as e:
            res.error = str(e)
        except Exception as e:  # a runtime failing on this input is a verification failure, not a crash
            res.error = f"{type(e).__name__}: {_first_line(e)}"
        results.append(res)
    return results


def _region_errors(ref: dict, got: dict) -> list[RegionError]:
    out = []
    for key, (name, e) in ref.items():
        if key not in got:
            continue
        g = got[key][1]
        if e.shape != g.shape:
            continue
        max_abs, rel = compare([e], [g])
        out.append(RegionError(name, key, max_abs, rel))
    return out


# --------------------------------------------------------------------------------------------------
# bench


@dataclass
class BenchResult:
    path: Path
    kind: str
    size: int
    median_s: float | None = None
    p10_s: float | None = None
    p90_s: float | None = None
    iters: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def time_call(fn: Callable[[], Any], *, warmup: int = 3, min_iters: int = 10, min_time_s: float = 0.5,
              max_iters: int = 10_000) -> list[float]:
    """Per-call wall times (seconds): `warmup` untimed calls, then at least `min_iters` calls and
    at least `min_time_s` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_inputs(runners: Sequence[Runner], seed: int = 0) -> Flat:
    """One input set for every runner: from the first runner that describes its inputs (put the
    .pt2 first: it knows which integer inputs are token ids)."""
    for r in runners:
        if r.inputs is not None:
            return make_inputs(r.inputs, seed)
    raise ArtifactError("none of the artifacts describes its inputs (AOTI packages do not); add the .pt2 "
                        "to the list or pass --input")


def bench(
    artifacts: Sequence["str | PathLike[str]"],
    *,
    inputs: Flat | None = None,
    seed: int = 0,
    warmup: int = 3,
    min_iters: int = 10,
    min_time_s: float = 0.5,
    on_artifact: Callable[[Path], Any] | None = None,
    expected_sha256: "Mapping[str | PathLike[str], str] | None" = None,
) -> list[BenchResult]:
    """Median latency and size of each artifact, all on the same inputs, in one run. An artifact
    that fails to load or run gets a result with `.error` set. `expected_sha256` maps paths to the
    SHA-256 each must have (see `load`)."""
    paths = [check_readable(a) for a in artifacts]
    runners: list[Runner | BenchResult] = []
    for p in paths:
        try:
            runners.append(load(p, expected_sha256=_pin(expected_sha256, p)))
        except QExportError as e:
            runners.append(BenchResult(p, "?", p.stat().st_size, error=str(e)))
    if inputs is None:
        inputs = bench_inputs([r for r in runners if isinstance(r, Runner)], seed)
    results = []
    for r in runners:
        if isinstance(r, BenchResult):
            results.append(r)
            continue
        if on_artifact is not None:
            on_artifact(r.path)
        res = BenchResult(r.path, r.kind, r.size)
        try:
            times = time_call(lambda: r(inputs), warmup=warmup, min_iters=min_iters, min_time_s=min_time_s)
            q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
            res.median_s, res.p10_s, res.p90_s, res.iters = statistics.median(times), q[0], q[-1], len(times)
        except QExportError as e:
            res.error = str(e)
        except Exception as e:
            res.error = f"{type(e).__name__}: {_first_line(e)}"
        results.append(res)
    return results


__all__ = [
    "ARTIFACT_KINDS", "BenchResult", "InputInfo", "RegionError", "Runner", "VerifyResult", "artifact_kind", "bench",
    "STAGES", "compare", "load", "load_program", "make_inputs", "program_inputs", "program_runner", "stage", "tolerance_for", "verify",
]
