"""`inspect` reader for ExecuTorch `.pte` files written by `qexport.to_executorch`.

The manifest travels inside the program as a constant method (`qexport_manifest`, the JSON as a uint8
tensor), so it is read through ExecuTorch's own runtime: loading that one method does not initialize
`forward` or its delegates.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from qexport._extras import missing_extra
from qexport.errors import BackendUnavailableError, CorruptArtifactError

from .inspect import check_readable, register_reader
from .manifest import Manifest

#: the method `qexport.lower.executorch` stores the manifest in (kept in step with MANIFEST_METHOD there)
MANIFEST_METHOD = "qexport_manifest"
#: a .pte is a flatbuffer whose file identifier (bytes 4..8) is "ET" + a two-digit schema version
_IDENT_PREFIX = b"ET"


def _sniff(p: Path, head: bytes) -> bool:
    ident = head[4:8]
    return len(ident) == 4 and ident.startswith(_IDENT_PREFIX) and ident[2:].isdigit()


def read_manifest(path: "str | PathLike[str]") -> Manifest:
    """The qexport manifest embedded in a `.pte`."""
    p = check_readable(path)
    try:
        from executorch.runtime import Runtime
    except ImportError as e:
        raise missing_extra(e, f"{p}: reading a .pte") or BackendUnavailableError(f"{p}: reading a .pte needs the executorch package ({e})") from None
    try:
        program = Runtime.get().load_program(p)
    except Exception as e:  # the runtime's loader reports damage as RuntimeError/ValueError with a code
        raise CorruptArtifactError(f"{p}: ExecuTorch cannot load this program ({type(e).__name__}: {e})") from None
    if MANIFEST_METHOD not in program.method_names:
        raise CorruptArtifactError(
            f"{p}: an ExecuTorch program without a qexport manifest (no {MANIFEST_METHOD!r} method; methods: "
            f"{sorted(program.method_names)}); only .pte files written by qexport.to_executorch can be inspected"
        )
    try:
        (data,) = program.load_method(MANIFEST_METHOD).execute([])
    except Exception as e:
        raise CorruptArtifactError(f"{p}: the {MANIFEST_METHOD!r} method cannot be run ({type(e).__name__}: {e})") from None
    return Manifest.from_json(data.numpy().tobytes(), source=str(p))


register_reader("pte", _sniff, read_manifest)
