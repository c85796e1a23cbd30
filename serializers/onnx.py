"""`inspect` reader for ONNX models written by `qexport.to_onnx`.

The manifest is the model's metadata_props entry `qexport.manifest`. A model written with
`keep_regions=True` also keeps each region as a local function of domain `qexport.region` whose own
metadata_props carry the scheme (`qexport.scheme`) and the region record (`qexport.region`);
`region_functions` reads those back. Nothing here builds or runs the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qexport.errors import CorruptArtifactError
from qexport.schemes import Scheme

from .inspect import check_readable, register_reader
from .manifest import Manifest

MANIFEST_KEY = "qexport.manifest"
REGION_DOMAIN = "qexport.region"
SCHEME_KEY = "qexport.scheme"
REGION_KEY = "qexport.region"


def _load(p: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise CorruptArtifactError(f"{p}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def read_manifest(path: "str | Path") -> Manifest:
    p = check_readable(path)
    model = _load(p)
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
