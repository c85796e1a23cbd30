"""ExecuTorch `.pte` files written by `qexport.to_executorch`: the writer (`manifest_methods`,
`write`), the `inspect` reader and `open_program`, the one way qexport hands a `.pte` to the runtime.

The manifest travels inside the program as a constant method (`qexport_manifest`, the JSON as a uint8
tensor), so it is read through ExecuTorch's own runtime: loading that one method does not initialize
`forward` or its delegates.

The runtime verifies the flatbuffer (Verification.InternalConsistency, its default) but still aborts
the process on some damaged programs (an ET_CHECK while initializing a method; seen as SIGABRT), and a
Python caller cannot catch that, nor a crash in the first execution of a method whose operator
arguments are damaged. So the first load of a file's bytes happens in a forked child that loads the
program and every method and runs `forward` once on zeros; only bytes that survived it (the same bytes, never re-read from
disk) reach the runtime in this process. A fork costs tens of ms here; a fresh interpreter would
cost seconds of imports.

ExecuTorch files carry no checksum, and a third of damaged files load and run with other outputs.
`seal` appends one: TRAILER_MAGIC and the SHA-256 of everything before it, past the end of the
program and its segments, where the runtime does not look; `open_program` checks it and hands the
runtime the bytes before it.

A program whose delegate and program constants share a weight (a tied embedding + LM head) keeps that
weight in a data file (`.ptd`, ExecuTorch's external NamedDataMap) beside the `.pte`, the only place
ExecuTorch 1.5.1 lets both read one copy. The `.pte` then names it in a `DataFile` record between the
program and the checksum trailer (so the program's checksum covers the data file's name, size and
SHA-256): the data file cannot be swapped, cut or grown without the `.pte` refusing it. Its SHA-256
lives there rather than in the manifest because the manifest is emitted inside the program before
ExecuTorch serializes the data file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from qexport.extras import missing_extra
from qexport.quiet import native_stderr
from qexport.errors import (
    ArtifactError, ArtifactNotFoundError, BackendUnavailableError, CorruptArtifactError, UnsafeArtifactError,
)

from ._archive import read_sealed, seal_trailer
from .files import check_readable, file_sha256
from .manifest import Manifest

#: the constant method that holds the manifest
MANIFEST_METHOD = "qexport_manifest"
#: a .pte is a flatbuffer whose file identifier (bytes 4..8) is "ET" + a two-digit schema version
_IDENT_PREFIX = b"ET"
#: a child that has not finished loading after this long is taken for a hang
PROBE_TIMEOUT_S = 120.0
#: the checksum trailer: these bytes, then the SHA-256 (raw, 32 bytes) of the program before them
TRAILER_MAGIC = b"\0qexport-sha256:"
#: the data file record: these bytes, its JSON, then the JSON's length (4 bytes, little endian)
DATA_MAGIC = b"\0qexport-data:"
#: a longer record is not one qexport wrote
_MAX_RECORD = 1024
#: the data file's suffix (ExecuTorch's name for a serialized NamedDataMap)
DATA_SUFFIX = ".ptd"
#: SHA-256 of the bytes a child loaded cleanly in this process
_PROBED: set[str] = set()


@dataclass(frozen=True)
class DataFile:
    """The data file (`.ptd`) a `.pte` reads shared weights from: its name beside the `.pte`, size and SHA-256 (hex)."""

    name: str
    size: int
    sha256: str

    def record(self) -> bytes:
        text = json.dumps({"name": self.name, "bytes": self.size, "sha256": self.sha256}, separators=(",", ":")).encode()
        return DATA_MAGIC + text + len(text).to_bytes(4, "little")

    @classmethod
    def split(cls, p: Path, body: bytes) -> "tuple[bytes, DataFile | None]":
        """The program bytes of an unsealed `.pte` and its data file record, if it has one."""
        n = int.from_bytes(body[-4:], "little") if len(body) >= 4 else 0
        start = len(body) - 4 - n - len(DATA_MAGIC)
        if n > _MAX_RECORD or start < 0 or body[start:start + len(DATA_MAGIC)] != DATA_MAGIC:
            return body, None
        try:
            d = json.loads(body[start + len(DATA_MAGIC):-4])
            name, size, digest = d["name"], d["bytes"], d["sha256"]
            if not (isinstance(name, str) and isinstance(size, int) and not isinstance(size, bool) and size >= 0
                    and isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise ValueError(d)
        except (ValueError, TypeError, KeyError, RecursionError):
            raise CorruptArtifactError(f"{p}: its data file record is malformed; re-export it with qexport.to_executorch") from None
        return body[:start], cls(_plain_name(p, name), size, digest)

    def path_beside(self, p: Path) -> Path:
        return p.parent / self.name


def _plain_name(p: Path, name: str) -> str:
    """`name` if it is a plain file name ending with .ptd (so it can only mean a file beside the .pte)."""
    plain = (name.endswith(DATA_SUFFIX) and len(name) <= 255 and name not in ("", ".", "..")
             and not any(c in "/\\:" or not c.isprintable() for c in name))
    if not plain:
        raise UnsafeArtifactError(
            f"{p}: its data file is named {name!r}, which is not a plain '*{DATA_SUFFIX}' file name beside the .pte "
            f"(a path, a drive or a control character); qexport opens data files only beside their .pte"
        )
    return name


def sniff(p: Path, head: bytes) -> bool:
    ident = head[4:8]
    return len(ident) == 4 and ident.startswith(_IDENT_PREFIX) and ident[2:].isdigit()


def seal(path: Path) -> None:
    """Append the checksum trailer to the `.pte` just written at `path`."""
    seal_trailer(path, TRAILER_MAGIC)


def manifest_methods(manifest: Manifest) -> dict[str, Any]:
    """The constant methods that carry `manifest` in the program (pass them to ExecuTorch's
    `to_edge*(constant_methods=...)`): the manifest's JSON as a uint8 tensor."""
    import torch

    return {MANIFEST_METHOD: torch.frombuffer(bytearray(manifest.to_json().encode()), dtype=torch.uint8)}


def replace_manifest(edge: Any, manifest: Manifest) -> None:
    """Swap the manifest method of an `EdgeProgramManager` made with `manifest_methods` for `manifest`
    (one completed after partitioning), before `to_executorch` serializes it."""
    if MANIFEST_METHOD not in edge._config_methods:
        raise ArtifactError(f"the edge program has no {MANIFEST_METHOD!r} method to replace; build it with manifest_methods()")
    # to_executorch emits the constant methods from the manager's own dict, which has no public setter.
    edge._config_methods.update(manifest_methods(manifest))


def write(program: Any, path: Path) -> DataFile | None:
    """Write an `ExecutorchProgramManager` (whose constant methods came from `manifest_methods`) to
    `path`, sealed with the checksum trailer, and its data file, if ExecuTorch serialized one, beside
    it as `<stem>.ptd`, named in the `.pte`; returns that record (None: the `.pte` holds everything)."""
    with open(path, "wb") as f:
        program.write_to_file(f)
    rec = None
    with tempfile.TemporaryDirectory(dir=path.parent) as d:
        program.write_tensor_data_to_file(d)  # one file per ExecuTorch tag, named by the tag
        files = sorted(Path(d).iterdir())
        if len(files) > 1:
            raise ArtifactError(f"{path}: ExecuTorch serialized {len(files)} data files ({', '.join(f.name for f in files)}); qexport writes one")
        if files:
            where = path.with_suffix(DATA_SUFFIX)
            os.replace(files[0], where)
            rec = DataFile(where.name, where.stat().st_size, file_sha256(where))
            with open(path, "ab") as f:
                f.write(rec.record())
    seal(path)
    return rec


#: ExecuTorch ScalarType codes -> torch dtypes (the runtime's method metadata reports codes)
ET_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64",
             11: "bool", 15: "bfloat16"}


class _VerifiedData:
    """A private copy of a data file's checked bytes, for the runtime, which reads a data file only by
    path: the copy (an anonymous memory file where the OS has them, else a private temporary file) is
    what was hashed, so a file swapped on disk after the check never reaches the runtime. It lives as
    long as the program that reads it."""

    def __init__(self, p: Path, rec: DataFile) -> None:
        self.sha256 = rec.sha256
        where = rec.path_beside(p)
        if not where.exists():
            raise ArtifactNotFoundError(
                f"{p}: its shared weights are in {rec.name}, which is not beside it ({where}: no such file); "
                f"keep the .pte and its {DATA_SUFFIX} together, under the names qexport.to_executorch wrote"
            )
        if not where.is_file():
            raise ArtifactError(f"{p}: its data file {where} is not a file")
        size = where.stat().st_size
        if size != rec.size:  # checked before reading: a huge file is refused unread
            raise CorruptArtifactError(
                f"{p}: its data file {where} is {size} bytes, but the program was written with a {rec.size}-byte "
                f"{rec.name}: it is another file or was damaged; re-export both with qexport.to_executorch"
            )
        if hasattr(os, "memfd_create"):
            self._file = os.fdopen(os.memfd_create("qexport-ptd"), "w+b")
            self.path = f"/proc/self/fd/{self._file.fileno()}"
        else:
            self._file = tempfile.NamedTemporaryFile(suffix=DATA_SUFFIX)
            self.path = self._file.name
        digest = hashlib.sha256()
        try:
            with open(where, "rb") as f:  # one byte past the recorded size at most: a file growing now is refused too
                while chunk := f.read(min(1 << 22, rec.size + 1 - self._file.tell())):
                    digest.update(chunk)
                    self._file.write(chunk)
            self._file.flush()
        except OSError as e:
            self._file.close()
            raise ArtifactError(f"{p}: its data file {where} cannot be read: {e.strerror or e}") from None
        if digest.hexdigest() != rec.sha256 or self._file.tell() != rec.size:
            self._file.close()
            raise CorruptArtifactError(
                f"{p}: its data file {where} does not match the SHA-256 the program was written with: it was "
                f"damaged or replaced after it was written; re-export both with qexport.to_executorch"
            )


def _load_all(runtime: Any, data: bytes, data_path: str | None = None) -> None:
    """Load the program and every method, and run `forward` once on zeros of its input shapes:
    damaged operator arguments that pass the verifier crash the first execution, not the load."""
    import torch

    program = runtime.load_program(data, data_path=data_path)
    for name in program.method_names:
        method = program.load_method(name)
        if name != "forward":
            continue
        meta = method.metadata
        inputs = []
        for i in range(meta.num_inputs()):
            t = meta.input_tensor_meta(i)
            inputs.append(torch.zeros(tuple(t.sizes()), dtype=getattr(torch, ET_DTYPES.get(int(t.dtype()), "float32"))))
        method.execute(inputs)


def _probe(p: Path, runtime: Any, data: bytes, extra: "_VerifiedData | None" = None) -> None:
    """Load `data` (see _load_all) in a child process; raise if the child dies."""
    # the program's bytes and its data file's: a program probed with one data file is not probed with every other
    digest = hashlib.sha256(data).hexdigest() + (extra.sha256 if extra is not None else "")
    if digest in _PROBED:
        return
    if not hasattr(os, "fork"):  # no fork here: the first load stays in-process
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's code
        import faulthandler

        faulthandler.disable()  # its death is reported by the parent, not as a dump of the parent's stack
        import torch

        # The parent's OpenMP worker threads do not exist in a forked child; an ATen op large enough to
        # go parallel there waits for them forever (any .pte past toy size, after the parent ran torch).
        torch.set_num_threads(1)
        code = 1
        try:
            _load_all(runtime, data, extra.path if extra is not None else None)
            code = 0
        except BaseException:
            pass
        os._exit(code)
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise CorruptArtifactError(f"{p}: ExecuTorch did not finish loading this program in {PROBE_TIMEOUT_S:.0f} s")
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise CorruptArtifactError(f"{p}: a damaged ExecuTorch program: the runtime died ({name}) loading it, or running forward once on zeros, in a child process")
    _PROBED.add(digest)  # exit 1 (a Python exception) is reported by the in-process load that follows


def open_program(path: "str | PathLike[str]", *, expected_sha256: str | None = None) -> Any:
    """The `executorch.runtime.Program` of a `.pte`, from bytes a child process loaded first (see
    the module's docstring), with its data file where it has one. `expected_sha256` (hex) pins the
    file's digest (and so its data file's, which the `.pte` records)."""
    p = check_readable(path)
    try:
        from executorch.runtime import Runtime
    except ImportError as e:
        raise missing_extra(e, f"{p}: reading a .pte") or BackendUnavailableError(f"{p}: reading a .pte needs the executorch package ({e})") from None
    try:  # the portable quantized kernels, for regions no delegate took: without them the probe child's
        # `forward` of a portable-target .pte fails to load and the runtime logs each missing operator
        import executorch.kernels.quantized  # noqa: F401
    except Exception:
        pass
    data, rec = DataFile.split(p, read_sealed(p, TRAILER_MAGIC, "program", "qexport.to_executorch", expected_sha256))
    extra = _VerifiedData(p, rec) if rec is not None else None
    runtime = Runtime.get()
    with native_stderr():  # XNNPACK's cpuinfo lines, printed by the probe child as it loads `forward`
        _probe(p, runtime, data, extra)
    try:
        program = runtime.load_program(data, data_path=extra.path if extra is not None else None)
    except Exception as e:  # the runtime's loader reports damage as RuntimeError/ValueError with a code
        raise CorruptArtifactError(f"{p}: ExecuTorch cannot load this program ({type(e).__name__}: {e})") from None
    program.qexport_data_file = rec  # what the program reads beside it (None: nothing)
    program._qexport_data = extra  # the runtime reads the copy by path for as long as the program lives
    return program


def read_manifest(path: "str | PathLike[str]") -> Manifest:
    """The qexport manifest embedded in a `.pte`."""
    p = check_readable(path)
    return program_manifest(open_program(p), p)


def program_manifest(program: Any, p: Path) -> Manifest:
    """The qexport manifest of `program` (from `open_program(p)`), read from its constant method."""
    if MANIFEST_METHOD not in program.method_names:
        raise CorruptArtifactError(
            f"{p}: an ExecuTorch program without a qexport manifest (no {MANIFEST_METHOD!r} method; methods: "
            f"{sorted(program.method_names)}); only .pte files written by qexport.to_executorch can be inspected"
        )
    try:
        (data,) = program.load_method(MANIFEST_METHOD).execute([])
    except Exception as e:
        raise CorruptArtifactError(f"{p}: the {MANIFEST_METHOD!r} method cannot be run ({type(e).__name__}: {e})") from None
    manifest = Manifest.from_json(data.numpy().tobytes(), source=str(p))
    rec = program.qexport_data_file
    return dataclasses.replace(manifest, members={rec.name: rec.sha256}) if rec is not None else manifest
