"""ONNX models written by `qexport.to_onnx`: the writer (`write`, `describe_region`), the `inspect`
reader and the checked reads the runtime builds its sessions from (`read_model`).

The manifest is the model's metadata_props entry `qexport.manifest`. A model written with
`keep_regions=True` also keeps each region as a local function of domain `qexport.region` whose own
metadata_props carry the scheme (`qexport.scheme`) and the region record (`qexport.region`);
`region_functions` reads those back. Nothing here builds or runs a model (`qdq_probe` only writes the bytes of
a two-node one).

ONNX files carry no checksum (in the fuzz run of docs/security.md, 43 % of damaged files loaded). `seal`
appends one as a protobuf field that no ONNX reader knows (so onnx and onnxruntime skip it): the
SHA-256 of the model bytes before it. `read_checked` verifies it; everything qexport opens goes
through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from qexport.errors import CorruptArtifactError, UnsafeArtifactError
from qexport.schemes import Scheme

from ._archive import read_sealed, seal_trailer
from .files import check_readable
from .manifest import Manifest

MANIFEST_KEY = "qexport.manifest"
REGION_DOMAIN = "qexport.region"
SCHEME_KEY = "qexport.scheme"
REGION_KEY = "qexport.region"
#: the checksum's protobuf field: the largest number protobuf allows, length-delimited (wire type 2)
_TRAILER_HEAD = bytes.fromhex("faffffff0f") + bytes([48]) + b"qexport-sha256:\0"


def seal(path: Path) -> None:
    """Append the checksum field to the `.onnx` just written at `path`."""
    seal_trailer(path, _TRAILER_HEAD)


# -- writing ------------------------------------------------------------------------------------------
def describe_region(function: Any, scheme: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """Record a region's scheme (its dict) and region record in the metadata_props of the local
    function (an onnx-ir Function of domain REGION_DOMAIN) that keeps it; `region_functions` reads them."""
    function.metadata_props[SCHEME_KEY] = json.dumps(dict(scheme))
    function.metadata_props[REGION_KEY] = json.dumps(dict(record))


#: torch.onnx's record of the module an FX node ran in (a node's metadata_props), which `inherit_scope`
#: gives every node emitted for a region, as spliced FX nodes inherit nn_module_stack: tools that group
#: nodes by module (model-explorer reads `namespace`) then show them in the model's module. Not its stack
#: trace and scope lists: with them int8_dynamic MiniLM's 59.1 MB .onnx grew 4.8 % (namespace alone:
#: 1.1 %), and a stack trace holds absolute source paths, which qexport.save leaves out of a .pt2 too.
_INHERITED_PROPS = ("namespace",)


def inherit_scope(region_node: Any, nodes: Iterable[Any]) -> None:
    """Give onnx-ir `nodes`, emitted in place of `region_node`, the module scope torch.onnx recorded on it."""
    props = {k: v for k, v in region_node.metadata_props.items() if k in _INHERITED_PROPS}
    for n in nodes:
        for k, v in props.items():
            n.metadata_props.setdefault(k, v)


def write(model: Any, path: Path, manifest: Manifest, *, check: Callable[[Path], None] | None = None) -> None:
    """Write an onnx-ir Model to `path` with `manifest` in its metadata_props, then (after
    `check(path)`, e.g. onnx.checker, which reads the file) seal it with the checksum field."""
    import onnx_ir as ir

    model.metadata_props[MANIFEST_KEY] = manifest.to_json()
    ir.save(model, path)
    if check is not None:
        check(path)
    seal(path)


def read_checked(path: "str | Path", expected_sha256: str | None = None) -> bytes:
    """The model bytes of a sealed `.onnx` (without the checksum field), after checking it."""
    return read_sealed(Path(path), _TRAILER_HEAD, "model", "qexport.to_onnx", expected_sha256)


def _load(p: Path, data: bytes | None = None) -> Any:
    import onnx

    data = read_checked(p) if data is None else data
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise CorruptArtifactError(f"{p}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if (tensor := _external_tensor(proto)) is not None:
        raise UnsafeArtifactError(
            f"{p}: tensor {tensor.name[:80]!r} reads its data from another file "
            f"({[(e.key, e.value[:80]) for e in tensor.external_data][:3]}); qexport writes every weight inside the "
            f".onnx and does not let a model read other files: re-export it with qexport.to_onnx"
        )
    return proto


def _external_tensor(proto: Any) -> Any:
    """The first tensor anywhere in `proto` (initializers, sparse ones, node attributes, subgraphs,
    functions) whose data lives in an external file, or None.

    Why every one is refused: onnxruntime reads external data relative to the working directory when
    it gets a model's bytes (what qexport hands it), refusing only absolute paths: a `location` of
    `../../home/me/.ssh/id_rsa` became a model's weights, a FIFO hangs the load."""
    from google.protobuf.message import Message

    stack = [proto]
    while stack:
        msg = stack.pop()
        if msg.DESCRIPTOR.full_name == "onnx.TensorProto" and (msg.data_location == msg.EXTERNAL or len(msg.external_data)):
            return msg
        for field, value in msg.ListFields():
            if field.type == field.TYPE_MESSAGE:
                stack.extend(v for v in ([value] if isinstance(value, Message) else value) if isinstance(v, Message))
    return None


def _manifest(p: Path, proto: Any) -> Manifest:
    props = {e.key: e.value for e in proto.metadata_props}
    if MANIFEST_KEY not in props:
        raise CorruptArtifactError(
            f"{p}: an ONNX model without a qexport manifest (metadata_props[{MANIFEST_KEY!r}]); it was not "
            f"written by qexport.to_onnx"
        )
    return Manifest.from_json(props[MANIFEST_KEY], source=str(p))


def read_manifest(path: "str | Path", data: bytes | None = None) -> Manifest:
    """The manifest of the `.onnx` at `path`; `data`: its bytes from `read_checked`, when already read."""
    p = check_readable(path)
    return _manifest(p, _load(p, data))


def _region_props(proto: Any) -> dict[str, dict[str, str]]:
    """function name -> metadata_props of every region local function."""
    return {fn.name: {e.key: e.value for e in fn.metadata_props} for fn in proto.functions if fn.domain == REGION_DOMAIN}


def region_functions(path: "str | Path") -> dict[str, tuple[Scheme, dict[str, Any]]]:
    """function name -> (scheme, region record) of every region kept as an ONNX local function
    (empty for a model written with keep_regions=False)."""
    p = check_readable(path)
    out: dict[str, tuple[Scheme, dict[str, Any]]] = {}
    for name, props in _region_props(_load(p)).items():
        try:
            out[name] = (Scheme.from_dict(json.loads(props[SCHEME_KEY])), json.loads(props[REGION_KEY]))
        except (KeyError, ValueError, TypeError) as e:
            raise CorruptArtifactError(f"{p}: region function {name} has no readable scheme metadata ({e})") from None
    return out


@dataclass(frozen=True)
class CheckedModel:
    """A qexport `.onnx` read once and checked: `data` is what onnxruntime gets (the model without
    its checksum field), `proto` the parsed ModelProto."""

    path: Path
    data: bytes
    proto: Any

    @property
    def manifest(self) -> Manifest:
        return _manifest(self.path, self.proto)

    def region_calls(self) -> list[tuple[str, str, str]]:
        """(output value, region name, function name) of every call of a region kept as a local
        function, in graph order; the region name comes from the region record (its module path in
        files written before region names were unique, else the function's name)."""
        module_of = {}
        for name, props in _region_props(self.proto).items():
            try:
                record = json.loads(props.get(REGION_KEY, "{}"))
                module_of[name] = record.get("name") or record.get("module_path") or name
            except (ValueError, AttributeError):
                module_of[name] = name
        return [(n.output[0], module_of.get(n.op_type, n.op_type), n.op_type) for n in self.proto.graph.node
                if n.domain == REGION_DOMAIN and n.output]

    def with_outputs(self, names: list[str]) -> bytes:
        """The model's bytes with `names` (intermediate values) added to the graph's outputs."""
        import onnx

        full = onnx.ModelProto()
        full.CopyFrom(self.proto)
        known = {o.name for o in full.graph.output}
        full.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in known)
        return full.SerializeToString()


def read_model(path: "str | PathLike[str]", expected_sha256: str | None = None) -> CheckedModel:
    """The `.onnx` at `path`, checked (its checksum field, and `expected_sha256`, hex, if given) and
    parsed once."""
    p = check_readable(path)
    data = read_checked(p, expected_sha256)
    return CheckedModel(p, data, _load(p, data))


def qdq_probe(opset: int) -> bytes:
    """The bytes of a two-node model (QuantizeLinear -> DequantizeLinear) at `opset`: what the lowering
    hands onnxruntime to learn which opsets it implements (`lower.onnx.newest_runnable_opset`)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [1.0]), helper.make_tensor("z", TensorProto.UINT8, [], [0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10).SerializeToString()


def sniff(p: Path, head: bytes) -> bool:
    # A serialized ModelProto starts with field 1 (ir_version, varint): tag byte 0x08.
    return p.suffix == ".onnx" and head[:1] == b"\x08"
