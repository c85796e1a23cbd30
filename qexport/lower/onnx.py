"""`to_onnx(program, "model.onnx")`: an ONNX model whose quantized regions are QDQ onnxruntime runs.

The route: torch's own exporter (`torch.onnx.export(..., dynamo=True)`) translates everything outside
the regions; a custom translation for `invoke_quant_packed` leaves one placeholder node per region
(domain `qexport.pending`), which survives the exporter's version conversion and optimizer untouched;
then `lower_regions`, an onnx-ir pass, replaces each placeholder by what its scheme says
(`onnx_regions.py`): spliced into the main graph, or kept as one ONNX local function per region
(domain `qexport.region`) whose metadata_props carry the scheme.

Why placeholders rather than translating regions inside the exporter: the exporter's public path always
runs the version converter, whose first step inlines every local function (FINDINGS.md), so functions
built during translation never reach the file; after export the graph is ours to edit with onnx-ir's
public API, and the weights can be re-laid out (4-bit codes as UINT4, MatMul's [in, out]) as new
initializers, which a translation function cannot add.
"""

from __future__ import annotations

import functools
import importlib
import platform
import re
import warnings
from os import PathLike
from typing import Any, Mapping

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch

from serializers import onnx as onnx_file
from serializers.onnx import MANIFEST_KEY, REGION_DOMAIN, SCHEME_KEY  # noqa: F401  (MANIFEST_KEY, SCHEME_KEY: re-exported)

from ..errors import IncompatibleCPUError, LoweringError, QExportError
from . import resolve_program
from ..regions import PAYLOAD_KEY, Region, RegionPayload
from ._contract import RegionPlan, plan_regions
from ._graph import region_state, scratch_writes_as_values, with_region_names
from ..validate import written_state
from .onnx_regions import BLOCKED_QDQ_OPSET, DEFAULT_TARGET, ONNX_TARGETS, Emitter, Lowering
from .onnx_shared import share_tied_initializers
from .report import LoweringReport, RegionReport

#: opset used when none is given: the first with blocked (int4) and float8-output QuantizeLinear
DEFAULT_OPSET = BLOCKED_QDQ_OPSET
#: torch.onnx's translations are written for opset 18 and newer
MIN_OPSET = 18
PENDING_DOMAIN = "qexport.pending"


def to_onnx(
    program_or_path: "torch.export.ExportedProgram | str | PathLike[str]",
    output: "str | PathLike[str]",
    *,
    keep_regions: bool = False,
    opset: int | None = None,
    target: str = DEFAULT_TARGET,
) -> LoweringReport:
    """Write `program_or_path` (an ExportedProgram from `qexport.export`, or a qexport `.pt2`) as an
    ONNX model at `output` and report what each region became.

    Each region is emitted from its scheme (qexport/lower/onnx_regions.py): int8 as
    QuantizeLinear/DequantizeLinear (per-axis weights; static activations; per-token dynamic ones as
    MatMulInteger), int4 as blocked DequantizeLinear (opset >= 21), fp8 as float8 QDQ, nf4 as a float
    decomposition (the report says why). `keep_regions=True` keeps each region as an ONNX
    local function carrying its scheme in metadata_props; onnxruntime runs both forms. The qexport
    manifest is embedded in the model's metadata_props (`qexport.inspect(output)` reads it back).

    `target` names the CPUs the file must be exact on (`onnx_regions.ONNX_TARGETS`): "portable"
    (default) stores int8 weights that meet int8 activations as uint8 + 128, which onnxruntime computes
    exactly on every CPU; "x86_vnni" and "arm64" keep them signed for onnxruntime's u8 x s8 kernels,
    exact only there (on AVX2-only x86 they saturate); "host" picks for the machine running this call.
    The manifest records the target and `qexport.runners` refuses to run a file on CPUs it is wrong on.
    The file is checked with `onnx.checker.check_model(full_check=True)` and written atomically.
    """
    from serializers.files import atomic_path, check_writable

    if not isinstance(keep_regions, bool):  # keep_regions="no" is truthy: it kept the regions
        raise LoweringError(f"keep_regions must be True or False, got {keep_regions!r}")
    opset = _check_opset(opset)
    target = resolve_target(target)
    out = check_writable(output, ".onnx")
    ep = scratch_writes_as_values(with_region_names(resolve_program(program_or_path, "to_onnx")))
    if written := written_state(ep):
        raise LoweringError(
            f"the program writes state between calls ({', '.join(written[:4])}{', ...' if len(written) > 4 else ''}); an "
            f"ONNX model has none, so those writes would be lost. Pass the state in and out as tensors instead "
            f"(a language model: qexport.export_lm(model, cache='io'))"
        )
    # Every region's lowering is decided (and every refusal raised) before the export starts.
    planned = plan_regions(ep, "onnx", {"opset": opset, "target": target})
    by_name = {p.region.name: p.region for p in planned}
    plans: dict[str, RegionPlan] = {p.region.name: p for p in planned}
    reports = [RegionReport.from_record(p.region.name, p.region.scheme, p.record()) for p in planned]
    manifest = _manifest(ep, opset, keep_regions, target, [p.record() for p in planned])

    model, references = _export_with_placeholders(ep, opset)
    emitted = lower_regions(model, by_name, plans, region_state(ep), references, keep_regions=keep_regions, opset=opset)
    _finalize(model)

    def check(path: "PathLike[str]") -> None:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as e:  # checker and shape-inference errors have several types
            raise LoweringError(f"{out}: the ONNX model failed onnx.checker (full_check): {type(e).__name__}: {e}") from None

    with atomic_path(out) as tmp:
        onnx_file.write(model, tmp, manifest, check=check)
        size = tmp.stat().st_size
    return LoweringReport(
        target="onnx",
        path=str(out),
        regions=reports,
        delegated_nodes=sum(n for name, n in emitted.items() if plans[name].taken),
        total_nodes=sum(1 for _ in model.graph.all_nodes()) + sum(len(f) for f in model.functions.values()),
        bytes=size,
        extra={"opset": opset, "keep_regions": keep_regions, "target": target},
    )


# -- checks and inputs --------------------------------------------------------------------------------
def _check_opset(opset: int | None) -> int:
    if opset is None:
        return DEFAULT_OPSET
    newest, runtime = onnx.defs.onnx_opset_version(), ""
    if (runnable := newest_runnable_opset()) is not None and runnable < newest:
        import onnxruntime

        newest, runtime = runnable, f" (the newest whose QuantizeLinear/DequantizeLinear onnxruntime {onnxruntime.__version__} runs)"
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise LoweringError(
            f"opset={opset!r} is not supported: choose an int from {MIN_OPSET} to {newest}{runtime} "
            f"(int4 and fp8 regions need {BLOCKED_QDQ_OPSET}+; default {DEFAULT_OPSET})"
        )
    return opset


@functools.cache
def newest_runnable_opset() -> int | None:
    """The newest opset at which the installed onnxruntime runs QuantizeLinear/DequantizeLinear (None
    without onnxruntime: then onnx's newest is the bound). onnx defines opsets before onnxruntime
    implements them: onnx 1.23 knows opset 28, whose QuantizeLinear onnxruntime 1.32 has no kernel for
    ("NOT_IMPLEMENTED: Could not find an implementation for QuantizeLinear(28)"), so every int8 file
    written at 28 failed to load."""
    try:
        import onnxruntime
    except ImportError:
        return None
    for version in range(onnx.defs.onnx_opset_version(), MIN_OPSET - 1, -1):
        try:
            onnxruntime.InferenceSession(onnx_file.qdq_probe(version), providers=["CPUExecutionProvider"])
            return version
        except Exception:  # onnxruntime raises its own Fail / NotImplemented types
            continue
    return None


def resolve_target(target: str) -> str:
    """A target name from ONNX_TARGETS, with "host" resolved for the CPU running this call."""
    if target == "host":
        return host_target()
    if not isinstance(target, str) or target not in ONNX_TARGETS:
        raise LoweringError(
            f"target={target!r} is not an ONNX target: choose one of {sorted(ONNX_TARGETS)} or 'host' "
            f"(default {DEFAULT_TARGET!r}, exact on every CPU)"
        )
    return target


def host_target() -> str:
    """The fastest ONNX target that is exact on this machine's CPU."""
    from .cpu_target import has_int8_dot

    if platform.machine() in ("aarch64", "arm64"):
        return "arm64"
    return "x86_vnni" if has_int8_dot() else DEFAULT_TARGET


def check_target_runs_here(target: str | None, source: str) -> None:
    """Refuse to run a file written for CPUs this one is not (its int8 kernels would saturate)."""
    if target in (None, DEFAULT_TARGET) or target not in ONNX_TARGETS or target == host_target():
        return
    from .cpu_target import describe_host

    raise IncompatibleCPUError(
        f"{source}: written for ONNX target {target!r} ({ONNX_TARGETS[target].exact_on}), but this CPU is "
        f"{describe_host()}: onnxruntime would compute its int8 regions wrongly here. Re-export it with "
        f"qexport.to_onnx(..., target='portable'), which is exact on every CPU"
    )


# -- export -------------------------------------------------------------------------------------------
def _export_with_placeholders(ep: torch.export.ExportedProgram, opset: int) -> tuple[ir.Model, dict[str, ir.Function]]:
    """torch.onnx.export of `ep` with each region left as a `qexport.pending::Region` node.

    Returns the model and, per region, the exporter's translation of the region's own subgraph (its
    reference math), used for regions whose scheme has no ONNX lowering here.
    """
    # torch's helper for emitting an arbitrary node from a translation (its own HOP translations,
    # cond/scan, use it); onnxscript's Opset would demand a registered schema for the placeholder.
    from torch.onnx._internal.exporter._torchlib.ops.hop import call_op

    references: dict[str, ir.Function] = {}
    count = [0]

    # Unannotated on purpose: the exporter infers an ONNX signature from annotations and warns on these.
    def region_placeholder(subgraph, *operands, scheme=None, quant_options=None):
        raw = (quant_options or {}).get(PAYLOAD_KEY)
        payload = RegionPayload.from_dict(raw) if raw else None
        # to_onnx recorded every region's unique name in its payload (`with_region_names`)
        name = (payload.name or payload.module if payload else None) or f"region_{count[0]}"
        count[0] += 1
        references[name] = subgraph
        return call_op("Region", *operands, _domain=PENDING_DOMAIN, _num_outputs=len(subgraph.outputs), region=name)

    table = {torch.ops.higher_order.invoke_quant_packed: region_placeholder, **_reduction_fixes()}
    first = min(opset, _converter_max())
    _reuse_torchlib_ops()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep, dynamo=True, custom_translation_table=table, opset_version=first, verbose=False, optimize=True,
            )
    except QExportError:
        raise
    except Exception as e:  # the exporter wraps its failures in its own error types
        raise LoweringError(f"torch.onnx.export failed: {type(e).__name__}: {_exporter_reason(str(e))}") from e
    if first < opset:
        _convert_opset(program.model, opset)
    return program.model, references


def _reuse_torchlib_ops() -> None:
    """Make torch.onnx's registry reuse onnxscript's list of torchlib ops across exports.

    Why: torch.onnx.export rebuilds its op registry on every call, and onnxscript's `get_torchlib_ops`
    re-derives each traced torchlib function's signature from its source (inspect + ast) only to read
    its domain: ~560 functions, about 1 s of every to_onnx after the first (a third of a small MLP's
    export), the same list each time. The list is cached here, per process, keyed by what torchlib's
    registry holds (an op registered later makes a new list); the registry torch builds from it is
    still new per export. Installed once, only where torch asks onnxscript for the list (the module
    named by torch's lazy import); any other torch / onnxscript layout is left as it is.
    """
    try:
        from onnxscript.function_libs.torch_lib import registration
        from torch.onnx._internal import _lazy_import

        apis = importlib.import_module(getattr(_lazy_import.onnxscript_apis, "_name"))
    except (ImportError, AttributeError):
        return
    original = getattr(apis, "get_torchlib_ops", None)
    if original is None or getattr(original, "qexport_reused", False):
        return
    cache: dict[Any, list] = {}

    def get_torchlib_ops():
        ops = original() if not cache else None  # the first call imports torchlib's ops (their registration)
        key = tuple((name, len(f.overloads), len(f.complex)) for name, f in registration.default_registry.items())
        if key not in cache:
            cache.clear()
            cache[key] = ops if ops is not None else original()
        return list(cache[key])

    get_torchlib_ops.qexport_reused = True
    functools.update_wrapper(get_torchlib_ops, original)
    apis.get_torchlib_ops = get_torchlib_ops


def _converter_max() -> int:
    """The newest opset onnxscript's version converter (which torch.onnx runs on its opset-18 graph)
    reaches. Beyond it torch.onnx hands the opset-18 graph to onnx's C converter, which has no adapter
    for the newer ops torchlib already put in it ("No Adapter From Version $19 for Gelu"): the model
    was left at opset 18 with a Gelu and failed the checker, at opsets 26-28 for every model with a GELU
    (BERT, ViT, GPT-2). So the export goes that far and `_convert_opset` takes it the rest."""
    try:
        from onnxscript.version_converter._version_converter import SUPPORTED_MAX_ONNX_OPSET
    except ImportError:  # another onnxscript: let torch.onnx convert, and `_convert_opset`'s check speak
        return onnx.defs.onnx_opset_version()
    return SUPPORTED_MAX_ONNX_OPSET


def _convert_opset(model: ir.Model, opset: int) -> None:
    """onnx's C converter from an opset onnxscript reached to `opset` (no op there is older than it)."""
    from onnxscript.version_converter import convert_version

    convert_version(model, target_version=opset, fallback=True)
    if model.graph.opset_imports.get("") != opset:  # the converter logs its failure and leaves the model as it was
        raise LoweringError(
            f"onnx's version converter could not take this model from opset {model.graph.opset_imports.get('')} to "
            f"opset={opset}; export with opset={_converter_max()} or lower"
        )


def _reduction_fixes() -> dict[Any, Any]:
    """amin/amax over all dims: torchlib's translations make `dim` required although its default is []
    (`Required parameter 'dim' is not provided` for `x.amin()`, which per-tensor dynamic activations use
    in every region's reference subgraph, and the exporter translates those subgraphs too)."""
    from onnxscript import opset18 as op

    def reduce(onnx_reduce):
        def translation(self, dim=(), keepdim=False):
            if dim:
                return onnx_reduce(self, op.Constant(value_ints=list(dim)), keepdims=int(keepdim))
            return onnx_reduce(self, keepdims=int(keepdim))

        return translation

    return {torch.ops.aten.amin.default: reduce(op.ReduceMin), torch.ops.aten.amax.default: reduce(op.ReduceMax)}


_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def _exporter_reason(text: str, n: int = 6) -> str:
    """The cause in a torch.onnx exporter error. Its ConversionError opens with the same next-steps
    boilerplate (in terminal colours) and puts the cause last, under '## Exception summary' (e.g.
    `DispatchError: No ONNX function found for transformers.grouped_mm_fallback`, a Mixtral's experts):
    the first lines alone named no cause. That section when there is one, else the first lines."""
    text = _TERMINAL_COLOURS.sub("", text)
    head, found, summary = text.partition("## Exception summary")
    lines = [line for line in (summary if found else head).strip().splitlines()
             if line.strip() and line.strip() != "⬆️" and not line.startswith("(Refer to the full stack trace")]
    return "\n".join(lines[:n])


# -- the region pass ----------------------------------------------------------------------------------
def lower_regions(
    model: ir.Model,
    regions: Mapping[str, Region],
    plans: Mapping[str, RegionPlan],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    references: Mapping[str, ir.Function],
    *,
    keep_regions: bool,
    opset: int,
) -> dict[str, int]:
    """Replace every `qexport.pending::Region` placeholder of `model` by its region's lowering.

    keep_regions=False splices the region's nodes into the main graph; True makes each region a local
    function `qexport.region::<name>` (metadata_props: the scheme and the region record) and leaves a
    call in its place. Regions whose plan has no `Lowering` use their reference subgraph. `tensors`: region
    name -> role -> the tensor behind that operand (`_graph.region_state`). Returns, per region, how
    many nodes it became; an empty dict means the model had no placeholders (nothing changed).
    """
    graph = model.graph
    placeholders = [n for n in graph if n.domain == PENDING_DOMAIN]
    emitted: dict[str, int] = {}
    taken_names: set[str] = set()
    for node in placeholders:
        name = node.attributes["region"].as_string()
        if name not in regions:
            raise LoweringError(f"the exported ONNX graph has a region {name!r} the program does not list")
        region, plan = regions[name], plans[name]
        old_inputs = [v for v in node.inputs[1:] if v is not None]
        lowering: Lowering | None = plan.lowering
        if lowering is None:
            body = references[name]
            fn = _reference_function(body, region, plan, _function_name(name, taken_names), opset)
            call = ir.Node(fn.domain, fn.name, list(node.inputs), num_outputs=len(node.outputs))
            onnx_file.inherit_scope(node, [call])
            model.functions[fn.identifier()] = fn
            graph.insert_before(node, call)
            new_outputs = list(call.outputs)
            emitted[name] = len(body)
        else:
            try:
                weights = lowering.weights(_region_tensors(region, tensors))
                # The stored layout gives way to the ONNX one, under the same `<module>.<role>` names.
                for i in range(1, len(node.inputs)):
                    node.replace_input_with(i, None)
                _drop_unused_initializers(graph, old_inputs)
                new_outputs, emitted[name] = _emit(model, node, plan, weights, keep_regions, _function_name(name, taken_names), opset)
            except QExportError:
                raise
            except Exception as e:  # a family's ONNX form (a user's): name the region and the form
                raise LoweringError(f"region {name}: emitting its ONNX form ({plan.kernel}) failed: {type(e).__name__}: {e}") from e
        for old, new in zip(node.outputs, new_outputs):
            new.name, new.type, new.shape = old.name, old.type, old.shape
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
    if not keep_regions:
        common_passes.InlinePass()(model)  # reference regions were emitted as calls
    return emitted


def _drop_unused_initializers(graph: ir.Graph, values: list[ir.Value]) -> None:
    for v in values:
        if v.is_initializer() and not v.uses() and v.name in graph.initializers:
            del graph.initializers[v.name]


def _region_tensors(region: Region, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {r: t for r, t in tensors.get(region.name, {}).items() if r != "input"}
    missing = [r for r in region.roles if r != "input" and r not in out]
    if missing:
        raise LoweringError(
            f"region {region.name}: operands {missing} are not buffers of the program; export the quantized model "
            f"with qexport.export"
        )
    return out


def _emit(
    model: ir.Model, node: ir.Node, plan: RegionPlan, weights: Mapping[str, ir.Tensor], keep_regions: bool, fname: str, opset: int
) -> tuple[list[ir.Value], int]:
    lowering: Lowering = plan.lowering
    graph = model.graph
    x = node.inputs[0]
    assert x is not None
    inits: dict[str, ir.Value] = {}
    for role, tensor in weights.items():
        vname = _free_initializer_name(graph, f"{lowering.region.module_path}.{role}")
        value = ir.Value(name=vname, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(value)
        inits[role] = value
    e = Emitter()
    if not keep_regions:
        y = lowering.emit(e, x, inits)
        onnx_file.inherit_scope(node, e.nodes)
        graph.insert_before(node, e.nodes)
        return [y], len(e.nodes)
    fx = ir.Value(name="input", shape=x.shape, type=x.type)
    fw = {role: ir.Value(name=role, shape=v.shape, type=v.type) for role, v in inits.items()}
    y = lowering.emit(e, fx, fw)
    onnx_file.inherit_scope(node, e.nodes)
    y.name = "output"
    fn = ir.Function(
        REGION_DOMAIN, fname,
        graph=ir.Graph([fx, *fw.values()], [y], nodes=e.nodes, opset_imports={"": opset}, name=fname),
        attributes=[],
    )
    _describe_function(fn, lowering.region, plan)
    model.functions[fn.identifier()] = fn
    call = ir.Node(REGION_DOMAIN, fname, [x, *inits.values()], num_outputs=1)
    onnx_file.inherit_scope(node, [call])
    graph.insert_before(node, call)
    return list(call.outputs), len(e.nodes)


def _reference_function(body: ir.Function, region: Region, plan: RegionPlan, fname: str, opset: int) -> ir.Function:
    body.domain, body.name = REGION_DOMAIN, fname
    # The exporter stamps subgraph functions with torchlib's opset (18) and only converts what is still
    # used after its optimizer, which these no longer were; the checker wants one default opset.
    body.opset_imports[""] = opset
    for n in body:
        if n.domain == "":
            n.version = None
    _describe_function(body, region, plan)
    return body


def _describe_function(fn: ir.Function, region: Region, plan: RegionPlan) -> None:
    scheme = region.scheme
    onnx_file.describe_region(fn, scheme.to_dict() if scheme else {"name": region.scheme_name}, {
        "name": region.name, "module_path": region.module_path, "op": region.op, "op_params": region.op_params,
        "roles": list(region.roles), "weight_shape": list(region.weight_shape) if region.weight_shape else None,
        "lowering": plan.record().to_dict(),
    })
    label = scheme.describe() if scheme else region.scheme_name
    fn.doc_string = f"qexport region {region.name}: {region.op} quantized with {label}; {plan.kernel}"


def _function_name(name: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "region"
    fname, i = base, 1
    while fname in taken:
        fname, i = f"{base}_{i}", i + 1
    taken.add(fname)
    return fname


def _free_initializer_name(graph: ir.Graph, name: str) -> str:
    candidate, i = name, 1
    while candidate in graph.initializers:
        candidate, i = f"{name}.onnx{i}", i + 1
    return candidate


def _finalize(model: ir.Model) -> None:
    """Drop what the regions left behind and name every value (ONNX requires names)."""
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedFunctionsPass()(model)
    share_tied_initializers(model)
    model.opset_imports.pop(PENDING_DOMAIN, None)
    if model.functions:
        model.opset_imports[REGION_DOMAIN] = 1
    common_passes.NameFixPass()(model)


# -- manifest ----------------------------------------------------------------------------------------
def _manifest(ep: torch.export.ExportedProgram, opset: int, keep_regions: bool, target: str, records: list) -> Any:
    from serializers.manifest import Manifest

    manifest = Manifest.from_program(ep, artifact="onnx", opset=opset, keep_regions=keep_regions, target=target)
    return manifest.with_lowering(records)


__all__ = ["DEFAULT_OPSET", "MANIFEST_KEY", "REGION_DOMAIN", "SCHEME_KEY", "lower_regions", "to_onnx"]
