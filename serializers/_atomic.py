"""Atomic file writes: an artifact appears under its name complete, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from os import PathLike
from pathlib import Path
from typing import Iterator

from qexport.errors import ArtifactError, ArtifactNotFoundError


def check_writable(path: "str | PathLike[str]", suffix: str | None = None) -> Path:
    """Check, before any work, that `path` can be written; returns it as a Path."""
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
    return p


@contextlib.contextmanager
def atomic_path(path: "str | PathLike[str]") -> Iterator[Path]:
    """Yield a temporary path in the same directory (same file name, so writers that derive
    anything from the name, like torch's archive root folder, see the final one); on success it
    is renamed over `path` with os.replace, on any failure it is removed."""
    p = Path(path)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else "."))
    tmp = tmpdir / p.name
    try:
        yield tmp
        if not tmp.is_file():
            raise ArtifactError(f"{p}: the writer produced no file")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
