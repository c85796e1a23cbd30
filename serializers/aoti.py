"""AOTInductor packages written by `qexport.compile`: the manifest writer, the `inspect` reader and
the checked loader.

An AOTI package is a torch pt2 archive holding `data/aotinductor/<model>/` (the compiled code and
weights); qexport adds its manifest at `extra/qexport/manifest.json`, as in a `.pt2`, with the
SHA-256 of every member, the shared library included. Reading the manifest never loads the library.

A package is native code: loading it runs whatever its `.so` does. The checks here (names, the
allow-list, CRCs, digests, an optional pinned digest of the whole file) catch damage and a member
swapped after qexport wrote the package, not a package built by a hostile author.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import weakref
from os import PathLike
from pathlib import Path
from typing import Any, Iterator

from qexport.errors import ArtifactError, CorruptArtifactError

from ._archive import AOTI_PREFIX, ZIP_MAGIC, Archive, check_allowed, read_archive, read_manifest as _read_manifest, seal
from .files import check_readable
from .manifest import Manifest

#: the one model qexport.compile packages (torch's default model name)
MODEL_FOLDER = AOTI_PREFIX + "model/"
#: private extraction folders: `<tmp>/qexport-aoti.<pid>.<random>`; those of dead processes are swept
_PRIVATE_PREFIX = "qexport-aoti."
_PRIVATE_RE = re.compile(r"qexport-aoti\.(\d+)\.[^/]+")
_TMPDIR_LOCK = threading.Lock()


def read_manifest(path: "str | PathLike[str]") -> Manifest:
    p = check_readable(path)
    kind, manifest = _read_manifest(p)
    if kind != "aoti":
        raise CorruptArtifactError(f"{p}: a pt2 archive without AOTInductor code ({AOTI_PREFIX})")
    return manifest


def write_manifest(package: Path, manifest: Manifest) -> Manifest:
    """Add `manifest` to the package AOTInductor just wrote at `package`, as `<root>/extra/qexport/
    manifest.json` (torch's place for extra files in a pt2 archive), with the SHA-256 of every member
    torch wrote (the `.so` included), in qexport's zip layout; returns the manifest as written.

    Why not package_pt2(extra_files=...): aoti_compile_and_package packages the compiled files itself
    and takes no extra files; `seal` repacks them byte for byte and adds the manifest.
    """
    if manifest.artifact != "aoti":
        raise ArtifactError(f"{package}: an AOTInductor package takes an aoti manifest, not {manifest.artifact}")
    return seal(package, manifest)


def _check_package(archive: Archive) -> None:
    """The AOTI kind: compiled files of one model, nothing else (no program, no pickled weights)."""
    if archive.kind != "aoti":
        raise CorruptArtifactError(f"{archive.path}: a qexport program, not an AOTInductor package; load it with qexport.load")
    check_allowed(archive, lambda n: n.startswith(MODEL_FOLDER), f"an AOTInductor package (only {MODEL_FOLDER}*)")
    _check_device(archive)


#: the devices a package's compiled code runs on, as its manifest and torch's metadata name them
DEVICES = ("cpu", "cuda")


def _check_device(archive: Archive) -> None:
    """The manifest's `device` (where runners move the inputs) must be the one torch's metadata says the
    code was compiled for: `"meta"` over a CPU package segfaulted bench and generate, and CPU
    pointers handed to CUDA code (or the reverse) are no better."""
    from qexport.table import printable

    device = archive.manifest.extra.get("device", "cpu")
    compiled = set()
    for name in archive.members:
        if name.startswith(MODEL_FOLDER) and name.endswith("_metadata.json"):
            meta = archive.json(name)
            compiled.add(meta.get("AOTI_DEVICE_KEY") if isinstance(meta, dict) else None)
    if device not in DEVICES or compiled - {device}:
        raise CorruptArtifactError(
            f"{archive.path}: its manifest says device {printable(device)[:40]!r} where its compiled code is for "
            f"{printable(sorted(map(str, compiled)))[:80]} (one of {DEVICES}); not a package qexport writes, compile it again"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_private_folders(parent: "str | None" = None) -> None:
    """Remove the extraction folders of processes that died without cleaning up (kill -9)."""
    parent = parent or tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            m = _PRIVATE_RE.fullmatch(entry.name)
            if m and entry.is_dir(follow_symlinks=False) and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(entry.path, ignore_errors=True)


@contextlib.contextmanager
def _torch_extracts_into(folder: Path) -> Iterator[None]:
    # AOTIModelPackageLoader unzips the package into a folder of its own under the system temp
    # directory (std::filesystem::temp_directory_path, which reads TMPDIR) and leaves it behind if
    # the process is killed; pointing TMPDIR at our private folder keeps every file it writes there.
    with _TMPDIR_LOCK:
        old = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(folder)
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = old


def load_package(path: "str | PathLike[str]", *, expected_sha256: str | None = None, **loader_options: Any) -> tuple[Any, Manifest]:
    """(torch's AOTICompiledModel, manifest) for a package written by qexport.compile, loaded from
    the checked bytes in a private folder that is removed when the model is garbage-collected (or,
    after a crash, by the next load)."""
    import torch

    p = check_readable(path)
    archive = read_archive(p, _check_package, expected_sha256=expected_sha256)
    sweep_private_folders()
    folder = Path(tempfile.mkdtemp(prefix=f"{_PRIVATE_PREFIX}{os.getpid()}."))
    try:
        package = folder / "package.pt2"
        package.write_bytes(archive.data)
        with _torch_extracts_into(folder):
            compiled = torch._inductor.aoti_load_package(str(package), **loader_options)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    package.unlink()
    weakref.finalize(compiled, shutil.rmtree, str(folder), True)
    return compiled, archive.manifest


def sniff(p: Path, head: bytes) -> bool:
    from .pt2 import has_aoti_code

    return head.startswith(ZIP_MAGIC) and has_aoti_code(p) is True
