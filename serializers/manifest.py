"""The qexport manifest: a versioned JSON record of every region an artifact holds.

Every qexport artifact (.pt2, AOTI package, .pte, .onnx) embeds one, so `qexport.inspect` can say
what each region is (scheme, module, bytes) without building or running the model, and a loader can
check that the graph it deserialized is the one the manifest describes.

Versioning follows torch.export's serde (`torch/_export/serde/schema.py`): MANIFEST_VERSION is bumped
when a field is removed or changes meaning; a new optional field bumps only MANIFEST_MINOR (written,
never required), and readers ignore keys they do not know. A reader refuses a manifest newer than
MANIFEST_VERSION, naming the version.

Minor versions of version 1: 0, the first; 1, each region's `lowering` record (what the backend made of
it, the same keys in every artifact kind). Older AOTI packages and ONNX files kept those facts in
`extra["kernels"]` / `extra["lowering"]`; `from_dict` reads them into the region records.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from qexport.errors import (
    ArtifactError, CorruptArtifactError, ManifestMismatchError, QExportError, UnsupportedVersionError,
)
from qexport.regions import Region, operand_state, region_nodes, storage_key, tensor_shape
from qexport.schemes import Scheme

from . import kinds

MANIFEST_VERSION = 1
MANIFEST_MINOR = 1
FORMAT_TAG = "qexport-manifest"
#: the key under the program's `graph_module.meta["custom"]` (which torch.export's serializer keeps)
#: holding what token-by-token generation needs (qexport.generation); copied into `extra["generation"]`
GENERATION_META = "qexport.generation"

Shape = tuple[int | str, ...]


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _shapes(value: Any, what: str) -> tuple[Shape, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in value):
        raise ValueError(f"{what} must be a list of shapes, got {value!r}")
    out = []
    for s in value:
        if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in s):
            raise ValueError(f"{what}: a dimension must be an int or a symbol name, got {s!r}")
        out.append(tuple(s))
    return tuple(out)


def _nonneg_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


def _this_version() -> str:
    import qexport

    return qexport.__version__


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string ("0.2.0rc1" -> (0, 2, 0)); () if it has none."""
    out = []
    for part in version.split("."):
        digits = part[: len(part) - len(part.lstrip("0123456789"))]
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


def _newer_than_this_qexport(version: Any) -> bool:
    return isinstance(version, str) and _release(version) > _release(_this_version())


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class LoweringRecord:
    """What a backend made of one region (`qexport.lower.RegionPlan.record()`, then what the backend
    observed): the same keys in every artifact's manifest and in `LoweringReport`."""

    #: where the region runs: the backend ("aoti-cpu", "onnx") or, for ExecuTorch, the delegate that took it
    backend: str
    #: the backend's accelerated path took it (a scheme kernel, a delegate, QDQ a runtime fuses)
    taken: bool
    kernel: str
    #: why it was not taken (or, when taken, why this kernel), in words a user can act on
    reason: str = ""
    #: JSON-safe facts the backend reports (a CPU row-bucket plan and its ISA, a tuned CUDA plan, an ONNX target)
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "taken": self.taken, "kernel": self.kernel, "reason": self.reason,
                "details": dict(self.details)}

    @classmethod
    def from_dict(cls, data: Any, what: str = "lowering record") -> "LoweringRecord":
        if not isinstance(data, Mapping):
            raise ValueError(f"{what} must be an object, got {type(data).__name__}")
        taken, details = data.get("taken"), data.get("details") or {}
        if not isinstance(taken, bool):
            raise ValueError(f"{what}: 'taken' must be true or false, got {taken!r}")
        if not isinstance(details, Mapping):
            raise ValueError(f"{what}: 'details' must be an object")
        return cls(
            backend=_str(data.get("backend"), f"{what}: backend"), taken=taken,
            kernel=_str(data.get("kernel"), f"{what}: kernel"), reason=_str(data.get("reason", ""), f"{what}: reason"),
            details=dict(details),
        )


@dataclass(frozen=True)
class RegionRecord:
    """One region as the manifest records it."""

    name: str
    scheme: Scheme
    module_path: str
    op: str
    #: bytes of the region's quantized tensors (weight, scales, zero points, codebook, static qparams;
    #: not the float bias, which is stored as it was)
    weight_bytes: int
    #: bytes of the float weight the region replaced (0 for a hand-written region)
    float_bytes: int
    input_shapes: tuple[Shape, ...]
    output_shapes: tuple[Shape, ...]
    op_params: Mapping[str, Any] = field(default_factory=dict, compare=False)
    weight_shape: tuple[int, ...] | None = None
    #: what the artifact's backend made of the region (None in a .pt2, which is not lowered)
    lowering: LoweringRecord | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scheme": self.scheme.to_dict(),
            "module_path": self.module_path,
            "op": self.op,
            "op_params": dict(self.op_params),
            "weight_shape": list(self.weight_shape) if self.weight_shape is not None else None,
            "weight_bytes": self.weight_bytes,
            "float_bytes": self.float_bytes,
            "input_shapes": [list(s) for s in self.input_shapes],
            "output_shapes": [list(s) for s in self.output_shapes],
            **({"lowering": self.lowering.to_dict()} if self.lowering is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RegionRecord":
        """Raises ValueError on a malformed record and the scheme's own errors on a bad scheme."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a region record must be an object, got {type(data).__name__}")
        for key in ("name", "scheme", "module_path", "op", "weight_bytes", "float_bytes", "input_shapes", "output_shapes"):
            if key not in data:
                raise ValueError(f"region record lacks {key!r}")
        name = _str(data["name"], "region name")
        op_params = data.get("op_params") or {}
        if not isinstance(op_params, Mapping):
            raise ValueError(f"region {name}: op_params must be an object")
        ws = data.get("weight_shape")
        if ws is not None and not (isinstance(ws, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in ws)):
            raise ValueError(f"region {name}: weight_shape must be a list of ints or null")
        return cls(
            name=name,
            scheme=Scheme.from_dict(data["scheme"]),
            module_path=_str(data["module_path"], f"region {name}: module_path"),
            op=_str(data["op"], f"region {name}: op"),
            weight_bytes=_nonneg_int(data["weight_bytes"], f"region {name}: weight_bytes"),
            float_bytes=_nonneg_int(data["float_bytes"], f"region {name}: float_bytes"),
            input_shapes=_shapes(data["input_shapes"], f"region {name}: input_shapes"),
            output_shapes=_shapes(data["output_shapes"], f"region {name}: output_shapes"),
            op_params=dict(op_params),
            weight_shape=tuple(ws) if ws is not None else None,
            lowering=LoweringRecord.from_dict(data["lowering"], f"region {name}: lowering") if data.get("lowering") is not None else None,
        )


@dataclass(frozen=True)
class Manifest:
    """What a qexport artifact holds: its regions, the versions that wrote it, and byte totals."""

    version: int
    artifact: str
    qexport_version: str
    torch_version: str
    regions: tuple[RegionRecord, ...]
    #: bytes of the quantized tensors the regions read, each tensor once (a module called twice, or
    #: tied layers sharing their tensors, is stored once)
    quantized_bytes: int
    #: the float weight bytes those regions replaced, each replaced weight once
    float_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)
    #: every other tensor of the program (float biases, unquantized parameters, buffers, constants)
    other_bytes: int = 0
    #: zip artifacts (.pt2, AOTI): SHA-256 (hex) of every other member, by name under the archive root; a
    #: .pte read back: its data file's (from the .pte's checksummed trailer, not the embedded JSON)
    members: Mapping[str, str] = field(default_factory=dict, compare=False)

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_program(cls, ep: torch.export.ExportedProgram, artifact: str = "pt2", **extra: Any) -> "Manifest":
        """The manifest of `ep`'s regions (read from the graph) and tensors (its state and constants)."""
        if not isinstance(ep, torch.export.ExportedProgram):
            raise ArtifactError(f"a manifest describes an ExportedProgram, got {type(ep).__name__}")
        if artifact not in kinds.names():
            raise ArtifactError(f"artifact={artifact!r} is not one of {kinds.names()}")
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"manifest extra fields must be JSON-serializable: {e}") from None
        import qexport

        from qexport.signature import dim_names, program_inputs

        # what a runtime holding only the compiled file needs to check a request (qexport.serve)
        extra.setdefault("inputs", [i.to_json() for i in program_inputs(ep)])
        if names := dim_names(ep):  # the user's names for torch's symbols, for tables (qexport inspect)
            extra.setdefault("dim_names", names)
        if (generation := ep.graph_module.meta.get("custom", {}).get(GENERATION_META)) is not None:
            extra.setdefault("generation", generation)
        tensors = _program_tensors(ep)
        records, weights, floats = [], {}, {}  # keyed by the bytes they stand for (storage_key)
        for node, region in region_nodes(ep):
            if region.scheme is None:
                raise ArtifactError(
                    f"region {region.name} uses scheme {region.scheme_name!r}, which is not registered here; "
                    f"register it (qexport.schemes.register) before saving"
                )
            fqns = [f for f in _region_tensor_fqns(ep, region, node) if not f.endswith(".bias")]
            # a module called twice is two regions reading one set of weights, and tied layers (GPT-2's
            # wte / lm_head, two Linears sharing a parameter) are two modules lifting one tensor under two
            # names, stored once in the file: the totals count those bytes once
            weights.update({storage_key(tensors[f]): tensors[f].nbytes for f in fqns})
            floats[tuple(sorted(storage_key(tensors[f]) for f in fqns)) or region.name] = _float_bytes(region)
            records.append(
                RegionRecord(
                    name=region.name,
                    scheme=region.scheme,
                    module_path=region.module_path,
                    op=region.op,
                    weight_bytes=sum(tensors[f].nbytes for f in fqns),
                    float_bytes=_float_bytes(region),
                    input_shapes=_activation_shapes(ep, node),
                    output_shapes=region.output_shapes,
                    op_params=dict(region.op_params),
                    weight_shape=region.weight_shape,
                )
            )
        quantized = sum(weights.values())
        return cls(
            version=MANIFEST_VERSION,
            artifact=artifact,
            qexport_version=qexport.__version__,
            torch_version=torch.__version__,
            regions=tuple(records),
            quantized_bytes=quantized,
            float_bytes=sum(floats.values()),
            extra=dict(extra),
            other_bytes=sum({storage_key(t): t.nbytes for t in tensors.values()}.values()) - quantized,
        )

    def with_lowering(self, records: "Sequence[LoweringRecord]") -> "Manifest":
        """This manifest with each region's lowering record (one per region, in the regions' order)."""
        if len(records) != len(self.regions):
            raise ArtifactError(f"{len(records)} lowering records for {len(self.regions)} regions")
        for region, record in zip(self.regions, records):
            try:
                json.dumps(record.to_dict(), allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ArtifactError(f"region {region.name}: its lowering record must be JSON-serializable ({e}); "
                                    f"a lowering's details hold plain JSON values") from None
        return dataclasses.replace(
            self, regions=tuple(dataclasses.replace(r, lowering=rec) for r, rec in zip(self.regions, records))
        )

    # -- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_TAG,
            "version": self.version,
            "minor_version": MANIFEST_MINOR,
            "artifact": self.artifact,
            "qexport_version": self.qexport_version,
            "torch_version": self.torch_version,
            "quantized_bytes": self.quantized_bytes,
            "float_bytes": self.float_bytes,
            "other_bytes": self.other_bytes,
            "regions": [r.to_dict() for r in self.regions],
            "extra": dict(self.extra),
            **({"members": dict(self.members)} if self.members else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> "Manifest":
        where = _where(source)
        if not isinstance(data, Mapping) or data.get("format") != FORMAT_TAG:
            raise CorruptArtifactError(f"{where}not a qexport manifest (no \"format\": \"{FORMAT_TAG}\")")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorruptArtifactError(f"{where}manifest version {version!r} is not a positive int")
        if version > MANIFEST_VERSION:
            raise UnsupportedVersionError(
                f"{where}manifest version {version} is newer than this qexport reads (up to "
                f"{MANIFEST_VERSION}); it was written by qexport {data.get('qexport_version', '?')}: upgrade qexport"
            )
        try:
            regions = data.get("regions")
            if not isinstance(regions, list):
                raise ValueError("'regions' must be a list")
            extra = data.get("extra", {})
            if not isinstance(extra, dict):
                raise ValueError("'extra' must be an object")
            artifact = _str(data.get("artifact"), "artifact")
            if artifact not in kinds.names():
                raise ValueError(f"artifact {artifact!r} is not one of {kinds.names()}")
            records = _with_legacy_lowering([RegionRecord.from_dict(r) for r in regions], extra)
            return cls(
                version=version,
                artifact=artifact,
                qexport_version=_str(data.get("qexport_version"), "qexport_version"),
                torch_version=_str(data.get("torch_version"), "torch_version"),
                regions=tuple(records),
                quantized_bytes=_nonneg_int(data.get("quantized_bytes"), "quantized_bytes"),
                float_bytes=_nonneg_int(data.get("float_bytes"), "float_bytes"),
                extra=extra,
                other_bytes=_nonneg_int(data.get("other_bytes", 0), "other_bytes"),
                members=_digests(data.get("members", {})),
            )
        except UnsupportedVersionError as e:  # a scheme of a newer schema version
            raise UnsupportedVersionError(f"{where}{e}") from None
        except (ValueError, TypeError, QExportError) as e:
            writer = data.get("qexport_version")
            if _newer_than_this_qexport(writer):
                # a newer qexport may add a scheme field (or a value of one) within the same versions:
                # this reader cannot know what it computes, but the fix is an upgrade, not a new file
                raise UnsupportedVersionError(
                    f"{where}the manifest holds what this qexport ({_this_version()}) cannot read ({e}); it was "
                    f"written by qexport {writer}: upgrade qexport"
                ) from None
            raise CorruptArtifactError(f"{where}malformed manifest: {e}") from None

    @classmethod
    def from_json(cls, text: "str | bytes", *, source: str | None = None) -> "Manifest":
        """Parse a manifest; `source` (the artifact's path) prefixes every error message."""
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, TypeError, RecursionError) as e:
            raise CorruptArtifactError(f"{_where(source)}the manifest is not valid JSON: {e}") from None
        return cls.from_dict(data, source=source)

    # -- checking ---------------------------------------------------------------------------
    def check_against(self, ep: torch.export.ExportedProgram, *, source: str | None = None) -> None:
        """Raise ManifestMismatchError unless `ep`'s regions are this manifest's (names and schemes, in order)."""
        where = _where(source)
        try:
            found = [(r.name, r.scheme) for _, r in region_nodes(ep)]
        except UnsupportedVersionError as e:
            raise UnsupportedVersionError(f"{where}{e}") from None
        except QExportError as e:
            raise ManifestMismatchError(f"{where}the graph's regions cannot be read: {e}") from None
        expected = [(r.name, r.scheme) for r in self.regions]
        if found == expected:
            return
        if len(found) != len(expected):
            problem = f"the manifest lists {len(expected)} regions, the graph has {len(found)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(expected, found)) if a != b)
            (en, es), (fn, fs) = expected[i], found[i]
            problem = (
                f"region {i} is {en!r} ({es.describe()}) in the manifest but {fn!r} "
                f"({fs.describe() if fs else 'unknown scheme'}) in the graph"
            )
        raise ManifestMismatchError(
            f"{where}the manifest does not describe the graph stored beside it: {problem}; the artifact "
            f"was modified after it was written: re-export and save it again"
        )

    def region(self, name: str) -> RegionRecord:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(f"no region named {name!r}; regions: {[r.name for r in self.regions]}")


def _with_legacy_lowering(records: list[RegionRecord], extra: Mapping[str, Any]) -> list[RegionRecord]:
    """Regions of a minor-0 manifest get their lowering record from where qexport kept it then: an AOTI
    package's `extra["kernels"]` (one flat dict per region, in order) or an ONNX file's
    `extra["lowering"]` ({region: {native, kernel, reason}}). Anything malformed there is left out."""
    if not records or any(r.lowering is not None for r in records):
        return records
    found: list[LoweringRecord | None] = [None] * len(records)
    kernels, onnx = extra.get("kernels"), extra.get("lowering")
    try:
        if isinstance(kernels, list) and len(kernels) == len(records):
            known = {"name", "scheme", "backend", "delegated", "kernel", "reason"}
            found = [LoweringRecord.from_dict({**k, "taken": k.get("delegated"),
                                               "details": {x: v for x, v in k.items() if x not in known}})
                     if isinstance(k, Mapping) and k.get("name") == r.name else None for k, r in zip(kernels, records)]
        elif isinstance(onnx, Mapping):
            found = [LoweringRecord.from_dict({**onnx[r.name], "backend": "onnx", "taken": onnx[r.name].get("native")})
                     if isinstance(onnx.get(r.name), Mapping) else None for r in records]
    except ValueError:
        return records
    return [dataclasses.replace(r, lowering=f) for r, f in zip(records, found)]


def _digests(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
        for k, v in value.items()
    ):
        raise ValueError("'members' must map member names to SHA-256 hex digests")
    return dict(value)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _program_tensors(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in ep.state_dict.items() if isinstance(v, torch.Tensor)}
    out.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return out


def _region_tensor_fqns(ep: torch.export.ExportedProgram, region: Region, node: torch.fx.Node) -> list[str]:
    """The program tensors a region consumes: `<module>.<role>` for quantized modules; for a
    hand-written region, whichever of its operands are lifted parameters, buffers or constants."""
    tensors = _program_tensors(ep)
    if region.module_path:
        fqns = [f"{region.module_path}.{role}" for role in region.roles if role != "input"]
        if all(f in tensors for f in fqns):
            return fqns
    return [state[0] for a in node.args[1:] if (state := operand_state(ep, a)) is not None and state[0] in tensors]


def _activation_shapes(ep: torch.export.ExportedProgram, node: torch.fx.Node) -> tuple[Shape, ...]:
    """Shapes of the region's operands that are not program state (its activations)."""
    vals = [a.meta.get("val") for a in node.args[1:] if isinstance(a, torch.fx.Node) and operand_state(ep, a) is None]
    return tuple(tensor_shape(v) for v in vals if isinstance(v, torch.Tensor))


def _float_bytes(region: Region) -> int:
    if region.weight_shape is None:
        return 0
    dtype = getattr(torch, str(region.op_params.get("out_dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    return math.prod(region.weight_shape) * dtype.itemsize

