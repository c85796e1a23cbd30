"""`inspect(path) -> Manifest`: read any qexport artifact's manifest without building the model.

The file's kind is sniffed from its bytes through the kind table (`serializers.kinds`), whose entry
names the serializer that reads the manifest; a serializer's heavy imports happen only when a file of
its kind is inspected. `register_reader` adds a read-only kind (one qexport does not write).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from qexport.errors import ArtifactError

from . import kinds
from .files import check_readable
from .kinds import HEAD_BYTES
from .manifest import Manifest

Sniff = Callable[[Path, bytes], bool]
Read = Callable[[Path], Manifest]


def register_reader(kind: str, sniff: Sniff, read: Read) -> None:
    """Make `inspect` read artifacts of `kind`; registering a kind again replaces its reader.

    `sniff(path, head)` gets the first HEAD_BYTES bytes and must not raise; `read(path)` returns the
    artifact's Manifest or raises a QExportError naming the path.
    """
    if not isinstance(kind, str) or not kind:
        raise ArtifactError(f"a reader's kind is a non-empty string, got {kind!r}")
    if not callable(sniff) or not callable(read):
        raise ArtifactError(f"reader {kind!r}: sniff and read must be callables")
    kinds.register(kinds.ArtifactKind(kind, "", f"a {kind} artifact", "", impl=SimpleNamespace(sniff=sniff, read_manifest=read)))


def reader_kinds() -> list[str]:
    return list(kinds.names())


def inspect(path: "str | PathLike[str]") -> Manifest:
    """The manifest of the qexport artifact at `path` (.pt2, AOTI package, .pte, .onnx)."""
    p = check_readable(path)
    return kinds.sniff(p).read_manifest(p)


__all__ = ["HEAD_BYTES", "check_readable", "inspect", "reader_kinds", "register_reader"]
