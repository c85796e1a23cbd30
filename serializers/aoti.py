"""`inspect` reader for AOTInductor packages written by `qexport.compile`.

An AOTI package is a torch pt2 archive holding `data/aotinductor/<model>/` (the compiled code and
weights); qexport adds its manifest at `extra/qexport/manifest.json`, as in a `.pt2`. Reading it
never loads the shared library.
"""

from __future__ import annotations

from pathlib import Path

from torch.export.pt2_archive import constants as C

from qexport.errors import CorruptArtifactError

from .inspect import check_readable, register_reader
from .manifest import Manifest
from .pt2 import MANIFEST_NAME, ZIP_MAGIC, _Archive, has_aoti_code


def read_manifest(path: "str | Path") -> Manifest:
    p = check_readable(path)
    with _Archive(p, verify=False) as archive:
        if not archive.has_aoti():
            raise CorruptArtifactError(f"{p}: a pt2 archive without AOTInductor code ({C.AOTINDUCTOR_DIR})")
        if C.EXTRA_DIR + MANIFEST_NAME not in archive.names:
            raise CorruptArtifactError(
                f"{p}: an AOTInductor package without a qexport manifest; it was not written by "
                f"qexport.compile (load it with torch._inductor.aoti_load_package)"
            )
        return archive.manifest()


def _sniff(p: Path, head: bytes) -> bool:
    return head.startswith(ZIP_MAGIC) and has_aoti_code(p) is True


register_reader("aoti", _sniff, read_manifest)
