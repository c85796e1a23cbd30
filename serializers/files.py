"""Artifact paths: checked before any work (`check_readable`, `check_writable`), and written
atomically (`atomic_path`): an artifact appears under its name complete, or not at all, and a writer
killed half-way (kill -9, power loss) leaves nothing that the next write or load in that directory
does not remove."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from os import PathLike
from pathlib import Path
from typing import Any, Iterator

from qexport.errors import ArtifactError, ArtifactNotFoundError, UsageError

#: `.<name>.<writer pid>@<host>.<random>.tmp`, the folder atomic_path writes in; the host tag keeps
#: a process from judging the pids of another machine (or container) sharing the directory
_TMP_RE = re.compile(r"\..+\.(\d+)@([0-9a-f]{8})\.[a-z0-9_]+\.tmp")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def sweep_stale(directory: "str | PathLike[str]") -> None:
    """Remove the temporary folders of writers that died (their pid is gone) from `directory`.
    Never raises: a directory we cannot list or write is left as it is."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            m = _TMP_RE.fullmatch(entry.name) if entry.name.startswith(".") else None
            if (m and m.group(2) == _HOST and int(m.group(1)) != os.getpid() and entry.is_dir(follow_symlinks=False)
                    and not _alive(int(m.group(1)))):
                shutil.rmtree(entry.path, ignore_errors=True)


def pinned_digest(expected_sha256: object) -> str | None:
    """A pin as the loaders compare it (lowercase hex), or None; UsageError for anything that is not a
    SHA-256, before any work: an int raised AttributeError (or "cannot be loaded as pt2", blaming the
    file), and "xyz" was reported as a file that is not the one pinned."""
    if expected_sha256 is None:
        return None
    if not isinstance(expected_sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", expected_sha256.strip()):
        raise UsageError(f"expected_sha256={str(expected_sha256)[:80]!r} is not a SHA-256: give the 64 hex digits "
                         f"that sha256sum prints")
    return expected_sha256.strip().lower()


def file_sha256(path: Path) -> str:
    """The SHA-256 (hex) of the file at `path`, read in chunks (a model may be larger than memory allows twice)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot be read: {e.strerror or e}") from None
    return digest.hexdigest()


def _check_path_type(path: Any, what: str) -> None:
    if not isinstance(path, (str, os.PathLike)):  # Path(None) raised a bare TypeError
        # a program in memory (inspect(ep), the in-memory habit of torch.export users) has its regions read directly
        hint = ("; for a program in memory use qexport.regions(ep)"
                if type(path).__name__ == "ExportedProgram" and what == "artifact" else "")
        raise ArtifactError(f"the {what} path must be a str or os.PathLike, got {type(path).__name__} "
                            f"({str(path)[:60].splitlines()[0] if str(path).strip() else ''}){hint}")


def check_readable(path: "str | PathLike[str]") -> Path:
    """The path as a Path, or ArtifactNotFoundError / ArtifactError if it is not a readable file."""
    _check_path_type(path, "artifact")
    p = Path(path)
    if not p.exists():
        raise ArtifactNotFoundError(f"{p}: no such file")
    if not p.is_file():
        raise ArtifactError(f"{p}: not a file")
    sweep_stale(p.parent if str(p.parent) else ".")
    return p


def check_writable(path: "str | PathLike[str]", suffix: str | None = None) -> Path:
    """Check, before any work, that `path` can be written; returns it as a Path."""
    _check_path_type(path, "output")
    p = Path(path)
    if suffix is not None and p.suffix != suffix:
        raise ArtifactError(f"{p}: the file name must end with {suffix}")
    if p.is_dir():
        raise ArtifactError(f"{p}: is a directory; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ArtifactNotFoundError(f"{p}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ArtifactError(f"{p}: directory {parent} is not writable")
    # os.access passes for root in /proc and on some read-only mounts: there the lowering ran to the end
    # (28 s for a small .pte) before the write failed
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{p.name}.probe.", dir=parent))
    except OSError as e:
        raise ArtifactError(f"{p}: cannot write in {parent}: {e.strerror or e}") from None
    return p


@contextlib.contextmanager
def atomic_path(path: "str | PathLike[str]") -> Iterator[Path]:
    """Yield a temporary path in the same directory (same file name, so writers that derive
    anything from the name, like torch's archive root folder, see the final one); on success it
    is renamed over `path` with os.replace, on any failure it is removed."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    sweep_stale(parent)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{p.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=parent))
    except OSError as e:  # a read-only file system passes os.access on some mounts
        raise ArtifactError(f"{p}: cannot write in {parent}: {e.strerror or e}") from None
    tmp = tmpdir / p.name
    try:
        yield tmp
        if not tmp.is_file():
            raise ArtifactError(f"{p}: the writer produced no file")
        replace_into(tmp, p)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def replace_into(tmp: Path, p: Path) -> None:
    """Move a file written in `atomic_path`'s folder (the artifact or one it names) to `p`, on disk first."""
    try:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        raise ArtifactError(f"{p}: cannot be written: {e.strerror or e}") from None
