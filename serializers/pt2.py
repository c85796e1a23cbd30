"""`.pt2` artifacts: `save(ep, path)` / `load(path)` through torch.export's own archive, with the
qexport manifest stored inside it as an extra file.

The members are exactly what `torch.export.save` writes (a zip of JSON graph, raw tensor bytes and
`extra/` files), repacked by `serializers._archive.seal` with the manifest (and the SHA-256 of every
member) at `<root>/extra/qexport/manifest.json`; `torch.export.load(path)` reads it too, and regions
need nothing registered, since the HOP is torch's own and its options are a plain JSON dict.

`load` never hands torch a byte it has not checked. torch's loader trusts its input: it unpickles
tensor subclasses, torchbind/opaque objects and (after a failed `weights_only` attempt) the sample
inputs with `weights_only=False`, allocates what payload metadata promises, and raises whatever its
parsers raise on damage. So the archive goes through `serializers._archive.read_archive` with this
kind's check (`_check_program`) and torch gets the checked bytes.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import zipfile
from os import PathLike
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch.export.pt2_archive import constants as C

from qexport.errors import ArtifactError, CorruptArtifactError, UnsafeArtifactError

from . import kinds
from .containers import register_program_containers
from qexport.regions import iter_region_nodes

from ._archive import ZIP_MAGIC, Archive, check_allowed, read_archive, seal
from ._archive import read_manifest as _read_manifest
from .files import atomic_path, check_readable, check_writable, pinned_digest
from .manifest import Manifest

#: the manifest's name among torch.export's `extra_files` (stored under `<root>/extra/`)
MANIFEST_NAME = "qexport/manifest.json"
MODEL_NAME = "model"  # the name torch.export.save gives the one program it writes


# -- save -------------------------------------------------------------------------------------

def save(
    ep: torch.export.ExportedProgram,
    path: "str | PathLike[str]",
    *,
    extra: Mapping[str, Any] | None = None,
    keep_stack_traces: bool = False,
) -> Manifest:
    """Write `ep` to `path` (a `.pt2` file) with its manifest; returns the manifest.

    `extra` (JSON-safe) is stored in the manifest's `extra` field. Source stack traces are left out
    unless `keep_stack_traces=True`: a deployment artifact should not carry the absolute paths of the
    machine that exported it, and they are 1 % of an int4 MiniLM file. The file appears complete or
    not at all.
    """
    if not isinstance(ep, torch.export.ExportedProgram):
        raise ArtifactError(f"save() takes a torch.export.ExportedProgram, got {type(ep).__name__}")
    p = check_writable(path, ".pt2")
    manifest = Manifest.from_program(ep, "pt2", **dict(extra or {}))
    _check_picklefree(ep, p)
    with atomic_path(p) as tmp, _debug_meta_dropped(ep, stack_traces=not keep_stack_traces):
        try:
            torch.export.save(ep, tmp)
        except Exception as e:
            raise ArtifactError(f"{p}: torch.export.save failed: {type(e).__name__}: {e}") from e
        manifest = seal(tmp, manifest)
    return manifest


# Debug metadata a region body's nodes inherit from the region call; the HOP node keeps its own copy.
_BODY_DEBUG_META = ("stack_trace", "torch_fn", "nn_module_stack", "source_fn_stack", "from_node")


@contextlib.contextmanager
def _debug_meta_dropped(ep: torch.export.ExportedProgram, *, stack_traces: bool) -> Iterator[None]:
    """While saving, leave out the debug metadata of the nodes inside region bodies (and, with
    `stack_traces`, every node's stack trace); the user's program is left as it was.

    Why: torch's serde inlines every region's body and gives each of its nodes a copy of the region
    call's stack trace (the `invoke_quant(` line in quantize.py, already on the HOP node itself) and
    a `torch_fn` tag. On all-MiniLM-L6-v2 int4 that is 0.66 MB of a 1.65 MB graph JSON, 4% of the
    whole artifact.
    """
    saved: list[tuple[dict, str, Any]] = []

    def drop(node: torch.fx.Node, keys: tuple[str, ...]) -> None:
        for key in keys:
            if key in node.meta:
                saved.append((node.meta, key, node.meta.pop(key)))

    for node in iter_region_nodes(ep):
        body = getattr(ep.graph_module, node.args[0].target, None) if isinstance(node.args[0], torch.fx.Node) else None
        if isinstance(body, torch.fx.GraphModule):
            for inner in body.graph.nodes:
                drop(inner, _BODY_DEBUG_META)
    if stack_traces:
        for gm in ep.graph_module.modules():
            if isinstance(gm, torch.fx.GraphModule):
                for node in gm.graph.nodes:
                    drop(node, ("stack_trace",))
    try:
        yield
    finally:
        for meta, key, value in saved:
            meta[key] = value


def _check_picklefree(ep: torch.export.ExportedProgram, p: Path) -> None:
    """Refuse, before writing, a program whose archive `load` would refuse as unsafe."""
    from qexport.validate import check_state

    check_state(ep, str(p))
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for kind, items in (("state", ep.state_dict.items()), ("constant", ep.constants.items())):
        for fqn, v in items:
            if not isinstance(v, torch.Tensor):
                raise UnsafeArtifactError(
                    f"{p}: {kind} {fqn!r} is a {type(v).__name__}, which torch.export.save pickles; "
                    f"qexport artifacts hold tensors only"
                )
            if is_traceable_wrapper_subclass(v) or type(v) not in (torch.Tensor, torch.nn.Parameter):
                raise UnsafeArtifactError(
                    f"{p}: {kind} {fqn!r} is a tensor subclass ({type(v).__name__}), which torch.export.save "
                    f"pickles; quantize with qexport (plain tensors per role) instead"
                )
    if ep.example_inputs is not None:
        buf = io.BytesIO()
        try:
            torch.save(ep.example_inputs, buf)
            buf.seek(0)
            torch.load(buf, weights_only=True)
        except Exception as e:
            raise UnsafeArtifactError(
                f"{p}: the program's example inputs cannot be stored without pickling code "
                f"({type(e).__name__}); export with plain tensors (and dicts/tuples of them) as inputs"
            ) from None


# -- checking the archive ----------------------------------------------------------------------

#: members a program archive holds besides its payloads (names under the archive root)
PROGRAM_RECORDS = frozenset({
    C.MODELS_FILENAME_FORMAT.format(MODEL_NAME),
    C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME),
    C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME),
    C.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL_NAME),
})
_PAYLOAD_DEVICES = ("cpu", "cuda")


def _check_program(archive: Archive) -> None:
    """The `.pt2` kind: exactly one program, payloads that are raw tensor bytes large enough for what
    their metadata promises, example inputs torch can read without unpickling code."""
    p = archive.path
    if archive.kind != "pt2":
        raise UnsafeArtifactError(f"{p}: holds AOTInductor compiled code; load it with qexport.load_compiled")
    payloads: set[str] = set()
    for config_name, folder, kind in (
        (C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME), C.WEIGHTS_DIR, "weight"),
        (C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME), C.CONSTANTS_DIR, "constant"),
    ):
        config = archive.json(config_name)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise CorruptArtifactError(f"{p}: {config_name} has no 'config' object")
        for fqn, meta in entries.items():
            path_name = meta.get("path_name") if isinstance(meta, dict) else None
            if not isinstance(path_name, str) or "/" in path_name:
                raise CorruptArtifactError(f"{p}: {config_name}: entry {fqn!r} is malformed")
            if meta.get("use_pickle") is not False or path_name.startswith((C.CUSTOM_OBJ_FILENAME_PREFIX, C.OPAQUE_OBJ_FILENAME_PREFIX)):
                raise UnsafeArtifactError(
                    f"{p}: {kind} {fqn!r} is pickled ({path_name}); qexport does not unpickle artifacts"
                )
            member = folder + path_name
            if member not in archive.members:
                raise CorruptArtifactError(f"{p}: {kind} {fqn!r} has no payload {member!r}")
            _check_payload_size(p, f"{kind} {fqn!r}", meta.get("tensor_meta"), len(archive.members[member]))
            payloads.add(member)
    check_allowed(archive, lambda n: n in PROGRAM_RECORDS or n in payloads, "a qexport program (one program, its payloads)")
    for n in PROGRAM_RECORDS:
        if n not in archive.members:
            raise CorruptArtifactError(f"{p}: the archive has no {n!r} record")
    if archive.members[C.ARCHIVE_FORMAT_PATH] != C.ARCHIVE_FORMAT_VALUE.encode():
        raise CorruptArtifactError(f"{p}: archive_format is not {C.ARCHIVE_FORMAT_VALUE!r}")
    samples = _check_sample_inputs(p, archive.members[C.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL_NAME)])
    graph = archive.json(C.MODELS_FILENAME_FORMAT.format(MODEL_NAME))
    _check_source_names(p, graph, samples)
    _check_symbolic_exprs(p, graph)
    _check_guards(p, graph)
    _check_operators(p, graph)


# torch's deserializer builds every symbolic shape from its `expr_str` with `sympy.sympify`, which
# evaluates the string as Python: a program whose tensor sizes say `__import__('os').system(...)` runs
# it inside torch.export.load. So every expr_str must be what torch writes (sympy's srepr of a shape
# expression, or the older infix form) before torch sees it: calls of sympy's and torch's shape
# functions, integers, symbol names, the `name=True` assumptions of a Symbol. No attribute, subscript,
# other name or string gets through, and a power's base must be a symbol (`Pow(Integer(9),
# Integer(10**19))` is evaluated exactly by sympy, a hang).
_SHAPE_CALLS = frozenset({
    "Add", "Mul", "Pow", "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Mod", "Abs", "floor", "ceiling",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "ExprCondPair", "IntInfinity",
    "NegativeIntInfinity", "Infinity", "NegativeInfinity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
    "BitwiseFn_bitwise_xor", "CeilDiv", "CeilToInt", "CleanDiv", "FloatPow", "FloatTrueDiv", "FloorDiv",
    "FloorToInt", "Identity", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "LShift", "ModularIndexing",
    "PowByNatural", "PythonMod", "RShift", "RoundDecimal", "RoundToInt", "ToFloat", "TruncToFloat", "TruncToInt",
    "Where", *(f"OpaqueUnaryFn_{f}" for f in ("acos", "asin", "asinh", "atan", "cos", "cosh", "exp", "log", "log2",
                                              "sin", "sinh", "sqrt", "tan", "tanh")),
})
_SHAPE_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift"})
_SHAPE_CONSTANTS = frozenset({"True", "False", "true", "false", "oo", "zoo", "nan", "int_oo"})
_SHAPE_SYMBOL = re.compile(r"[a-z]{1,4}\d{1,10}")
_SHAPE_NUMBER = re.compile(r"\d{1,20}(?:\.\d{1,20})?(?:[eE][-+]?\d{1,4})?")
_SHAPE_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d{1,20}(?:\.\d{1,20})?(?:[eE][-+]?\d{1,4})?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|'(?P<str>[^'\\]*)'|(?P<op>\*\*|//|<=|>=|==|!=|[-+*/%()<>,&|~=]))"
)
_MAX_EXPR = 10_000


def _safe_shape_expr(expr: Any) -> bool:
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR:
        return False
    tokens, at = [], 0
    while at < len(expr.rstrip()):
        m = _SHAPE_TOKEN.match(expr, at)
        if m is None or m.end() == at:
            return False
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        at = m.end()
    for i, (kind, text) in enumerate(tokens):
        after = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "name":
            if after == "(":
                if text not in _SHAPE_CALLS or (text in _SHAPE_POWERS and tokens[i + 2:i + 3] != [("name", "Symbol")]):
                    return False
            elif after == "=":
                if not re.fullmatch(r"[a-z][a-z_]{0,29}", text):
                    return False
            elif text not in _SHAPE_CONSTANTS and not _SHAPE_SYMBOL.fullmatch(text):
                return False
        elif kind == "str":
            call = tokens[i - 2][1] if i >= 2 and tokens[i - 1][1] == "(" else None
            if not ((call == "Symbol" and _SHAPE_SYMBOL.fullmatch(text)) or (call == "Float" and _SHAPE_NUMBER.fullmatch(text))):
                return False
    return True


def _json_values(document: Any) -> Iterator[Any]:
    """Every value in a JSON document, objects' keys included, at any depth (iteratively: a deep file
    must not overflow the stack)."""
    stack = [document]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _json_objects(document: Any) -> Iterator[dict]:
    """Every JSON object in the document, at any depth."""
    return (v for v in _json_values(document) if isinstance(v, dict))


def _check_symbolic_exprs(p: Path, graph: Any) -> None:
    """Refuse a program whose symbolic shapes are not expressions torch writes (see _SHAPE_CALLS)."""
    for node in _json_objects(graph):
        if "expr_str" in node and not _safe_shape_expr(node["expr_str"]):
            raise UnsafeArtifactError(
                f"{p}: the program holds a symbolic shape {str(node['expr_str'])[:80]!r} that is not a shape expression "
                f"torch writes; torch.export.load would evaluate it as Python. Re-export and save the program with qexport"
            )


# Names torch pastes into Python source and execs. FX writes each program's `forward` from its
# placeholders' names, which torch's deserializer sets as the file says (bypassing FX's own cleaning),
# and its keyword-argument names; a subgraph's name becomes `getattr(self, "<name>")`; ep.module()
# writes `def forward(self, <names>)` from the signature's forward_arg_names (or the input spec's
# keyword names), pastes every input's key path into its guards' messages (the example inputs' dict
# keys included) and a constant string input's value as a quoted literal. A resealed .pt2 whose input
# was named `x=__import__('os').system(...)` ran it inside torch.export.load; one whose example inputs
# held a dict key with a double quote ran code on each call of ep.module(). So names must be
# identifiers (parameter and buffer paths: dotted ones), and every other key or string a program or
# its example inputs hold there must be free of quotes, backslashes and control characters (inside a
# quoted literal, such a string cannot end it).
_SOURCE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_SOURCE_FQN = re.compile(r"[A-Za-z0-9_]{1,200}(?:\.[A-Za-z0-9_]{1,200}){0,63}")
_SOURCE_KEY = re.compile(r"[^'\"\\\x00-\x1f\x7f]{0,200}")
_NAME_FIELDS = frozenset({"name", "as_name"})
_FQN_FIELDS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"})
_VALUE_TABLES = frozenset({"tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values"})


def _check_source_names(p: Path, graph: Any, samples: Any) -> None:
    """Refuse a program or example inputs holding a name or key torch would paste into code unquoted
    or break a quoted literal with (see _SOURCE_NAME)."""
    def refuse(what: str, name: Any) -> UnsafeArtifactError:
        return UnsafeArtifactError(
            f"{p}: the program holds {what} {str(name)[:80]!r}, which torch would paste into the Python source it runs; "
            f"torch.export writes identifiers there. Re-export and save the program with qexport"
        )

    for node in _json_objects(graph):
        for field, value in node.items():
            if not isinstance(value, str) or value == "":  # a dict argument's "name" key holds an argument, not a name
                pass
            elif field in _NAME_FIELDS and not _SOURCE_NAME.fullmatch(value) or field in _FQN_FIELDS and not _SOURCE_FQN.fullmatch(value):
                raise refuse(f"a {field}", value)
            if field in _VALUE_TABLES and isinstance(value, dict):
                for name in value:
                    if not _SOURCE_NAME.fullmatch(name):
                        raise refuse("a value named", name)
            if field == "inputs" and "nodes" in node and isinstance(value, list):  # a graph's constant inputs: `L['s'] == '<value>'`
                for item in value:
                    text = item.get("as_string") if isinstance(item, dict) else None
                    if isinstance(text, str) and not _SOURCE_KEY.fullmatch(text):
                        raise refuse("a constant input", text)
            if field == "forward_arg_names" and isinstance(value, list):
                for name in value:
                    if not (isinstance(name, str) and _SOURCE_NAME.fullmatch(name)):
                        raise refuse("an argument named", name)
            if field in ("in_spec", "out_spec") and isinstance(value, str):
                for _, kwargs, context in _spec_nodes(value):
                    if (module := _spec_import(context)) is not None:
                        raise UnsafeArtifactError(
                            f"{p}: the program's {field} names {module[:80]!r}, which torch's reader would import "
                            f"(running that module's code); qexport programs hold plain containers. Re-export and save it with qexport")
                    for key in (v for v in _json_values(context) if isinstance(v, str)):
                        if not (_SOURCE_NAME if kwargs else _SOURCE_KEY).fullmatch(key):
                            raise refuse("an input key" if field == "in_spec" else "an output key", key)
    stack = [(samples, False)]
    while stack:  # the example inputs: (args, kwargs), kwargs' keys become argument names
        value, kwargs = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, (str, int)) or isinstance(key, str) and not (_SOURCE_NAME if kwargs else _SOURCE_KEY).fullmatch(key):
                    raise refuse("an example input keyed", key)
                stack.append((item, False))
        elif isinstance(value, (list, tuple)):
            top = value is samples and len(value) == 2
            stack.extend((item, top and i == 1) for i, item in enumerate(value))


def _spec_nodes(spec: str) -> Iterator[tuple[Any, bool, Any]]:
    """(node, whether its context holds keyword-argument names, its context as torch decodes it) for
    every node of a serialized treespec; the input spec's kwargs keys are argument names."""
    import json

    try:
        _, root = json.loads(spec)
    except (ValueError, TypeError, RecursionError):
        return  # torch's loader reports an unreadable spec
    stack = [(root, False)]
    while stack:
        node, kwargs = stack.pop()
        if not isinstance(node, dict):
            continue
        context = node.get("context")
        try:  # torch decodes a context string as JSON (with its enum hook), and hands others over as they are
            context = json.loads(context) if isinstance(context, str) else context
        except (ValueError, RecursionError):
            pass
        yield node, kwargs, context
        children = node.get("children_spec") or []
        top = node is root and node.get("type") == "builtins.tuple" and len(children) == 2
        stack.extend((c, top and i == 1) for i, c in enumerate(children))


def _spec_import(context: Any) -> str | None:
    """The module torch's treespec reader would import for a context, or None. Its JSON hook turns
    any `{"__enum__": ..., "fqn": "module:name"}` into `importlib.import_module(module)` (a resealed
    program naming `this` printed the Zen of Python inside torch.export.load: any installed module's
    top-level code runs), and a defaultdict's context names the module of its default factory."""
    for v in _json_objects(context):
        if "__enum__" in v:
            return str(v.get("fqn"))
        module = v.get("default_factory_module")
        if module is not None and module != "builtins":
            return str(module)
    return None


# A program's `guards_code` (input checks torch.export found while tracing: "L['x'].size()[1] >= 3")
# becomes Python source that `ep.module()` execs: each guard is pasted into `torch._assert(<guard>,
# "Guard failed: <guard>")`. Every runner, verify, bench and serve call ep.module(), so a resealed
# program whose guard was `__import__('os').system(...)` ran it on each call, and one that closed the
# call with a newline ran a top-level statement as it loaded. A guard must be one line of what torch
# writes: comparisons and arithmetic over input sizes (`L['name'].size()[i]`, stride, storage_offset),
# integers, and the shape functions of torch's printer; no other name, attribute, call or string.
_GUARD_NAMES = frozenset({"L", "math", "torch", "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless",
                          "max", "min", "abs", "int", "float", "round"})
_GUARD_TENSOR_ATTRS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_MODULE_ATTR = {"math": re.compile(r"[a-z][a-z0-9]*"), "torch": re.compile(r"_?sym_[a-z_]+")}
_GUARD_MAX_POWER = 64


def _safe_guard(code: Any) -> bool:
    import ast

    if not isinstance(code, str) or len(code) > _MAX_EXPR or not code.isprintable() or any(c in code for c in '#\\"'):
        return False
    try:
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    allowed = (ast.Expression, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Call, ast.Load, ast.Eq, ast.NotEq,
               ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd, ast.Add, ast.Sub, ast.Mult,
               ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.Name, ast.Constant, ast.Attribute, ast.Subscript)
    # strings, and the sequences size()/stride() return, only ever indexed: 'ab' * 2**33 or
    # L['x'].size() * 10**9 would be gigabytes on each call
    indexed = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Subscript)}
    indexed |= {id(n.slice) for n in ast.walk(tree) if isinstance(n, ast.Subscript)}
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            return False
        if isinstance(node, ast.Name) and node.id not in _GUARD_NAMES:
            return False
        if isinstance(node, ast.Constant) and not (type(node.value) in (int, float, bool) and abs(node.value) <= 2 ** 64):
            if not (isinstance(node.value, str) and node.value and _SOURCE_KEY.fullmatch(node.value) and id(node) in indexed):
                return False  # a string is only an input's key (L['x'], L['kwargs']['mask'], L['d']['input-ids'])
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("size", "stride") \
                and id(node) not in indexed:
            return False
        if isinstance(node, ast.Attribute):
            module = node.value.id if isinstance(node.value, ast.Name) else None
            if module in _GUARD_MODULE_ATTR:
                if not _GUARD_MODULE_ATTR[module].fullmatch(node.attr):
                    return False
            elif node.attr not in _GUARD_TENSOR_ATTRS:
                return False
        if isinstance(node, ast.Call) and (node.keywords or not isinstance(node.func, (ast.Name, ast.Attribute))):
            return False
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Constant):
            return False
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):  # 9 ** 10 ** 19 is an exact, endless computation
            if not (isinstance(node.right, ast.Constant) and type(node.right.value) is int and 0 <= node.right.value <= _GUARD_MAX_POWER):
                return False
            if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node.left)):
                return False  # ((s ** 64) ** 64) ** 64: the bits multiply at each level
    return True


def _check_guards(p: Path, graph: Any) -> None:
    """Refuse a program whose guards are not input checks torch writes (see _GUARD_NAMES)."""
    guards = graph.get("guards_code") if isinstance(graph, dict) else None
    if guards is None:
        return
    if not isinstance(guards, list):
        raise CorruptArtifactError(f"{p}: the program's guards_code is a {type(guards).__name__}, not a list")
    for code in guards:
        if not _safe_guard(code):
            raise UnsafeArtifactError(
                f"{p}: the program holds an input guard {str(code)[:80]!r} that is not a check torch writes; running the "
                f"program would execute it as Python. Re-export and save the program with qexport"
            )


# Operators a program may not call: running the program (verify, bench, a Runner) must not reach
# files, other processes or the network. torch's deserializer accepts any registered operator, and
# `aten.from_file(filename, shared=True, size)` in a resealed .pt2 created (and could fill) any file
# when the program ran; `aten.save` writes one. Refused: every operator whose schema takes a file
# name, and the namespaces of collective communication and debug loaders.
_IO_NAMESPACES = frozenset({"c10d", "_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "_dtensor",
                            "symm_mem", "cplib", "debugprims", "profiler"})
_FILE_ARGS = frozenset({"filename", "file", "path", "filepath"})
# Operators that write to the terminal: a resealed program calling aten._print (or the print HOP, a
# format string over its arguments) printed raw escape sequences, or a forged "pass" row, into the
# output of `qexport verify` and `bench`, whose own text is escaped (qexport.table.printable).
_PRINTING_OPS = frozenset({"aten._print", "higher_order.print"})


def _reaches_outside(target: str) -> bool:
    parts = target.split(".")
    if parts[:2] != ["torch", "ops"] or len(parts) < 4:
        return False  # builtins (operator, math, torch.sym_*): torch's verifier refuses any other callable
    if parts[2] in _IO_NAMESPACES or ".".join(parts[2:4]) in _PRINTING_OPS:
        return True
    try:
        op = getattr(getattr(getattr(torch.ops, parts[2]), parts[3]), parts[4] if len(parts) > 4 else "default")
        schema = op._schema
    except Exception:  # not registered here (torch then fails to deserialize it) or a higher-order op
        return False
    return any(a.name in _FILE_ARGS and "str" in str(a.type) for a in schema.arguments)


def _check_operators(p: Path, graph: Any) -> None:
    """Refuse a program that calls an operator which reaches files, the terminal or other processes (see _IO_NAMESPACES),
    as a node's target or handed to another operator as an argument (`as_operator`): higher-order ops
    call those (`strict_mode(op, operands)` runs `op(*operands)`), and torch's deserializer resolves an
    argument's name as any attribute path under `torch` (`torch.os.system`, `torch.save`), not only ops."""
    for node in _json_objects(graph):
        target = node.get("target")
        if isinstance(target, str) and "inputs" in node and _reaches_outside(target):
            raise _calls_outside(p, target)
        if "as_operator" in node:
            op = node["as_operator"]
            if not isinstance(op, str) or not op.startswith("torch.ops.") or _reaches_outside(op):
                raise _calls_outside(p, str(op))


def _calls_outside(p: Path, op: str) -> UnsafeArtifactError:
    if not op.startswith("torch.ops."):
        return UnsafeArtifactError(
            f"{p}: the program hands {op[:120]!r} to an operator as an argument; torch writes only operators "
            f"(torch.ops....) there, and would resolve this as any Python callable. Re-export and save it with qexport"
        )
    return UnsafeArtifactError(
        f"{p}: the program calls {op[:120]!r}, which reads or writes files, prints, or talks to other processes; "
        f"qexport does not load programs that do (export the model without it)"
    )


def _check_payload_size(p: Path, what: str, meta: Any, nbytes: int) -> None:
    """torch allocates what a payload's metadata says (zeros for an empty member); refuse metadata
    that promises more bytes than the member holds before it does."""
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    def ints(values: Any) -> list[int]:
        if not isinstance(values, list) or not all(isinstance(v, dict) and set(v) == {"as_int"} for v in values):
            raise ValueError("not a list of ints")
        out = [v["as_int"] for v in values]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
            raise ValueError("negative or non-integer")
        return out

    try:
        if not isinstance(meta, dict):
            raise ValueError("no tensor_meta")
        dtype = _SERIALIZE_TO_TORCH_DTYPE[ScalarType(meta["dtype"])]
        sizes, strides, (offset,) = ints(meta["sizes"]), ints(meta["strides"]), ints([meta["storage_offset"]])
        device = meta["device"]["type"]
        if len(sizes) != len(strides) or device not in _PAYLOAD_DEVICES:
            raise ValueError(f"{len(sizes)} sizes, {len(strides)} strides, device {device!r}")
    except Exception as e:
        raise CorruptArtifactError(f"{p}: {what}: malformed tensor metadata ({type(e).__name__}: {e})") from None
    span = 0 if 0 in sizes else offset + 1 + sum((n - 1) * s for n, s in zip(sizes, strides))
    need = span * dtype.itemsize
    if need > nbytes or (nbytes == 0) != (need == 0) or nbytes % dtype.itemsize:
        raise CorruptArtifactError(
            f"{p}: {what}: its metadata ({sizes}, {dtype}) needs {need:,} bytes but its payload holds {nbytes:,}"
        )


def _check_sample_inputs(p: Path, data: bytes) -> Any:
    """The stored example inputs (None when there are none), read as torch will read them."""
    if not data:
        return None
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CorruptArtifactError(f"{p}: the stored example inputs are damaged ({e})") from None
        # torch retries this with weights_only=False, which would run whatever the pickle says
        raise UnsafeArtifactError(
            f"{p}: the stored example inputs hold objects other than tensors and containers "
            f"(weights_only=True refuses them); refusing to unpickle them"
        ) from None
    except Exception as e:
        raise CorruptArtifactError(f"{p}: the stored example inputs are damaged ({type(e).__name__}: {e})") from None


# -- load / inspect ---------------------------------------------------------------------------

def load(path: "str | PathLike[str]", *, expected_sha256: str | None = None) -> torch.export.ExportedProgram:
    """Read a `.pt2` written by `save`: the archive is verified (layout, CRCs, the manifest's member
    digests, one program, payload sizes), nothing is unpickled, and the program's regions are checked
    against the manifest. `expected_sha256` (hex) pins the whole file's digest."""
    expected_sha256 = pinned_digest(expected_sha256)
    p = check_readable(path)
    try:
        archive = read_archive(p, _check_program, expected_sha256=expected_sha256)
    except CorruptArtifactError:
        kinds.check_kind(p, "pt2", "qexport.load")  # a .pte / .onnx given to load: say what it is instead
        raise
    register_program_containers(archive.members[C.MODELS_FILENAME_FORMAT.format(MODEL_NAME)])
    try:
        # the checked bytes, not the path: the file may change between the check and the load
        ep = torch.export.load(io.BytesIO(archive.data))
    except Exception as e:  # torch's deserializer raises anything its parsers raise
        raise CorruptArtifactError(f"{p}: torch.export.load could not deserialize the program ({type(e).__name__}: {e})") from None
    archive.manifest.check_against(ep, source=str(p))
    try:  # what every runner (verify, bench, serve, generate) and most users call first
        ep.module()
    except Exception as e:  # torch writes the module's Python from the signature, the example inputs and the graph
        raise CorruptArtifactError(
            f"{p}: torch cannot make a module of this program ({type(e).__name__}: {str(e)[:200]}): its signature, "
            f"example inputs and graph do not fit together; re-export it"
        ) from None
    return ep


def read_manifest(path: "str | PathLike[str]") -> Manifest:
    """The manifest of a qexport `.pt2` (or AOTI package) without loading its program."""
    return _read_manifest(check_readable(path))[1]


def has_aoti_code(p: Path) -> bool | None:
    """Whether a zip holds AOTInductor code (an AOTI package is a pt2 archive too); None if damaged.
    The pt2 and aoti readers both sniff with this, so they never both claim, or both refuse, a file."""
    try:
        with zipfile.ZipFile(p) as z:
            return any(f"/{C.AOTINDUCTOR_DIR}" in n for n in z.namelist())
    except Exception:
        return None


def sniff(p: Path, head: bytes) -> bool:
    # Damaged zips are claimed here, so the user hears what is wrong with them.
    return head.startswith(ZIP_MAGIC) and has_aoti_code(p) is not True
