"""`inspect(path) -> Manifest`: read any qexport artifact's manifest without building the model.

Each artifact kind registers a reader (`register_reader`): a cheap `sniff(path, head)` that says
whether the file is its kind, and `read(path)` that returns the manifest. Reader modules are imported
on the first call, so a backend's heavy imports happen only when its files are inspected, and a
backend whose module is not written yet is skipped.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Callable

from qexport.errors import ArtifactError, ArtifactNotFoundError, CorruptArtifactError, QExportError

from .manifest import Manifest

#: bytes of the file's beginning handed to every sniff
HEAD_BYTES = 4096
READER_MODULES = ("serializers.pt2", "serializers.aoti", "serializers.pte", "serializers.onnx")

Sniff = Callable[[Path, bytes], bool]
Read = Callable[[Path], Manifest]


@dataclass(frozen=True)
class _Reader:
    kind: str
    sniff: Sniff
    read: Read


_READERS: dict[str, _Reader] = {}
_imported = False


def register_reader(kind: str, sniff: Sniff, read: Read) -> None:
    """Make `inspect` read artifacts of `kind`; registering a kind again replaces its reader.

    `sniff(path, head)` gets the first HEAD_BYTES bytes and must not raise; `read(path)` returns the
    artifact's Manifest or raises a QExportError naming the path.
    """
    if not isinstance(kind, str) or not kind:
        raise ArtifactError(f"a reader's kind is a non-empty string, got {kind!r}")
    if not callable(sniff) or not callable(read):
        raise ArtifactError(f"reader {kind!r}: sniff and read must be callables")
    _READERS[kind] = _Reader(kind, sniff, read)


def _import_readers() -> None:
    global _imported
    if _imported:
        return
    for name in READER_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the reader exists but one of its own imports is missing
                raise
    _imported = True


def reader_kinds() -> list[str]:
    _import_readers()
    return list(_READERS)


def check_readable(path: "str | PathLike[str]") -> Path:
    """The path as a Path, or ArtifactNotFoundError / ArtifactError if it is not a readable file."""
    p = Path(path)
    if not p.exists():
        raise ArtifactNotFoundError(f"{p}: no such file")
    if not p.is_file():
        raise ArtifactError(f"{p}: not a file")
    from ._atomic import sweep_stale

    sweep_stale(p.parent if str(p.parent) else ".")
    return p


def inspect(path: "str | PathLike[str]") -> Manifest:
    """The manifest of the qexport artifact at `path` (.pt2, AOTI package, .pte, .onnx)."""
    p = check_readable(path)
    _import_readers()
    try:
        with open(p, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as e:
        raise ArtifactError(f"{p}: cannot be read: {e.strerror or e}") from None
    for reader in list(_READERS.values()):
        try:
            mine = bool(reader.sniff(p, head))
        except Exception:  # a sniff that cannot tell is a no
            mine = False
        if not mine:
            continue
        try:
            return reader.read(p)
        except QExportError:
            raise
        except Exception as e:  # a reader must not let its parser's errors escape as anything else
            raise CorruptArtifactError(f"{p}: not a readable {reader.kind} artifact: {type(e).__name__}: {e}") from None
    raise CorruptArtifactError(
        f"{p}: not a qexport artifact this installation can read (it reads: {', '.join(_READERS) or 'nothing'})"
    )
