"""The artifact kinds qexport writes and reads: the one table that names them.

Each `ArtifactKind` says what a file of that kind is called (suffix, default file name), how it is
told from its bytes (`sniff`), where its manifest is read and written (its serializer module,
`serializers/<kind>.py`), which public stages write and load it, and which runner runs it.
`qexport.inspect`, `qexport.runners`, the stages of `qexport/__init__.py`, the CLI and the demo all
read this table; adding a kind is one entry here plus its serializer module (and its backend).

A serializer module provides `sniff(path, head) -> bool` (cheap, never raises) and
`read_manifest(path) -> Manifest`; writing is the module's own `write`/`seal` functions, called by
the kind's writer stage. Everything is named by import path and imported on first use: this module
imports nothing heavy, and a kind's runtime (executorch, onnxruntime) loads only when a file of
that kind is opened. The runners live above the serializers (`qexport.runtime`), so the table names
them rather than importing them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable

from qexport.errors import ArtifactError, CorruptArtifactError, QExportError
from qexport.extras import missing_extra

#: bytes of the file's beginning handed to every sniff
HEAD_BYTES = 4096


@dataclass(frozen=True)
class ArtifactKind:
    #: the name manifests record (`Manifest.artifact`) and runners report (`Runner.kind`)
    name: str
    #: what a file of this kind must end with
    suffix: str
    #: in words, for messages ("an AOTInductor package")
    what: str
    #: the module with `sniff` and `read_manifest` (and the kind's writer helpers)
    serializer: str
    #: "module:function" of the public stage that writes the kind (qexport.<function>)
    writer: str = ""
    #: "module:function" of the public stage that loads it, where qexport has one (qexport.<function>)
    loader: str = ""
    #: "module:function(path, expected_sha256) -> qexport.runners.Runner"
    runner: str = ""
    #: what the writer's module is, for "not available in this installation" messages
    backend: str = ""
    #: the default file name's tag before the suffix: "model_aoti.pt2" beside "model.pt2"
    tag: str = ""
    #: the pip extra its writer and runner need (qexport/extras.py), "" for core qexport
    extra: str = ""
    #: for kinds registered with `register_reader`: an object with sniff/read_manifest
    impl: Any = field(default=None, compare=False, repr=False)

    def module(self) -> Any:
        return self.impl if self.impl is not None else importlib.import_module(self.serializer)

    def sniff(self, path: Path, head: bytes) -> bool:
        try:
            return bool(self.module().sniff(path, head))
        except Exception:  # a sniff that cannot tell is a no
            return False

    def read_manifest(self, path: Path) -> Any:
        try:
            manifest = self.module().read_manifest(path)
        except QExportError:
            raise
        except Exception as e:  # a reader must not let its parser's errors escape as anything else
            raise (missing_extra(e, f"{path}: reading {self.what}")
                   or CorruptArtifactError(f"{path}: not a readable {self.name} artifact: {type(e).__name__}: {e}")) from None
        if self.name in BUILTIN:  # a registered reader names its own kinds
            check_artifact(path, manifest, self.name)
        return manifest

    def file_name(self, stem: str = "model") -> str:
        return f"{stem}{self.tag}{self.suffix}"

    def stages(self) -> dict[str, tuple[str, str]]:
        """Public stage name -> (module, what it is): this kind's writer and loader."""
        return {ref.split(":")[1]: (ref.split(":")[0], self.backend) for ref in (self.writer, self.loader) if ref}

    def open_runner(self, path: Path, expected_sha256: str | None = None) -> Any:
        if not self.runner:
            raise ArtifactError(f"{path}: qexport reads {self.name} artifacts but has no runtime for them")
        return _resolve(self.runner)(path, expected_sha256)


def _resolve(ref: str) -> Callable[..., Any]:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


_RUNTIME = "qexport.runtime.loaders"

#: the kinds, in sniffing order (the .pt2 program claims every zip that is not an AOTI package, so
#: the user hears what is wrong with a damaged one)
_KINDS: dict[str, ArtifactKind] = {k.name: k for k in (
    ArtifactKind("pt2", ".pt2", "a qexport program (.pt2)", "serializers.pt2", writer="serializers.pt2:save",
                 loader="serializers.pt2:load", runner=f"{_RUNTIME}:load_pt2", backend=".pt2 serializer"),
    ArtifactKind("aoti", ".pt2", "an AOTInductor package", "serializers.aoti", writer="qexport.lower.aoti:compile",
                 loader="qexport.lower.aoti:load_compiled", runner=f"{_RUNTIME}:load_aoti", backend="AOTInductor backend",
                 tag="_aoti"),
    ArtifactKind("pte", ".pte", "an ExecuTorch program (.pte)", "serializers.pte",
                 writer="qexport.lower.executorch:to_executorch", runner=f"{_RUNTIME}:load_pte", backend="ExecuTorch backend",
                 extra="executorch"),
    ArtifactKind("onnx", ".onnx", "an ONNX model (.onnx)", "serializers.onnx", writer="qexport.lower.onnx:to_onnx",
                 runner=f"{_RUNTIME}:load_onnx", backend="ONNX backend", extra="onnx"),
)}
#: the kinds qexport itself writes (register_reader adds read-only ones after them)
BUILTIN = tuple(_KINDS)


def kinds() -> tuple[ArtifactKind, ...]:
    return tuple(_KINDS.values())


def names() -> tuple[str, ...]:
    return tuple(_KINDS)


def get(name: str) -> ArtifactKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ArtifactError(f"no artifact kind {name!r}; qexport knows {', '.join(_KINDS)}") from None


def lowered() -> tuple[ArtifactKind, ...]:
    """The kinds a backend lowers a `.pt2` program into (every kind but the program itself)."""
    return tuple(k for k in _KINDS.values() if k.name != "pt2" and k.writer)


def stages() -> dict[str, tuple[str, str]]:
    """Every public stage a kind provides (save, load, compile, to_onnx, ...) -> (module, what)."""
    out: dict[str, tuple[str, str]] = {}
    for k in _KINDS.values():
        out.update(k.stages())
    return out


def register(kind: ArtifactKind) -> ArtifactKind:
    """Add (or replace) a kind; it is sniffed after the ones already registered."""
    if not isinstance(kind.name, str) or not kind.name:
        raise ArtifactError(f"an artifact kind's name is a non-empty string, got {kind.name!r}")
    if kind.name in BUILTIN and _KINDS.get(kind.name) != kind:
        raise ArtifactError(f"{kind.name!r} is a built-in artifact kind and cannot be replaced")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    if name in BUILTIN:
        raise ArtifactError(f"{name!r} is a built-in artifact kind and cannot be removed")
    _KINDS.pop(name, None)


def sniff(path: "str | PathLike[str]") -> ArtifactKind:
    """The kind of the file at `path`, told from its content (AOTI packages and programs are both
    `.pt2` zips); CorruptArtifactError naming the kinds qexport reads if none claims it."""
    p = Path(path)
    kind = _by_content(p)
    if kind is None:
        raise CorruptArtifactError(
            f"{p}: not a qexport artifact this installation can read (it reads: {', '.join(_KINDS)})"
        )
    check_name(p, kind)
    return kind


def _by_content(p: Path) -> ArtifactKind | None:
    try:
        with open(p, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as e:
        raise ArtifactError(f"{p}: cannot be read: {e.strerror or e}") from None
    return next((kind for kind in list(_KINDS.values()) if kind.sniff(p, head)), None)


def check_name(path: Path, kind: ArtifactKind) -> None:
    """Refuse a file whose name gives another kind's suffix than its content's: people decide what to open
    from a name, and an AOTInductor package (native code) renamed model.pte had its library loaded by
    `qexport verify`, where the docs say a .pte cannot run code. A name without a kind's suffix is not a claim."""
    claimed = next((k for k in _KINDS.values() if k.suffix and k.suffix == path.suffix), None)
    if claimed is not None and claimed.suffix != kind.suffix:
        raise ArtifactError(
            f"{path}: {kind.what}, though its name says {claimed.what}; qexport opens a file only as what its name "
            f"says: rename it to end in {kind.suffix} if you trust it as {kind.what}"
        )


def check_artifact(p: Path, manifest: Any, kind: str) -> Any:
    """Refuse a manifest that describes another kind than the file is: readers act on `artifact` (a
    `.pt2` whose manifest said "pte" sent `qexport inspect` looking for a data file beside it)."""
    if manifest.artifact != kind:
        raise CorruptArtifactError(
            f"{p}: its manifest describes a {manifest.artifact} artifact, but the file is {kind}; not a file qexport "
            f"wrote: export it again"
        )
    return manifest


def check_kind(path: "str | PathLike[str]", expected: str, stage: str) -> None:
    """ArtifactError naming what the file is and what opens it, when `stage` (e.g. "qexport.load"),
    which reads `expected` files, is given another kind qexport knows; a file no kind claims goes on
    to the stage's own checks, which say what is damaged."""
    try:
        kind = _by_content(Path(path))
    except ArtifactError:
        return
    if kind is None or kind.name == expected:
        return
    check_name(Path(path), kind)  # a renamed file: say that first, the way any other opener would
    try:
        kind.read_manifest(Path(path))
    except QExportError:  # a damaged file (the .pt2 kind claims every damaged zip, a damaged AOTI package too)
        return
    if kind.loader:
        how = f"qexport.{kind.loader.split(':')[1]}({str(path)!r})"
    else:
        how = f"qexport.runners.load({str(path)!r}) to run it, qexport.inspect({str(path)!r}) to read its regions"
    raise ArtifactError(f"{path}: {kind.what}, not {get(expected).what}, which {stage} reads; use {how}")


__all__ = ["ArtifactKind", "BUILTIN", "HEAD_BYTES", "check_artifact", "check_kind", "check_name", "get", "kinds", "lowered",
           "names", "register", "sniff", "stages", "unregister"]
