"""`.pt2` artifacts: `save(ep, path)` / `load(path)` through torch.export's own archive, with the
qexport manifest stored inside it as an extra file.

The file is exactly what `torch.export.save` writes (a zip of JSON graph, raw tensor bytes and
`extra/` files), so `torch.export.load(path)` reads it too; regions need nothing registered, since
the HOP is torch's own and its scheme and options are a plain JSON dict. The manifest lives at
`<root>/extra/qexport/manifest.json`.

`load` never hands torch a file it has not checked first. torch's loader trusts its input: it
unpickles tensor subclasses, torchbind/opaque objects and (after a failed `weights_only` attempt)
the sample inputs with `weights_only=False`, and it raises whatever its parsers raise on damage. So
the archive is verified with Python's zipfile (every member's CRC) and its payload configs are read
before torch sees it; anything that would be unpickled is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import zipfile
from os import PathLike
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch.export.pt2_archive import constants as C

from qexport.errors import (
    ArtifactError, CorruptArtifactError, QExportError, UnsafeArtifactError,
)

from qexport._containers import register_program_containers
from qexport.regions import iter_region_nodes

from ._atomic import atomic_path, check_writable
from .inspect import check_readable, register_reader
from .manifest import Manifest

#: the manifest's name among torch.export's `extra_files` (stored under `<root>/extra/`)
MANIFEST_NAME = "qexport/manifest.json"
ZIP_MAGIC = b"PK\x03\x04"
MODEL_NAME = "model"  # the name torch.export.save gives the one program it writes


def manifest_extra_files(manifest: Manifest) -> dict[str, str]:
    """`extra_files` for torch.export.save / package_pt2 that embed `manifest` where readers look."""
    return {MANIFEST_NAME: manifest.to_json()}


# -- save -------------------------------------------------------------------------------------

def save(
    ep: torch.export.ExportedProgram,
    path: "str | PathLike[str]",
    *,
    extra: Mapping[str, Any] | None = None,
    keep_stack_traces: bool = False,
) -> Manifest:
    """Write `ep` to `path` (a `.pt2` file) with its manifest; returns the manifest.

    `extra` (JSON-safe) is stored in the manifest's `extra` field. Source stack traces are left out
    unless `keep_stack_traces=True`: a deployment artifact should not carry the absolute paths of the
    machine that exported it, and they are 1 % of an int4 MiniLM file. The file appears complete or
    not at all.
    """
    if not isinstance(ep, torch.export.ExportedProgram):
        raise ArtifactError(f"save() takes a torch.export.ExportedProgram, got {type(ep).__name__}")
    p = check_writable(path, ".pt2")
    manifest = Manifest.from_program(ep, "pt2", **dict(extra or {}))
    _check_picklefree(ep, p)
    with atomic_path(p) as tmp, _debug_meta_dropped(ep, stack_traces=not keep_stack_traces):
        try:
            torch.export.save(ep, tmp, extra_files=manifest_extra_files(manifest))
        except Exception as e:
            raise ArtifactError(f"{p}: torch.export.save failed: {type(e).__name__}: {e}") from e
    return manifest


# Debug metadata a region body's nodes inherit from the region call; the HOP node keeps its own copy.
_BODY_DEBUG_META = ("stack_trace", "torch_fn", "nn_module_stack", "source_fn_stack", "from_node")


@contextlib.contextmanager
def _debug_meta_dropped(ep: torch.export.ExportedProgram, *, stack_traces: bool) -> Iterator[None]:
    """While saving, leave out the debug metadata of the nodes inside region bodies (and, with
    `stack_traces`, every node's stack trace); the user's program is left as it was.

    Why: torch's serde inlines every region's body and gives each of its nodes a copy of the region
    call's stack trace (the `invoke_quant(` line in quantize.py, already on the HOP node itself) and
    a `torch_fn` tag. On all-MiniLM-L6-v2 int4 that is 0.66 MB of a 1.65 MB graph JSON, 4% of the
    whole artifact.
    """
    saved: list[tuple[dict, str, Any]] = []

    def drop(node: torch.fx.Node, keys: tuple[str, ...]) -> None:
        for key in keys:
            if key in node.meta:
                saved.append((node.meta, key, node.meta.pop(key)))

    for node in iter_region_nodes(ep):
        body = getattr(ep.graph_module, node.args[0].target, None) if isinstance(node.args[0], torch.fx.Node) else None
        if isinstance(body, torch.fx.GraphModule):
            for inner in body.graph.nodes:
                drop(inner, _BODY_DEBUG_META)
    if stack_traces:
        for gm in ep.graph_module.modules():
            if isinstance(gm, torch.fx.GraphModule):
                for node in gm.graph.nodes:
                    drop(node, ("stack_trace",))
    try:
        yield
    finally:
        for meta, key, value in saved:
            meta[key] = value


def _check_picklefree(ep: torch.export.ExportedProgram, p: Path) -> None:
    """Refuse, before writing, a program whose archive `load` would refuse as unsafe."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for kind, items in (("state", ep.state_dict.items()), ("constant", ep.constants.items())):
        for fqn, v in items:
            if not isinstance(v, torch.Tensor):
                raise UnsafeArtifactError(
                    f"{p}: {kind} {fqn!r} is a {type(v).__name__}, which torch.export.save pickles; "
                    f"qexport artifacts hold tensors only"
                )
            if is_traceable_wrapper_subclass(v) or type(v) not in (torch.Tensor, torch.nn.Parameter):
                raise UnsafeArtifactError(
                    f"{p}: {kind} {fqn!r} is a tensor subclass ({type(v).__name__}), which torch.export.save "
                    f"pickles; quantize with qexport (plain tensors per role) instead"
                )
    if ep.example_inputs is not None:
        buf = io.BytesIO()
        try:
            torch.save(ep.example_inputs, buf)
            buf.seek(0)
            torch.load(buf, weights_only=True)
        except Exception as e:
            raise UnsafeArtifactError(
                f"{p}: the program's example inputs cannot be stored without pickling code "
                f"({type(e).__name__}); export with plain tensors (and dicts/tuples of them) as inputs"
            ) from None


# -- reading the archive ----------------------------------------------------------------------

class _Archive:
    """A torch.export zip archive opened with Python's zipfile, checked before torch reads it."""

    def __init__(self, p: Path, *, verify: bool) -> None:
        self.path = p
        try:
            self.zip = zipfile.ZipFile(p)
        except zipfile.BadZipFile as e:
            raise CorruptArtifactError(f"{p}: not a zip archive, or a truncated one ({e}); a .pt2 is the zip torch.export.save writes") from None
        except PermissionError as e:
            raise ArtifactError(f"{p}: cannot be read: {e.strerror}") from None
        except Exception as e:
            raise CorruptArtifactError(f"{p}: unreadable zip structure ({type(e).__name__}: {e})") from None
        try:
            self._index(verify)
        except Exception:
            self.zip.close()
            raise

    def _index(self, verify: bool) -> None:
        p = self.path
        try:
            infos = self.zip.infolist()
            names = [i.filename for i in infos]
            size = p.stat().st_size
            for i in infos:
                # torch writes every member stored (uncompressed): a compressed member or one larger
                # than the file is damage (or a zip bomb), not something torch.export.save wrote.
                if i.compress_type != zipfile.ZIP_STORED or i.file_size > size:
                    raise CorruptArtifactError(f"{p}: member {i.filename!r} is not stored as torch.export.save stores it")
            formats = [n for n in names if n.endswith("/" + C.ARCHIVE_FORMAT_PATH) and n.count("/") == 1]
            if len(formats) != 1:
                raise CorruptArtifactError(f"{p}: a zip, but not a torch.export archive (no {C.ARCHIVE_FORMAT_PATH} record)")
            self.root = formats[0].split("/")[0] + "/"
            if any(not n.startswith(self.root) for n in names):
                raise CorruptArtifactError(f"{p}: archive members outside its root folder {self.root!r}")
            self.names = {n[len(self.root):] for n in names}
            if verify:
                bad = self.zip.testzip()
                if bad is not None:
                    raise CorruptArtifactError(f"{p}: member {bad!r} is damaged (CRC mismatch)")
            if self.read_text(C.ARCHIVE_FORMAT_PATH) != C.ARCHIVE_FORMAT_VALUE:
                raise CorruptArtifactError(f"{p}: archive_format is not {C.ARCHIVE_FORMAT_VALUE!r}")
        except QExportError:
            raise
        except Exception as e:  # zipfile raises BadZipFile, EOFError, OSError, struct.error, ... on damage
            raise CorruptArtifactError(f"{p}: damaged archive ({type(e).__name__}: {e})") from None

    def __enter__(self) -> "_Archive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.zip.close()

    def read(self, name: str) -> bytes:
        if name not in self.names:
            raise CorruptArtifactError(f"{self.path}: the archive has no {name!r} record")
        try:
            return self.zip.read(self.root + name)
        except Exception as e:
            raise CorruptArtifactError(f"{self.path}: record {name!r} is damaged ({type(e).__name__}: {e})") from None

    def read_text(self, name: str) -> str:
        try:
            return self.read(name).decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptArtifactError(f"{self.path}: record {name!r} is not UTF-8 text") from None

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_text(name))
        except (ValueError, RecursionError) as e:
            raise CorruptArtifactError(f"{self.path}: record {name!r} is not valid JSON ({e})") from None

    def has_aoti(self) -> bool:
        return any(n.startswith(C.AOTINDUCTOR_DIR) for n in self.names)

    def manifest(self) -> Manifest:
        name = C.EXTRA_DIR + MANIFEST_NAME
        if name not in self.names:
            raise CorruptArtifactError(
                f"{self.path}: no qexport manifest ({name}); the file was not written by qexport.save "
                f"(torch.export.load reads plain torch archives)"
            )
        return Manifest.from_json(self.read(name), source=str(self.path))

    def check_loadable(self) -> None:
        """Raise unless torch's loader would read only JSON and raw tensor bytes (no pickle, no .so)."""
        p = self.path
        if self.has_aoti():
            raise UnsafeArtifactError(f"{p}: holds AOTInductor compiled code; load it with qexport.load_compiled")
        models = sorted(n for n in self.names if n.startswith(C.MODELS_DIR) and n.endswith(".json"))
        if models != [C.MODELS_FILENAME_FORMAT.format(MODEL_NAME)]:
            raise CorruptArtifactError(f"{p}: expected one program {C.MODELS_FILENAME_FORMAT.format(MODEL_NAME)}, found {models}")
        for legacy in (f"{C.WEIGHTS_DIR}{MODEL_NAME}.pt", f"{C.CONSTANTS_DIR}{MODEL_NAME}.pt"):
            if legacy in self.names:
                raise UnsafeArtifactError(f"{p}: legacy pickled {legacy}; re-save it with qexport.save")
        for config_name, kind in (
            (C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME), "weight"),
            (C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL_NAME), "constant"),
        ):
            config = self.read_json(config_name)
            entries = config.get("config") if isinstance(config, dict) else None
            if not isinstance(entries, dict):
                raise CorruptArtifactError(f"{p}: {config_name} has no 'config' object")
            for fqn, meta in entries.items():
                path_name = meta.get("path_name") if isinstance(meta, dict) else None
                if not isinstance(path_name, str):
                    raise CorruptArtifactError(f"{p}: {config_name}: entry {fqn!r} is malformed")
                if meta.get("use_pickle") or path_name.startswith((C.CUSTOM_OBJ_FILENAME_PREFIX, C.OPAQUE_OBJ_FILENAME_PREFIX)):
                    raise UnsafeArtifactError(
                        f"{p}: {kind} {fqn!r} is pickled ({path_name}); qexport does not unpickle artifacts"
                    )
        sample = C.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL_NAME)
        data = self.read(sample)
        if data:
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except pickle.UnpicklingError as e:
                if "Weights only load failed" not in str(e):
                    raise CorruptArtifactError(f"{p}: the stored example inputs are damaged ({e})") from None
                # torch retries this with weights_only=False, which would run whatever the pickle says
                raise UnsafeArtifactError(
                    f"{p}: the stored example inputs hold objects other than tensors and containers "
                    f"(weights_only=True refuses them); refusing to unpickle them"
                ) from None
            except Exception as e:
                raise CorruptArtifactError(f"{p}: the stored example inputs are damaged ({type(e).__name__}: {e})") from None


# -- load / inspect ---------------------------------------------------------------------------

def load(path: "str | PathLike[str]") -> torch.export.ExportedProgram:
    """Read a `.pt2` written by `save`: the archive is verified, nothing is unpickled, and the
    program's regions are checked against the manifest."""
    p = check_readable(path)
    with _Archive(p, verify=True) as archive:
        manifest = archive.manifest()
        archive.check_loadable()
        register_program_containers(archive.read(C.MODELS_FILENAME_FORMAT.format(MODEL_NAME)))
    try:
        ep = torch.export.load(p)
    except Exception as e:  # torch's deserializer raises anything its parsers raise
        raise CorruptArtifactError(f"{p}: torch.export.load could not deserialize the program ({type(e).__name__}: {e})") from None
    manifest.check_against(ep, source=str(p))
    return ep


def read_manifest(path: "str | PathLike[str]") -> Manifest:
    """The manifest of a qexport `.pt2` (or AOTI package) without loading its program."""
    p = check_readable(path)
    with _Archive(p, verify=False) as archive:
        return archive.manifest()


def has_aoti_code(p: Path) -> bool | None:
    """Whether a zip holds AOTInductor code (an AOTI package is a pt2 archive too); None if damaged.
    The pt2 and aoti readers both sniff with this, so they never both claim, or both refuse, a file."""
    try:
        with zipfile.ZipFile(p) as z:
            return any(f"/{C.AOTINDUCTOR_DIR}" in n for n in z.namelist())
    except Exception:
        return None


def _sniff(p: Path, head: bytes) -> bool:
    # Damaged zips are claimed here, so the user hears what is wrong with them.
    return head.startswith(ZIP_MAGIC) and has_aoti_code(p) is not True


register_reader("pt2", _sniff, read_manifest)
