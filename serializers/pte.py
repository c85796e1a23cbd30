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
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from os import PathLike
from pathlib import Path
from typing import Any

from qexport.extras import missing_extra
from qexport.errors import ArtifactError, BackendUnavailableError, CorruptArtifactError

from ._archive import check_pin, seal_trailer, unseal_trailer
from .files import check_readable
from .manifest import Manifest

#: the constant method that holds the manifest
MANIFEST_METHOD = "qexport_manifest"
#: a .pte is a flatbuffer whose file identifier (bytes 4..8) is "ET" + a two-digit schema version
_IDENT_PREFIX = b"ET"
#: a child that has not finished loading after this long is taken for a hang
PROBE_TIMEOUT_S = 120.0
#: the checksum trailer: these bytes, then the SHA-256 (raw, 32 bytes) of the program before them
TRAILER_MAGIC = b"\0qexport-sha256:"
#: SHA-256 of the bytes a child loaded cleanly in this process
_PROBED: set[str] = set()


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


def write(program: Any, path: Path) -> None:
    """Write an `ExecutorchProgramManager` (whose constant methods came from `manifest_methods`) to
    `path`, sealed with the checksum trailer."""
    with open(path, "wb") as f:
        program.write_to_file(f)
    seal(path)


#: ExecuTorch ScalarType codes -> torch dtypes (the runtime's method metadata reports codes)
ET_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64",
             11: "bool", 15: "bfloat16"}


def _load_all(runtime: Any, data: bytes) -> None:
    """Load the program and every method, and run `forward` once on zeros of its input shapes:
    damaged operator arguments that pass the verifier crash the first execution, not the load."""
    import torch

    program = runtime.load_program(data)
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


def _probe(p: Path, runtime: Any, data: bytes) -> None:
    """Load `data` (see _load_all) in a child process; raise if the child dies."""
    digest = hashlib.sha256(data).hexdigest()
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
        code = 1
        try:
            _load_all(runtime, data)
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
    the module's docstring). `expected_sha256` (hex) pins the file's digest."""
    p = check_readable(path)
    try:
        from executorch.runtime import Runtime
    except ImportError as e:
        raise missing_extra(e, f"{p}: reading a .pte") or BackendUnavailableError(f"{p}: reading a .pte needs the executorch package ({e})") from None
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{p}: cannot be read: {e.strerror or e}") from None
    check_pin(p, data, expected_sha256)
    data = unseal_trailer(p, data, TRAILER_MAGIC, "program", "qexport.to_executorch")
    runtime = Runtime.get()
    _probe(p, runtime, data)
    try:
        return runtime.load_program(data)
    except Exception as e:  # the runtime's loader reports damage as RuntimeError/ValueError with a code
        raise CorruptArtifactError(f"{p}: ExecuTorch cannot load this program ({type(e).__name__}: {e})") from None


def read_manifest(path: "str | PathLike[str]") -> Manifest:
    """The qexport manifest embedded in a `.pte`."""
    p = check_readable(path)
    program = open_program(p)
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
