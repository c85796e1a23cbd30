"""`inspect` reader for ONNX models written by `qexport.to_onnx`.

The manifest is the model's metadata_props entry `qexport.manifest`. A model written with
`keep_regions=True` also keeps each region as a local function of domain `qexport.region` whose own
metadata_props carry the scheme (`qexport.scheme`) and the region record (`qexport.region`);
`region_functions` reads those back. Nothing here builds or runs the model.

ONNX files carry no checksum (in the fuzz run of docs/security.md, 43 % of damaged files loaded). `seal`
appends one as a protobuf field that no ONNX reader knows (so onnx and onnxruntime skip it): the
SHA-256 of the model bytes before it. `read_checked` verifies it; everything qexport opens goes
through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qexport.errors import ArtifactError, CorruptArtifactError
from qexport.schemes import Scheme

from ._archive import check_pin, seal_trailer, unseal_trailer
from .inspect import check_readable, register_reader
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


def read_checked(path: "str | Path", expected_sha256: str | None = None) -> bytes:
    """The model bytes of a sealed `.onnx` (without the checksum field), after checking it."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{p}: cannot be read: {e.strerror or e}") from None
    check_pin(p, data, expected_sha256)
    return unseal_trailer(p, data, _TRAILER_HEAD, "model", "qexport.to_onnx")


def _load(p: Path, data: bytes | None = None) -> Any:
    import onnx

    data = read_checked(p) if data is None else data
    try:
        return onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise CorruptArtifactError(f"{p}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def read_manifest(path: "str | Path", data: bytes | None = None) -> Manifest:
    """The manifest of the `.onnx` at `path`; `data`: its bytes from `read_checked`, when already read."""
    p = check_readable(path)
    model = _load(p, data)
    props = {e.key: e.value for e in model.metadata_props}
    if MANIFEST_KEY not in props:
        raise CorruptArtifactError(
            f"{p}: an ONNX model without a qexport manifest (metadata_props[{MANIFEST_KEY!r}]); it was not "
            f"written by qexport.to_onnx"
        )
    return Manifest.from_json(props[MANIFEST_KEY], source=str(p))


def region_functions(path: "str | Path") -> dict[str, tuple[Scheme, dict[str, Any]]]:
    """function name -> (scheme, region record) of every region kept as an ONNX local function
    (empty for a model written with keep_regions=False)."""
    p = check_readable(path)
    out: dict[str, tuple[Scheme, dict[str, Any]]] = {}
    for fn in _load(p).functions:
        if fn.domain != REGION_DOMAIN:
            continue
        props = {e.key: e.value for e in fn.metadata_props}
        try:
            out[fn.name] = (Scheme.from_dict(json.loads(props[SCHEME_KEY])), json.loads(props[REGION_KEY]))
        except (KeyError, ValueError, TypeError) as e:
            raise CorruptArtifactError(f"{p}: region function {fn.name} has no readable scheme metadata ({e})") from None
    return out


def _sniff(p: Path, head: bytes) -> bool:
    # A serialized ModelProto starts with field 1 (ir_version, varint): tag byte 0x08.
    return p.suffix == ".onnx" and head[:1] == b"\x08"


register_reader("onnx", _sniff, read_manifest)
