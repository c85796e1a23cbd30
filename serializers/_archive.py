"""The one reader, and the one writer, of qexport's zip artifacts (a `.pt2` program, an AOTInductor
package). Every entry point that hands such a file to torch goes through `read_archive` first.

Why torch never reads the file itself: torch's zip reader (miniz, `PyTorchFileReader`) and Python's
`zipfile` disagree on hostile zips (with two members of one name torch reads the first, zipfile the
last; bytes outside the central directory, overlapping members, ...), so checking with one reader and
loading with the other checks nothing. Here the file is read once into memory, every member is
checked (names, the kind's allow-list, CRCs, the SHA-256 digests the manifest records), and the file
must be byte for byte what `write_archive` makes of those members. torch is then handed exactly
those bytes (a BytesIO, or a copy in a private folder for the AOTI loader, which reads only paths):
a canonical archive of checked members, which every zip reader parses the same way.

The manifest member cannot hold its own digest; the archive comment holds it.
"""

from __future__ import annotations

import hashlib
import io
import re
import stat
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path
from typing import Callable, Sequence

from qexport.errors import ArtifactError, CorruptArtifactError, QExportError, UnsafeArtifactError

from . import kinds
from .files import pinned_digest
from .manifest import Manifest

ZIP_MAGIC = b"PK\x03\x04"
#: the manifest, relative to the archive's root folder (torch.export's `extra/` place for extra files)
MANIFEST_MEMBER = "extra/qexport/manifest.json"
#: members torch's archive writer adds to every pt2 archive
ARCHIVE_RECORDS = frozenset({"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"})
AOTI_PREFIX = "data/aotinductor/"
_COMMENT_PREFIX = b"qexport-manifest-sha256:"
# Pinned so a file's layout depends on its members only (not on the clock or the Python version).
_DATE = (1980, 1, 1, 0, 0, 0)
_MODE = (stat.S_IFREG | 0o644) << 16
#: the most bytes a member's local header may add that the central directory does not show: its extra
#: field, whose length is 16 bits (torch's writer pads payloads to an alignment there, ZIP64 sizes of a
#: member over 4 GiB take 20); qexport's own layout has none, which read_archive checks once the bytes are read
_LOCAL_EXTRA = 0xFFFF
_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}|\.data")

Check = Callable[["Archive"], None]


def sha256(data: "bytes | memoryview") -> str:
    return hashlib.sha256(data).hexdigest()


def check_pin(path: Path, data: bytes, expected_sha256: str | None) -> None:
    """Refuse `data` (the whole file at `path`) unless its SHA-256 is the pinned one (every kind)."""
    expected_sha256 = pinned_digest(expected_sha256)
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise UnsafeArtifactError(
            f"{path}: SHA-256 is {sha256(data)}, not the expected {expected_sha256}; this is not the file you pinned"
        )


@dataclass(frozen=True)
class Archive:
    """A qexport zip artifact, read and checked: `data` is the whole file (what torch gets), `members`
    its members by name relative to `root`, in file order."""

    path: Path
    kind: str
    root: str
    members: dict[str, bytes]
    manifest: Manifest
    data: bytes

    def json(self, name: str) -> object:
        import json

        try:
            return json.loads(self.members[name].decode("utf-8"))
        except KeyError:
            raise CorruptArtifactError(f"{self.path}: the archive has no {name!r} record") from None
        except (ValueError, RecursionError) as e:
            raise CorruptArtifactError(f"{self.path}: record {name!r} is not valid JSON ({e})") from None


# -- writing ----------------------------------------------------------------------------------------

def write_archive(members: Sequence[tuple[str, bytes]], dest: "str | PathLike[str] | io.BytesIO", comment: bytes = b"") -> None:
    """Write `members` (full names, in order) as the one layout `read_archive` accepts: stored, no
    timestamps, regular files, no extra fields."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, _DATE)
            info.create_system = 3
            info.external_attr = _MODE
            z.writestr(info, data)
        z.comment = comment


def seal(package: Path, manifest: Manifest) -> Manifest:
    """Rewrite the zip torch just wrote at `package` in qexport's layout, with `manifest` (given the
    SHA-256 of every member) at MANIFEST_MEMBER; returns that manifest."""
    with zipfile.ZipFile(package) as z:
        names = z.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1:
            raise ArtifactError(f"{package}: torch wrote an archive with roots {sorted(roots)}; expected one")
        root = roots.pop() + "/"
        members = [(n, z.read(n)) for n in names if n != root + MANIFEST_MEMBER]
    digests = {n[len(root):]: sha256(d) for n, d in members}
    sealed = replace(manifest, members=digests)
    text = sealed.to_json().encode("utf-8")
    write_archive([*members, (root + MANIFEST_MEMBER, text)], package, manifest_comment(text))
    return sealed


# -- reading ----------------------------------------------------------------------------------------

def _open_zip(p: Path, source: "Path | io.BytesIO") -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except zipfile.BadZipFile as e:
        raise CorruptArtifactError(f"{p}: not a zip archive, or a truncated one ({e})") from None
    except PermissionError as e:
        raise ArtifactError(f"{p}: cannot be read: {e.strerror}") from None
    except Exception as e:  # zipfile raises OSError, struct.error, ValueError, ... on damage
        raise CorruptArtifactError(f"{p}: unreadable zip structure ({type(e).__name__}: {e})") from None


def _check_names(p: Path, z: zipfile.ZipFile) -> tuple[str, list[str]]:
    """(root folder, member names relative to it); refuses every name that could land outside the
    folder it is extracted to, or that two readers could resolve differently."""
    infos = z.infolist()
    if not infos:
        raise CorruptArtifactError(f"{p}: an empty zip archive")
    names = [i.filename for i in infos]
    formats = [n for n in names if n.count("/") == 1 and n.endswith("/archive_format")]
    if len(formats) != 1:
        raise CorruptArtifactError(f"{p}: a zip, but not a torch.export archive (no single archive_format record)")
    if len(set(names)) != len(names):
        dup = sorted(n for n, k in Counter(names).items() if k > 1)
        raise UnsafeArtifactError(f"{p}: members named twice ({', '.join(map(repr, dup[:3]))}); readers disagree on which copy counts")
    if len({n.casefold() for n in names}) != len(names):
        # extracted on a case-insensitive file system (macOS, Windows), the last such member replaces the other
        folded = Counter(n.casefold() for n in names)
        dup = sorted(n for n in names if folded[n.casefold()] > 1)
        raise UnsafeArtifactError(f"{p}: members whose names differ only in case ({', '.join(map(repr, dup[:3]))}); one file on "
                                  f"a case-insensitive file system")
    root = formats[0].split("/", 1)[0]
    rel = []
    for i in infos:
        n = i.filename
        parts = n.split("/")
        if n.startswith("/") or "\\" in n or "\x00" in n or any(part in ("", ".", "..") for part in parts):
            raise UnsafeArtifactError(f"{p}: member name {n!r} is absolute, empty or climbs out of its folder")
        # torch names the root folder after the file, so it may hold any printable character
        if not _safe_root(parts[0]) or not all(_SAFE_PART.fullmatch(part) for part in parts[1:]):
            raise UnsafeArtifactError(f"{p}: member name {n!r} has characters qexport never writes")
        if parts[0] != root or len(parts) < 2:
            raise UnsafeArtifactError(f"{p}: member {n!r} is outside the archive's root folder {root + '/'!r}")
        mode = i.external_attr >> 16
        if i.is_dir() or stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise UnsafeArtifactError(f"{p}: member {n!r} is a link or a folder, not a file")
        if i.compress_type != zipfile.ZIP_STORED or i.flag_bits & 0x1:
            raise CorruptArtifactError(f"{p}: member {n!r} is compressed or encrypted, not stored as torch.export.save stores it")
        rel.append(n[len(root) + 1:])
    _check_no_overlap(p, z, infos)
    return root + "/", rel


def _check_no_overlap(p: Path, z: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse members whose bytes overlap another's (or the central directory), before any is read:
    N members that each claim the rest of the file make a reader read (and CRC) N times its size, a
    quadratic "zip bomb" without compression (a 0.5 MB file read as 0.55 GB). Refuse bytes no member
    holds too: qexport writes its members back to back from the first byte, and the whole file is
    read into memory to be checked (a 30 GiB sparse file ending in a small zip's directory)."""
    end = 0
    for i in sorted(infos, key=lambda i: i.header_offset):
        name = len(i.filename.encode("utf-8" if i.flag_bits & 0x800 else "cp437"))
        if i.header_offset < end:
            raise CorruptArtifactError(f"{p}: member {i.filename!r} overlaps the member before it; not a zip qexport writes")
        if i.header_offset > end + _LOCAL_EXTRA:
            raise CorruptArtifactError(f"{p}: {i.header_offset - end:,} bytes before member {i.filename!r} that no member "
                                       f"holds; damaged or not a zip qexport writes")
        end = i.header_offset + zipfile.sizeFileHeader + name + i.compress_size
    if end > z.start_dir:
        raise CorruptArtifactError(f"{p}: the zip's members run past its central directory; damaged or not a zip qexport writes")
    if z.start_dir > end + _LOCAL_EXTRA:
        raise CorruptArtifactError(f"{p}: {z.start_dir - end:,} bytes between its last member and its central directory that "
                                   f"no member holds; damaged or not a zip qexport writes")


def _safe_root(name: str) -> bool:
    return 0 < len(name) <= 255 and name.isprintable() and name not in (".", "..")


def _kind(rel: list[str]) -> str:
    return "aoti" if any(n.startswith(AOTI_PREFIX) for n in rel) else "pt2"


def _manifest(p: Path, z: zipfile.ZipFile, text: bytes) -> Manifest:
    if z.comment != manifest_comment(text):
        raise CorruptArtifactError(
            f"{p}: the manifest's digest (the archive comment) does not match the manifest; the file was "
            f"damaged or edited after qexport wrote it (or it was written by a qexport without digests: re-save it)"
        )
    return Manifest.from_json(text, source=str(p))


def _no_manifest(p: Path, kind: str) -> CorruptArtifactError:
    if kind == "aoti":
        return CorruptArtifactError(
            f"{p}: an AOTInductor package without a qexport manifest ({MANIFEST_MEMBER}); it was not written by "
            f"qexport.compile (load it with torch._inductor.aoti_load_package if you trust it: it is native code)"
        )
    return CorruptArtifactError(
        f"{p}: no qexport manifest ({MANIFEST_MEMBER}); the file was not written by qexport.save or qexport.compile "
        f"(torch.export.load reads plain torch archives; if you trust it, re-save it with qexport.save)"
    )


def read_manifest(path: Path) -> tuple[str, Manifest]:
    """(kind, manifest) of a qexport zip without reading its other members (what `inspect` needs);
    names are checked as in `read_archive`."""
    with _open_zip(path, path) as z:
        try:
            root, rel = _check_names(path, z)
            if MANIFEST_MEMBER not in rel:
                raise _no_manifest(path, _kind(rel))
            return _kind(rel), kinds.check_artifact(path, _manifest(path, z, z.read(root + MANIFEST_MEMBER)), _kind(rel))
        except QExportError:
            raise
        except Exception as e:
            raise CorruptArtifactError(f"{path}: damaged archive ({type(e).__name__}: {e})") from None


def read_archive(path: Path, check: Check, *, expected_sha256: str | None = None) -> Archive:
    """Read and check the qexport zip at `path`; `check(archive)` is its kind's allow-list and
    payload check (raising QExportError). Raises before torch sees a byte."""
    with _open_zip(path, path) as z:
        # from the central directory alone: a file that is no such zip, or named as another kind, is refused unread
        kinds.check_name(path, kinds.get(_kind(_check_names(path, z)[1])))
    data = read_whole(path)
    check_pin(path, data, expected_sha256)
    with _open_zip(path, io.BytesIO(data)) as z:
        try:
            root, rel = _check_names(path, z)
            members = {r: _read_member(path, z, root + r) for r in rel}
        except QExportError:
            raise
        except Exception as e:  # BadZipFile (CRC), EOFError, OSError, struct.error, ... on damage
            raise CorruptArtifactError(f"{path}: damaged archive ({type(e).__name__}: {e})") from None
        if MANIFEST_MEMBER not in members:
            raise _no_manifest(path, _kind(rel))
        manifest = _manifest(path, z, members[MANIFEST_MEMBER])
        comment = z.comment
    canonical = io.BytesIO()
    write_archive([(root + r, d) for r, d in members.items()], canonical, comment)
    if canonical.getvalue() != data:
        raise CorruptArtifactError(
            f"{path}: the zip's headers are not the ones qexport writes (damaged, or repacked by another tool); "
            f"re-save it with qexport"
        )
    _check_digests(path, manifest, members)
    archive = Archive(path, _kind(rel), root, members, manifest, data)
    check(archive)
    kinds.check_artifact(path, manifest, archive.kind)
    return archive


def read_whole(p: Path) -> bytes:
    """The whole file at `p`: artifacts are checked in memory, and the runtime gets the checked bytes."""
    try:
        return p.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{p}: cannot be read: {e.strerror or e}") from None
    except MemoryError:  # a 30 GiB file on a smaller machine; only files that passed the cheap checks get here
        raise ArtifactError(f"{p}: {p.stat().st_size:,} bytes, more than this process can hold in memory to check "
                            f"before a runtime reads it") from None


def _read_member(p: Path, z: zipfile.ZipFile, name: str) -> bytes:
    try:
        return z.read(name)  # zipfile checks the CRC as it reads
    except zipfile.BadZipFile as e:
        if "CRC" in str(e):
            raise CorruptArtifactError(f"{p}: member {name!r} is damaged (CRC mismatch)") from None
        raise


def manifest_comment(text: bytes) -> bytes:
    """The archive comment that records the manifest's own digest."""
    return _COMMENT_PREFIX + sha256(text).encode()


def _check_digests(p: Path, manifest: Manifest, members: dict[str, bytes]) -> None:
    if not manifest.members:
        raise UnsafeArtifactError(
            f"{p}: the manifest records no member digests (written by an older qexport); re-save or re-compile it"
        )
    listed = set(manifest.members)
    present = set(members) - {MANIFEST_MEMBER}
    if listed != present:
        extra, missing = sorted(present - listed), sorted(listed - present)
        raise UnsafeArtifactError(
            f"{p}: the archive's members are not the ones qexport wrote (unexpected: {extra[:3]}, missing: {missing[:3]})"
        )
    for name in members:
        if name != MANIFEST_MEMBER and sha256(members[name]) != manifest.members[name]:
            raise UnsafeArtifactError(
                f"{p}: member {name!r} does not match the SHA-256 its manifest records; the file was damaged or "
                f"a member was replaced after qexport wrote it"
            )


def check_allowed(archive: Archive, allowed: Callable[[str], bool], what: str) -> None:
    """Refuse any member the kind does not name (the per-kind allow-list)."""
    for name in archive.members:
        if name not in ARCHIVE_RECORDS and name != MANIFEST_MEMBER and not allowed(name):
            raise UnsafeArtifactError(f"{archive.path}: member {name!r} does not belong in {what}")


def reseal(members: Sequence[tuple[str, bytes]], dest: "str | PathLike[str]") -> Path:
    """Write `members` (full names) in qexport's layout with fresh digests in the manifest and the
    comment: what anyone can do who edits an archive on purpose. Tests and the fuzzer use it to
    reach the checks that sit behind the digests; a manifest that is not a JSON object is kept as is."""
    import json

    out = list(members)
    at = [i for i, (n, _) in enumerate(out) if n.endswith("/" + MANIFEST_MEMBER)]
    text = out[at[-1]][1] if at else b""
    if at:
        root = out[at[-1]][0][: -len(MANIFEST_MEMBER)]
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            data["members"] = {n[len(root):]: sha256(d) for n, d in out if n.startswith(root) and n != root + MANIFEST_MEMBER}
            text = json.dumps(data, separators=(",", ":")).encode()
            out[at[-1]] = (out[at[-1]][0], text)
    write_archive(out, dest, manifest_comment(text))
    return Path(dest)


# -- checksum trailers (.pte, .onnx: formats that carry no checksum of their own) ------------------------
def seal_trailer(path: Path, head: bytes) -> None:
    """Append `head` and the SHA-256 of the file so far to the file just written at `path`."""
    data = path.read_bytes()
    with open(path, "ab") as f:
        f.write(head + hashlib.sha256(data).digest())


def read_sealed(p: Path, head: bytes, what: str, writer: str, expected_sha256: str | None = None) -> bytes:
    """The checked body of the file at `p`, sealed by seal_trailer (see unseal_trailer); a file that does
    not end in such a trailer is refused before the rest of it is read."""
    try:
        with open(p, "rb") as f:
            tail = f.read(0) if f.seek(0, 2) < len(head) + 32 else (f.seek(-len(head) - 32, 2), f.read())[1]
    except OSError as e:
        raise ArtifactError(f"{p}: cannot be read: {e.strerror or e}") from None
    if expected_sha256 is None and not tail.startswith(head):  # a pinned file is judged by its digest first
        raise _no_trailer(p, writer)
    data = read_whole(p)
    check_pin(p, data, expected_sha256)
    return unseal_trailer(p, data, head, what, writer)


def _no_trailer(p: Path, writer: str) -> CorruptArtifactError:
    return CorruptArtifactError(
        f"{p}: no qexport checksum at the end of the file: it was damaged (cut or extended), edited by another "
        f"tool, or not written by {writer} (or by one older than its checksum); re-export it"
    )


def unseal_trailer(p: Path, data: bytes, head: bytes, what: str, writer: str) -> bytes:
    """`data` without its trailer (see seal_trailer), refusing a missing or wrong checksum; `what` names
    the payload ("model", "program") and `writer` the qexport call that writes the format."""
    size = len(head) + 32
    body, found, digest = data[:-size], data[-size:-32], data[-32:]
    if len(data) < size or found != head:
        raise _no_trailer(p, writer)
    if hashlib.sha256(body).digest() != digest:
        raise CorruptArtifactError(f"{p}: the {what} does not match its checksum; the file was damaged after it was written: re-export it")
    return body
