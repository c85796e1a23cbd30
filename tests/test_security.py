"""Opening an artifact never runs code, never writes outside its folder, never crashes the process;
bad user input fails before any work with a QExportError (docs/security.md)."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import qexport
from qexport import (
    ArtifactError, ArtifactNotFoundError, CalibrationError, CorruptArtifactError, ExportError, UnsafeArtifactError, UnsupportedModuleError,
    UsageError, runners,
)
from qexport.models import TinyNet
from serializers import _archive
from serializers._archive import MANIFEST_MEMBER

from conftest import MLP, quantized, scheme_for
from fuzz_artifacts import pickle_payload


@pytest.fixture(scope="module")
def pt2(tmp_path_factory) -> Path:
    x = torch.randn(4, 64)
    path = tmp_path_factory.mktemp("sec") / "model.pt2"
    qexport.save(qexport.export(quantized(MLP(), scheme_for("int8_weight_only"), (x,)), (x,)), path)
    return path


@pytest.fixture(scope="module")
def demo(demo_run) -> Path:
    return demo_run[2]


def members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def stale(edited: list[tuple[str, bytes]], original: Path, dst: Path) -> Path:
    """qexport's layout around edited members, with the manifest (and its digests) as written."""
    text = next(d for n, d in members(original) if n.endswith(MANIFEST_MEMBER))
    _archive.write_archive(edited, dst, _archive.manifest_comment(text))
    return dst


def with_manifest(ms: list[tuple[str, bytes]], edit) -> list[tuple[str, bytes]]:
    def one(n, d):
        if not n.endswith(MANIFEST_MEMBER):
            return d
        m = json.loads(d)
        edit(m)
        return json.dumps(m).encode()

    return [(n, one(n, d)) for n, d in ms]


def refused_everywhere(pt2: Path, dst: Path, change, words: str) -> None:
    """`change(name, bytes) -> bytes` applied to the program's members and resealed (fresh digests: a hostile
    author) is refused by qexport.load and runners.load with UnsafeArtifactError matching `words`."""
    p = _archive.reseal([(n, change(n, d)) for n, d in members(pt2)], dst)
    for fn in (qexport.load, runners.load):
        with pytest.raises(UnsafeArtifactError, match=words):
            fn(p)


@pytest.fixture
def torch_never_reads(monkeypatch):
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: pytest.fail("torch read a refused archive"))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: pytest.fail("torch loaded a refused package"))


# -- the archive reader --------------------------------------------------------------------------

def test_duplicate_member_whose_first_copy_is_a_pickle(pt2, tmp_path, torch_never_reads):
    """torch reads the first of two same-named members, zipfile the last: refused whichever is checked."""
    marker = tmp_path / "ran"
    ms = members(pt2)
    root = ms[0][0].split("/")[0]
    evil = [(f"{root}/data/sample_inputs/model.pt", pickle_payload(str(marker)))] + ms
    for dst in (_archive.reseal(evil, tmp_path / "a.pt2"), stale(evil, pt2, tmp_path / "b.pt2")):
        for fn in (qexport.load, runners.load, qexport.inspect):
            with pytest.raises(UnsafeArtifactError, match="members named twice"):
                fn(dst)
    assert not marker.exists()


def test_a_second_program_is_refused(pt2, tmp_path, torch_never_reads):
    marker = tmp_path / "ran"
    ms = members(pt2)
    root = ms[0][0].split("/")[0]
    model = next(d for n, d in ms if n.endswith("models/model.json"))
    p = _archive.reseal(ms + [(f"{root}/models/evil.json", model), (f"{root}/data/sample_inputs/evil.pt", pickle_payload(str(marker)))],
                        tmp_path / "two.pt2")
    with pytest.raises(UnsafeArtifactError, match=r"member 'models/evil.json' does not belong in a qexport program"):
        qexport.load(p)
    assert not marker.exists()


@pytest.mark.parametrize("name, words", [
    ("{root}/../escaped", "climbs out"),
    ("/tmp/escaped", "absolute"),
    ("{root}/data\\..\\escaped", "absolute, empty or climbs out"),
    ("{root}/data/weights/weight_0/../../x", "climbs out"),
    ("other/x", "outside the archive's root folder"),
    ("{root}/data/we\x1bights", "characters qexport never writes"),
    ("{root}/data/ｗeights/x", "characters qexport never writes"),  # fullwidth: NFKC makes it 'weights'
    ("{root}/Archive_format", "differ only in case"),
])
def test_member_names_that_could_land_elsewhere(pt2, tmp_path, torch_never_reads, name, words):
    ms = members(pt2)
    root = ms[0][0].split("/")[0]
    p = _archive.reseal(ms + [(name.format(root=root), b"x")], tmp_path / "n.pt2")
    with pytest.raises(UnsafeArtifactError, match=words):
        qexport.load(p)


def test_symlink_member(pt2, tmp_path, torch_never_reads):
    p = tmp_path / "link.pt2"
    with zipfile.ZipFile(p, "w") as z:
        for n, d in members(pt2):
            z.writestr(zipfile.ZipInfo(n), d)
        link = zipfile.ZipInfo(members(pt2)[0][0].split("/")[0] + "/data/link")
        link.external_attr = 0o120777 << 16
        z.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArtifactError, match="is a link or a folder"):
        qexport.load(p)


def test_a_replaced_member_fails_its_digest(pt2, tmp_path, torch_never_reads):
    ms = [(n, bytes(len(d)) if n.endswith("weights/weight_0") else d) for n, d in members(pt2)]
    with pytest.raises(UnsafeArtifactError, match=r"member 'data/weights/weight_0' does not match the SHA-256"):
        qexport.load(stale(ms, pt2, tmp_path / "swapped.pt2"))


def _overlapping_zip(n: int) -> bytes:
    """A stored zip of `n` members whose data each run to the end of the local headers (CRCs right):
    zipfile reads every one, n times the file's size in all."""
    import struct
    import zlib

    names = [b"m/archive_format"] + [b"m/data/f%06d" % i for i in range(n)]
    local, offsets = bytearray(), []
    for name in names:
        offsets.append(len(local))
        local += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0) + name
    central = bytearray()
    for name, at in zip(names, offsets):
        span = bytes(local[at + 30 + len(name):])
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, zlib.crc32(span), len(span), len(span),
                               len(name), 0, 0, 0, 0, 0o100644 << 16, at) + name
    return bytes(local + central + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(names), len(names), len(central), len(local), 0))


def test_overlapping_members_are_refused_before_any_is_read(tmp_path, monkeypatch):
    p = tmp_path / "overlap.pt2"
    p.write_bytes(_overlapping_zip(200))
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda *a: pytest.fail("a member was read"))
    for fn in (qexport.load, qexport.inspect):
        with pytest.raises(CorruptArtifactError, match="overlaps the member before it"):
            fn(p)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_many_members_one_named_twice(pt2, tmp_path, torch_never_reads):
    """Finding the duplicate among 20,000 names is linear (it was quadratic: minutes)."""
    ms = members(pt2)
    root = ms[0][0].split("/")[0]
    many = [(f"{root}/data/x{i}", b"") for i in range(20_000)]
    p = _archive.reseal(ms + many + [many[0]], tmp_path / "many.pt2")
    with pytest.raises(UnsafeArtifactError, match="members named twice"):
        qexport.load(p)


def test_damaged_zip_headers_are_refused(pt2, tmp_path, torch_never_reads):
    """A flipped bit in a timestamp touches no member; the file still is not what qexport wrote."""
    data = bytearray(pt2.read_bytes())
    data[10] ^= 1  # the first local header's modification time
    p = tmp_path / "headers.pt2"
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="headers are not the ones qexport writes"):
        qexport.load(p)


def test_edited_manifest_fails_its_digest(pt2, tmp_path):
    p = stale(with_manifest(members(pt2), lambda m: m["extra"].update(x=1)), pt2, tmp_path / "m.pt2")
    for fn in (qexport.load, qexport.inspect):
        with pytest.raises(CorruptArtifactError, match="manifest's digest .* does not match"):
            fn(p)


def test_huge_tensor_metadata_over_an_empty_member(pt2, tmp_path, monkeypatch):
    def edit(n, d):
        if n.endswith("model_weights_config.json"):
            cfg = json.loads(d)
            meta = cfg["config"]["layers.0.weight"]["tensor_meta"]
            meta["sizes"], meta["strides"] = [{"as_int": 1 << 20}, {"as_int": 1 << 14}], [{"as_int": 1 << 14}, {"as_int": 1}]
            return json.dumps(cfg).encode()
        return b"" if n.endswith("weights/weight_0") else d

    p = _archive.reseal([(n, edit(n, d)) for n, d in members(pt2)], tmp_path / "huge.pt2")
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: pytest.fail("torch would allocate 16 GB"))
    with pytest.raises(CorruptArtifactError, match=r"weight 'layers.0.weight': its metadata .* needs 17,179,869,184 bytes but its payload holds 0"):
        qexport.load(p)


@pytest.mark.parametrize("kind", ["pt2", "pte", "onnx"])
def test_a_huge_sparse_file_is_refused_before_it_is_read(demo, tmp_path, monkeypatch, kind):
    """Artifacts are checked in memory: a 30 GiB sparse file raised MemoryError out of qexport.load (and
    would read 30 GiB where memory allows) though its zip directory, or its missing checksum, shows it
    is no qexport artifact. A sealed one too large for memory is an ArtifactError."""
    src = (demo / f"model.{kind}").read_bytes()
    big = tmp_path / f"big.{kind}"
    with open(big, "wb") as f:  # a zip's directory at the end, or a .pte/.onnx head and no checksum
        f.write(b"" if kind == "pt2" else src[:4096])
        f.truncate(30 << 30)
        f.seek(0, 2)
        f.write(src if kind == "pt2" else b"")
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda q: pytest.fail(f"read {q}") if q.name == big.name else read_bytes(q))
    for open_ in ([qexport.load] if kind == "pt2" else []) + [runners.load]:
        with pytest.raises(CorruptArtifactError, match="that no member holds|no qexport checksum|not a qexport artifact"):
            open_(big)

    def no_memory(q):
        raise MemoryError()

    monkeypatch.setattr(Path, "read_bytes", no_memory)
    with pytest.raises(ArtifactError, match="more than this process can hold in memory"):
        runners.load(demo / f"model.{kind}")


@pytest.mark.parametrize("expr", [
    "__import__('os').mkdir({marker!r})",  # sympify evaluates a string as Python
    "exec(bytes((105, 109)))",  # no attribute, no quote: names are what matters
    "Symbol('s0').__class__",
    "Pow(Integer(9), Integer(99999999999999))",  # evaluated exactly by sympy: a hang
])
def test_symbolic_shapes_are_never_evaluated_as_python(pt2, tmp_path, torch_never_reads, expr):
    """torch.export.load builds symbolic sizes with sympy.sympify(expr_str), which runs Python; a
    resealed program with code there is refused before torch reads it, whatever the entry point."""
    marker = tmp_path / "ran"

    def edit(n, d):
        if not n.endswith("models/model.json"):
            return d
        graph = json.loads(d)
        values = graph["graph_module"]["graph"]["tensor_values"]
        values[next(iter(values))]["sizes"][0] = {"as_expr": {"expr_str": expr.format(marker=str(marker)), "hint": {"as_int": 4}}}
        return json.dumps(graph).encode()

    refused_everywhere(pt2, tmp_path / "sym.pt2", edit, "symbolic shape .* not a shape expression torch writes")
    assert not marker.exists()


def test_symbolic_shapes_torch_writes_pass_the_check():
    from serializers.pt2 import _safe_guard, _safe_shape_expr

    for expr in ("Add(Symbol('s17', positive=True, integer=True), Integer(-1))", "FloorDiv(s0, 2) + 1", "-int_oo",
                 "StrictLessThan(Symbol('s0'), Integer(3))", "Pow(Symbol('s0'), Integer(2))", "Float('1.5', precision=53)"):
        assert _safe_shape_expr(expr), expr
    # guards torch.export writes (a dynamic reshape's, a branch on a size's), and the forms its printer uses
    for guard in ("L['x'].size()[1] >= 3", "(L['x'].size()[1]*L['x'].size()[0]) == (2*((L['x'].size()[1]*L['x'].size()[0]) // 2))",
                  "L['args'][0].stride()[0] == 1", "L['kwargs']['mask'].size()[0] <= 64", "torch.sym_max(L['x'].size()[0], 2) == 4",
                  "math.floor(L['x'].size()[0] / 2) == 3", "not (L['x'].size()[0]**2 == 3)",
                  "L['d']['input-ids'].size()[0] <= L['d']['mask x'].size()[0]"):
        assert _safe_guard(guard), guard


@pytest.mark.parametrize("guard", [
    "__import__('os').mkdir({marker!r}) == 0",  # pasted into torch._assert(...): ran on every call of the program
    "1 #\n)\n__import__('os').mkdir({marker!r})\ndef _(*args):\n  torch._assert(1",  # a statement: ran as it loaded
    "L['x'].__class__.__init__ == 1",
    "L['x'].size()[0] ** 10 ** 19 == 1",  # an exact, endless computation on each call
    "L['x'].size() * 2 ** 40 == 1",  # a tuple of 2**40 sizes on each call
])
def test_guards_are_never_run_as_python(pt2, tmp_path, torch_never_reads, guard):
    """ep.module() execs a program's guards_code as Python (every runner, verify, bench, serve call it);
    a resealed program with code there is refused before torch reads it."""
    marker = tmp_path / "ran"

    def edit(n, d):
        if not n.endswith("models/model.json"):
            return d
        graph = json.loads(d)
        graph["guards_code"] = [guard.format(marker=str(marker))]
        return json.dumps(graph).encode()

    refused_everywhere(pt2, tmp_path / "guard.pt2", edit, "input guard .* not a check torch writes")
    assert not marker.exists()


def _renamed(value, old: str, new: str):
    """`value` (a program's JSON) with the tensor `old` named `new` everywhere."""
    if isinstance(value, dict):
        return {(new if k == old else k): (new if k == "name" and v == old else _renamed(v, old, new)) for k, v in value.items()}
    return [_renamed(v, old, new) for v in value] if isinstance(value, list) else value


def _keyed_samples(key: str) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save((({key: torch.randn(4, 64)},), {}), buf)
    return buf.getvalue()


@pytest.mark.parametrize("edit", ["input_name", "example_input_key"])
def test_names_torch_pastes_into_python_are_identifiers(pt2, tmp_path, torch_never_reads, edit):
    """torch.export.load writes a program's forward from its placeholders' names as the file has them
    (an input named `x=__import__('os')...` ran inside qexport.load) and ep.module() pastes the example
    inputs' dict keys into its guards' messages (a key with a double quote ran on every call)."""
    marker = tmp_path / "ran"
    code = f"__import__('os').mkdir({str(marker)!r})"

    def change(n, d):
        if n.endswith("models/model.json"):
            graph = json.loads(d)
            if edit == "input_name":
                graph["graph_module"] = _renamed(graph["graph_module"], "x", f"x={code}")
            return json.dumps(graph).encode()
        if n.endswith("sample_inputs/model.pt") and edit == "example_input_key":
            return _keyed_samples(f'" + str({code.replace(chr(39), chr(34))}) + "')
        return d

    refused_everywhere(pt2, tmp_path / "named.pt2", change, "which torch would paste into the Python source it runs")
    assert not marker.exists()


@pytest.mark.parametrize("node", [
    {"type": "builtins.dict", "context": json.dumps([{"__enum__": True, "fqn": "this:s", "name": "x"}]),
     "children_spec": [{"type": None, "context": None, "children_spec": []}]},
    {"type": "collections.defaultdict", "children_spec": [],
     "context": {"default_factory_module": "this", "default_factory_name": "s", "dict_context": []}},
], ids=["enum_key", "defaultdict_factory"])
def test_specs_never_import_what_the_file_names(pt2, tmp_path, torch_never_reads, node):
    """torch's treespec reader imports the module an enum context or a defaultdict's factory names
    (`this` printed the Zen of Python inside qexport.load: any installed module's top-level code)."""
    def change(n, d):
        if not n.endswith("models/model.json"):
            return d
        graph = json.loads(d)
        graph["graph_module"]["module_call_graph"][0]["signature"]["out_spec"] = json.dumps([1, node])
        return json.dumps(graph).encode()

    refused_everywhere(pt2, tmp_path / "spec.pt2", change, "out_spec names 'this.*, which torch's reader would import")


def test_example_inputs_that_do_not_fit_the_program(pt2, tmp_path):
    """Three stored example inputs for a one-input program: qexport.load returned it, and ep.module()
    (every runner) raised TypeError; `qexport verify` printed a traceback."""
    import io

    buf = io.BytesIO()
    torch.save(((torch.randn(4, 64),) * 3, {}), buf)
    p = _archive.reseal([(n, buf.getvalue() if n.endswith("sample_inputs/model.pt") else d) for n, d in members(pt2)],
                        tmp_path / "samples.pt2")
    for fn in (qexport.load, runners.load):
        with pytest.raises(CorruptArtifactError, match="torch cannot make a module of this program .TypeError"):
            fn(p)


def _from_file_call(created: Path) -> dict:
    return dict(target="torch.ops.aten.from_file.default", inputs=[
        {"name": "filename", "arg": {"as_string": str(created)}, "kind": 1},
        {"name": "shared", "arg": {"as_bool": True}, "kind": 1}, {"name": "size", "arg": {"as_int": 512}, "kind": 1}])


def _passed_to_strict_mode(op: str):
    """strict_mode(op, operands) runs op(*operands): the operator reaches the program as an argument."""
    return lambda created: dict(target="torch.ops.higher_order.strict_mode", inputs=[
        {"name": "", "arg": {"as_operator": op}, "kind": 1}, {"name": "", "arg": {"as_strings": [str(created)]}, "kind": 1}])


@pytest.mark.parametrize("call, words", [
    (_from_file_call, "calls 'torch.ops.aten.from_file.default', which reads or writes files"),
    (_passed_to_strict_mode("torch.ops.aten.from_file.default"), "calls 'torch.ops.aten.from_file.default', which reads"),
    (_passed_to_strict_mode("torch.os.system"), "hands 'torch.os.system' to an operator as an argument"),
    (lambda created: dict(target="torch.ops.aten._print.default", inputs=[
        {"name": "s", "arg": {"as_string": "\x1b[2J verify: pass"}, "kind": 1}]), "calls 'torch.ops.aten._print.default', which"),
])
def test_a_program_that_would_touch_files_is_refused(pt2, tmp_path, torch_never_reads, call, words):
    """aten.from_file(filename, shared=True, size) in a resealed .pt2 loaded, and created the file when
    verify or bench ran the program; handed to strict_mode as an argument it loaded, and ran, after the
    check of node targets; aten._print printed raw escapes into verify's output."""
    from serializers.pt2 import _reaches_outside

    created = tmp_path / "created"

    def edit(n, d):
        if not n.endswith("models/model.json"):
            return d
        graph = json.loads(d)
        node = next(x for x in graph["graph_module"]["graph"]["nodes"] if x["target"] == "torch.ops.aten.relu.default")
        node.update(call(created))
        return json.dumps(graph).encode()

    refused_everywhere(pt2, tmp_path / "file.pt2", edit, words)
    assert not created.exists()
    assert [_reaches_outside(f"torch.ops.{t}") for t in ("aten.save.default", "debugprims.load_tensor.default",
            "_c10d_functional.all_reduce.default", "higher_order.print", "aten.relu.default", "aten.div.Tensor_mode",
            "higher_order.invoke_quant_packed")] == [True, True, True, True, False, False, False]


def test_a_manifest_without_digests_is_refused(pt2, tmp_path):
    ms = with_manifest(members(pt2), lambda m: m.pop("members"))
    text = next(d for n, d in ms if n.endswith(MANIFEST_MEMBER))
    _archive.write_archive(ms, tmp_path / "old.pt2", _archive.manifest_comment(text))
    with pytest.raises(UnsafeArtifactError, match="records no member digests .*re-save"):
        qexport.load(tmp_path / "old.pt2")


def test_pinned_digest(pt2, tmp_path):
    sha = hashlib.sha256(pt2.read_bytes()).hexdigest()
    assert qexport.load(pt2, expected_sha256=sha.upper()) is not None
    assert runners.load(pt2, expected_sha256=sha).kind == "pt2"
    # a file rebuilt with fresh digests passes every other check; the pin still refuses it
    rebuilt = _archive.reseal(with_manifest(members(pt2), lambda m: m["extra"].update(x=1)), tmp_path / "rebuilt.pt2")
    qexport.load(rebuilt)
    with pytest.raises(UnsafeArtifactError, match=f"not the expected {sha}"):
        qexport.load(rebuilt, expected_sha256=sha)


@pytest.mark.parametrize("pin", [123, b"ab" * 32, "xyz", "", ["a" * 64]])
def test_a_pin_that_is_no_sha256_is_a_usage_error(demo, pin, monkeypatch):
    """An int raised AttributeError out of qexport.load (and "cannot be loaded as pt2", blaming the file,
    out of runners.load); "xyz" was reported as a file that is not the one pinned."""
    monkeypatch.setattr(Path, "read_bytes", lambda q: pytest.fail(f"read {q} before checking the pin"))
    for open_, name in ((qexport.load, "model.pt2"), (qexport.load_compiled, "model_aoti.pt2"), (runners.load, "model.onnx")):
        with pytest.raises(UsageError, match="is not a SHA-256: give the 64 hex digits"):
            open_(demo / name, expected_sha256=pin)


# -- AOTI packages -------------------------------------------------------------------------------

def _tmp_children() -> set[str]:
    import tempfile

    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("qexport-aoti.")}


@pytest.mark.parametrize("src, name", [("model_aoti.pt2", "m.pte"), ("model_aoti.pt2", "m.onnx"), ("model.pt2", "m.pte"),
                                       ("model.pte", "m.pt2"), ("model.pte", "m.onnx")])
def test_a_file_named_as_another_kind_is_opened_as_neither(demo, tmp_path, capsys, monkeypatch, src, name):
    """An AOTI package (native code) renamed model.pte had its library loaded by `qexport verify`, where the
    docs say a .pte cannot run code; a .pte renamed .pt2 ran as ExecuTorch. People choose what to open
    by its name, so a name that says another kind is refused by every opener, naming the rename."""
    from qexport.cli import main

    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: pytest.fail("a renamed package was loaded"))
    p = tmp_path / name
    p.write_bytes((demo / src).read_bytes())
    for open_ in (qexport.inspect, runners.load, qexport.load, qexport.load_compiled):
        with pytest.raises(ArtifactError, match=r"though its name says .*: rename it to end in \.pt"):
            open_(p)
    assert main(["verify", str(demo / "model.pt2"), str(p)]) == 1 and "though its name says" in capsys.readouterr().out


def test_load_compiled_calls_a_damaged_package_damaged(demo, tmp_path):
    """A cut AOTI package is claimed by the .pt2 kind (as every damaged zip): load_compiled said "a qexport
    program (.pt2) ...; use qexport.load", which then said it was damaged."""
    p = tmp_path / "cut_aoti.pt2"
    p.write_bytes((demo / "model_aoti.pt2").read_bytes()[:100_000])
    with pytest.raises(CorruptArtifactError, match="not a zip archive, or a truncated one"):
        qexport.load_compiled(p)


def test_aoti_swapped_library_is_never_loaded(demo, tmp_path, torch_never_reads):
    src = demo / "model_aoti.pt2"
    def flip(d: bytes) -> bytes:
        mid = len(d) // 2
        return d[:mid] + bytes([d[mid] ^ 0xFF]) + d[mid + 1:]

    ms = [(n, flip(d) if n.endswith(".so") else d) for n, d in members(src)]
    p = stale(ms, src, tmp_path / "swapped.pt2")
    for fn in (qexport.load_compiled, runners.load):
        with pytest.raises(UnsafeArtifactError, match=r"\.so' does not match the SHA-256"):
            fn(p)


def test_aoti_escaping_member_writes_nothing(demo, tmp_path, torch_never_reads):
    src = demo / "model_aoti.pt2"
    ms = members(src)
    root = ms[0][0].split("/")[0]
    target = tmp_path / "escaped"
    p = _archive.reseal(ms + [(f"{root}/data/aotinductor/model/../../../{'../' * 20}{str(target).lstrip('/')}", b"x")],
                        tmp_path / "escape.pt2")
    with pytest.raises(UnsafeArtifactError, match="climbs out"):
        qexport.load_compiled(p)
    assert not target.exists()


def test_aoti_pinned_digest_and_private_folder(demo, tmp_path):
    src = demo / "model_aoti.pt2"
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    with pytest.raises(UnsafeArtifactError, match="not the expected"):
        qexport.load_compiled(src, expected_sha256="0" * 64)
    # a dead process's extraction folder is swept by the next load
    import tempfile

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Path(tempfile.gettempdir()) / f"qexport-aoti.{child.stdout.strip()}.left"
    (dead / "aotinductor_x").mkdir(parents=True)
    before = _tmp_children() - {dead.name}
    compiled = qexport.load_compiled(src, expected_sha256=sha)
    assert not dead.exists()
    mine = _tmp_children() - before
    assert len(mine) == 1, "torch unpacks the package inside qexport's private folder"
    inputs = runners.make_inputs(runners.load(demo / "model.pt2").inputs)
    out = torch.utils._pytree.tree_leaves(compiled(*inputs))
    assert out and all(torch.isfinite(t).all() for t in out)
    del compiled
    gc.collect()
    assert _tmp_children() - before == set()


# -- .pte ----------------------------------------------------------------------------------------

def test_pte_checksum(demo, tmp_path):
    data = (demo / "model.pte").read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    (tmp_path / "flip.pte").write_bytes(bytes(flipped))
    (tmp_path / "cut.pte").write_bytes(data[:-7])
    with pytest.raises(CorruptArtifactError, match="does not match its checksum"):
        runners.load(tmp_path / "flip.pte")
    with pytest.raises(CorruptArtifactError, match="no qexport checksum"):
        qexport.inspect(tmp_path / "cut.pte")


@pytest.mark.parametrize("where", ["initializer", "node attribute"])
def test_onnx_tensors_never_read_other_files(demo, tmp_path, monkeypatch, where):
    """onnxruntime resolves external data of a model given as bytes against the working directory and
    refuses only absolute paths: `../` reached any file. qexport writes none, so none is read."""
    import onnx
    import onnxruntime

    from serializers import onnx as onnx_file

    (tmp_path / "secret.bin").write_bytes(bytes(1 << 16))
    model = onnx.load_model_from_string(onnx_file.read_checked(demo / "model.onnx"))
    tensor = model.graph.initializer[0] if where == "initializer" else onnx.helper.make_tensor("c", onnx.TensorProto.FLOAT, [4], [0.0] * 4)
    if where == "node attribute":
        model.graph.node.append(onnx.helper.make_node("Constant", [], ["c_out"], value=tensor))
        tensor = model.graph.node[-1].attribute[0].t
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=f"../{tmp_path.name}/secret.bin")
    p = tmp_path / "ext.onnx"
    p.write_bytes(model.SerializeToString())
    onnx_file.seal(p)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: pytest.fail("onnxruntime got the model"))
    for fn in (runners.load, qexport.inspect):
        with pytest.raises(UnsafeArtifactError, match="reads its data from another file .*secret.bin"):
            fn(p)


def test_generated_inputs_are_bounded(demo, tmp_path, capsys):
    """Input shapes come from the file (an .onnx's inputs here): a declared (2**36, 64) input was a
    16 TiB allocation in bench and verify, raised as a RuntimeError."""
    import onnx

    from qexport.cli import main
    from serializers import onnx as onnx_file

    model = onnx.load_model_from_string(onnx_file.read_checked(demo / "model.onnx"))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1 << 36
    p = tmp_path / "wide.onnx"
    p.write_bytes(model.SerializeToString())
    onnx_file.seal(p)
    with pytest.raises(ArtifactError, match=r"has shape \(68719476736, .*which qexport does not generate"):
        runners.make_inputs(runners.load(p).inputs)
    assert main(["bench", str(p)]) == 1
    assert "give inputs of your own (qexport bench --input SHAPE)" in capsys.readouterr().err


def test_a_runtime_abort_is_caught_in_the_child(demo, tmp_path, monkeypatch):
    """The first load of a file's bytes runs in a forked child: an abort there is an error here."""
    import serializers.pte as pte

    p = tmp_path / "m.pte"
    p.write_bytes((demo / "model.pte").read_bytes())
    monkeypatch.setattr(pte, "_PROBED", set())
    monkeypatch.setattr(pte, "_load_all", lambda *args: os.abort())
    with pytest.raises(CorruptArtifactError, match=r"the runtime died \(SIGABRT\) loading it"):
        runners.load(p)
    monkeypatch.undo()
    assert runners.load(p).kind == "pte"


def _tied_copy(tied_pte, where: Path, file: str = "m.pte", **record) -> Path:
    """The tied .pte copied to `where` as `file` (its data file as tied.ptd beside it), its data file
    record changed by `record` and the file resealed (what anyone editing it on purpose can do)."""
    import dataclasses
    import shutil

    import serializers.pte as pte

    src = tied_pte[2]
    where.mkdir(exist_ok=True)
    shutil.copy(src.with_suffix(".ptd"), where / "tied.ptd")
    body = src.read_bytes()[:-(len(pte.TRAILER_MAGIC) + 32)]
    program, rec = pte.DataFile.split(src, body)
    p = where / file
    p.write_bytes(program + dataclasses.replace(rec, **record).record())
    pte.seal(p)
    return p


def test_pte_data_file_is_checked_before_the_runtime_reads_it(tied_pte, tmp_path):
    p = _tied_copy(tied_pte, tmp_path)
    d = tmp_path / "tied.ptd"
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    assert runners.load(p, expected_sha256=sha).kind == "pte"  # a renamed .pte still finds its data file
    good = d.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x04
    d.write_bytes(bytes(damaged))
    for open_ in (runners.load, qexport.inspect, lambda q: runners.load(q, expected_sha256=sha)):
        with pytest.raises(CorruptArtifactError, match="tied.ptd does not match the SHA-256"):
            open_(p)
    with open(d, "r+b") as f:  # grown to 16 GiB (sparse): refused by its size, unread
        f.truncate(1 << 34)
    with pytest.raises(CorruptArtifactError, match=f"is {1 << 34} bytes, but the program was written with a {len(good)}-byte"):
        runners.load(p)
    d.rename(tmp_path / "renamed.ptd")
    with pytest.raises(ArtifactNotFoundError, match=r"its shared weights are in tied.ptd, which is not beside it"):
        qexport.inspect(p)
    d.mkdir()
    with pytest.raises(ArtifactError, match="is not a file"):
        runners.load(p)


def test_the_runtime_reads_a_private_copy_of_the_checked_data_file(tied_pte, tmp_path, monkeypatch):
    """ExecuTorch reads a data file by path; it is given a private copy of the bytes qexport hashed, so
    a file swapped on disk between the check and the runtime's read never reaches it."""
    from executorch.runtime import Runtime

    p = _tied_copy(tied_pte, tmp_path)
    seen = []
    load_program = Runtime.load_program

    def spy(self, data, **kw):
        seen.append(kw.get("data_path"))
        return load_program(self, data, **kw)

    monkeypatch.setattr(Runtime, "load_program", spy)
    runner = runners.load(p)
    (given,) = seen
    assert Path(given).resolve() != (tmp_path / "tied.ptd").resolve()
    assert Path(given).read_bytes() == (tmp_path / "tied.ptd").read_bytes()
    (tmp_path / "tied.ptd").unlink()  # the loaded program keeps its copy
    assert runner([tied_pte[1]])[0].shape == (8, 80, 64)


@pytest.mark.parametrize("name", ["../tied.ptd", "/tmp/tied.ptd", "sub/tied.ptd", "..\\tied.ptd", "C:tied.ptd",
                                  "tied.ptd\n", "..", "tied.bin"])
def test_pte_data_file_names_only_a_file_beside_it(tied_pte, tmp_path, name):
    """A data file record naming anything but a plain `*.ptd` beside the .pte is refused, even where a
    valid data file sits at the path it names."""
    _tied_copy(tied_pte, tmp_path)  # a valid tied.ptd one level up
    p = _tied_copy(tied_pte, tmp_path / "sub", name=name)
    with pytest.raises(UnsafeArtifactError, match="not a plain"):
        runners.load(p)


# -- atomic writes -------------------------------------------------------------------------------

def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def test_a_killed_writers_folder_is_swept_by_the_next_write_and_load(pt2, tmp_path):
    from serializers.files import _HOST

    ep = qexport.load(pt2)
    dead = tmp_path / f".model.pt2.{_dead_pid()}@{_HOST}.abc_123.tmp"
    dead.mkdir()
    (dead / "model.pt2").write_bytes(b"PK\x03\x04 half")
    live = tmp_path / f".model.pt2.{os.getppid()}@{_HOST}.def_456.tmp"  # a running writer's folder is kept
    live.mkdir()
    elsewhere = tmp_path / f".model.pt2.{_dead_pid()}@00000000.ghi_789.tmp"  # another machine's pid: not ours to judge
    elsewhere.mkdir()
    qexport.save(ep, tmp_path / "model.pt2")
    assert sorted(os.listdir(tmp_path)) == sorted(["model.pt2", live.name, elsewhere.name])
    dead.mkdir()
    qexport.inspect(tmp_path / "model.pt2")
    assert not dead.exists()


def test_a_real_kill_during_save_leaves_nothing_after_the_next_load(pt2, tmp_path):
    code = (
        "import os, signal, torch, qexport\n"
        f"ep = qexport.load({str(pt2)!r})\n"
        "real = torch.export.save\n"
        "def save(ep, f, **kw):\n"
        "    real(ep, f, **kw)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.export.save = save\n"
        f"qexport.save(ep, {str(tmp_path / 'model.pt2')!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert r.returncode == -9
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")], "the killed writer left its folder"
    (tmp_path / "model.pt2").write_bytes(pt2.read_bytes())
    qexport.load(tmp_path / "model.pt2")
    assert os.listdir(tmp_path) == ["model.pt2"]


# -- bad user input ------------------------------------------------------------------------------

def _meta_mlp():
    with torch.device("meta"):
        return TinyNet((64, 128, 32))


def _nan_mlp():
    m = TinyNet((64, 128, 32))
    m.layers[0].weight.data[0, 0] = float("nan")
    return m


@pytest.mark.parametrize("call, error, words", [
    (lambda: qexport.quantize(nn.Sequential(nn.Linear(64, 0)), "int8_weight_only"), UnsupportedModuleError, "zero-size weight"),
    (lambda: qexport.quantize(_nan_mlp(), "int8_weight_only"), UnsupportedModuleError, "layers.0.weight holds NaN or inf"),
    (lambda: qexport.quantize(_meta_mlp(), "int8_weight_only"), UnsupportedModuleError, "on the meta device"),
    (lambda: qexport.quantize(TinyNet((64, 128, 32)), "int8_static", calibration_data=[(torch.randn(4, 10),)]),
     CalibrationError, r"raised on calibration batch 0 \(RuntimeError"),
    (lambda: qexport.quantize(TinyNet((64, 128, 32)), "int8_static", calibration_data=3), CalibrationError, "must be an iterable"),
    (lambda: qexport.quantize(TinyNet((64, 128, 32)), "int8_static", calibration_data=[(torch.full((4, 64), float("nan")),)]),
     CalibrationError, "batch 0 holds NaN or inf"),
    (lambda: qexport.export(_meta_mlp(), (torch.randn(4, 64),)), ExportError, "layers.0.weight is on the meta device"),
    (lambda: qexport.export(qexport.quantize(TinyNet((64, 128, 32)), "int8_weight_only"), (torch.ones(4, 64, dtype=torch.int64),)),
     ExportError, "gets a torch.int64 activation"),
])
def test_bad_input_fails_first_with_the_fix(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_bad_input_leaves_the_model_as_it_was():
    m = TinyNet((64, 128, 32))
    with pytest.raises(CalibrationError):
        qexport.quantize(m, "int8_static", calibration_data=[(torch.randn(4, 64),), (torch.randn(4, 10),)])
    assert all(type(layer) is nn.Linear for layer in m.layers if not isinstance(layer, nn.ReLU))


def test_cli_target_that_exits():
    from qexport.cli._common import build_model

    with pytest.raises(UsageError, match=r"sys:exit.*exited the program"):
        build_model("sys:exit")


def test_save_where_nothing_can_be_written(pt2):
    with pytest.raises(ArtifactError, match="cannot write in /proc"):
        qexport.save(qexport.load(pt2), "/proc/model.pt2")


def test_inspect_prints_hostile_manifest_text_escaped(pt2, tmp_path, capsys):
    from qexport.cli import main

    def edit(m):
        m["regions"][0]["name"] = m["regions"][0]["module_path"] = "\x1b]0;owned\x07\x1b[2J" + "A" * 500
        m["regions"][0]["weight_bytes"] = 10 ** 400
        m["quantized_bytes"] = 10 ** 400
        m["extra"]["note"] = "\x1b[31mred"
        m["extra"]["cpu_target"] = {"arch": "\x1b[2J", "capability": "AVX2", "march": "\x1b[2J", "requires": ["\x1b[31mavx2"]}

    p = _archive.reseal(with_manifest(members(pt2), edit), tmp_path / "loud.pt2")
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned" in out and "401-digit" in out


def test_cli_errors_and_tables_print_no_escapes(tmp_path, capsys):
    """A file's name and contents reach error messages and tables (bench, verify) as well as inspect."""
    from qexport.cli import main

    p = tmp_path / "a\x1b]0;owned\x07\x1b[2J.pt2"
    p.write_bytes(b"PK\x03\x04 not a zip")
    assert main(["inspect", str(p)]) == 1
    assert main(["bench", str(p), "--input", "4,64"]) == 1
    out = capsys.readouterr()
    assert "\x1b" not in out.out + out.err and "\x07" not in out.out + out.err
    assert "\\x1b]0;owned" in out.err


def test_cli_pins(demo, capsys):
    from qexport.cli import main

    pkg = demo / "model_aoti.pt2"
    sha = hashlib.sha256(pkg.read_bytes()).hexdigest()
    assert main(["verify", str(demo / "model.pt2"), str(pkg), "--expected-sha256", f"{pkg}={sha}"]) == 0
    assert main(["verify", str(demo / "model.pt2"), str(pkg), "--expected-sha256", f"{pkg}={'0' * 64}"]) == 1
    assert f"SHA-256 is {sha}, not the expected" in capsys.readouterr().out
    assert main(["bench", str(pkg), "--expected-sha256", f"other.pt2={sha}"]) == 1
    assert "other.pt2 is not one of the files given" in capsys.readouterr().err


def _input(dtype="int64", values=None, shape=(1, 256)):
    return {"name": "x", "dtype": dtype, "shape": list(shape), **({} if values is None else {"values": values})}


@pytest.mark.parametrize("record, words", [
    *((_input(dtype, values), "an input's values") for dtype, values in [
        ("int64", [0, 2 ** 70]), ("int64", [5, 1]), ("int64", [0, 9.5]), ("int64", ["0", "9"]), ("int64", [[0], [9]]),
        ("int64", [0, 1, 2]), ("int64", {"lo": 0, "hi": 1}), ("uint8", [-5, 300]), ("int8", [0, 1000]),
        ("float32", [0, 10]), ("bool", [0, 1])]),
    *((_input("float32", shape=shape), "a dim is a size >= 0") for shape in [
        (1, -9), ({"name": "b", "min": 3, "max": 1}, 256), ({"name": "b", "min": -5, "max": None}, 256), (True, 256)]),
])
def test_hostile_input_records(demo, tmp_path, capsys, record, words):
    """An input record (`extra.inputs[]`: dims and the values of an index) reaches torch.randint and example
    sizes in bench and a server's limits: values [0, 2**70] or [-5, 300] for a uint8 crashed bench with
    ValueError / RuntimeError."""
    from qexport.cli import main
    from qexport.serve import signature

    def edit(m):
        m["extra"]["inputs"] = [record]

    pkg = _archive.reseal(with_manifest(members(demo / "model_aoti.pt2"), edit), tmp_path / "v_aoti.pt2")
    assert main(["inspect", str(pkg)]) == 0
    assert f"inputs: unreadable ({words}" in capsys.readouterr().out
    with pytest.raises(UsageError, match=f"input signature is unreadable: {words}"):
        signature(qexport.inspect(pkg))
    if record.get("values") == [0, 2 ** 70]:  # the one that loads the package (a second): bench asks for inputs
        assert main(["bench", str(pkg), "--warmup", "0", "--min-iters", "1", "--min-time", "0"]) == 1
        assert "input record is unreadable: qexport inspect says why" in capsys.readouterr().err


def test_hostile_sibling_groups_print_escaped_and_cut(demo, tmp_path, capsys):
    """`details.siblings` of an AOTI region (inspect's sibling groups) is the file's text: escapes, other
    types, 10**5 entries."""
    from qexport.cli import main

    def edit(m):
        for r, siblings in zip(m["regions"], (["\x1b]0;owned\x07", "b"], list(range(10 ** 5)), "\x1b[2J")):
            r["lowering"]["details"].update(siblings=siblings, stacked_out_features="\x1b[2J")

    pkg = _archive.reseal(with_manifest(members(demo / "model_aoti.pt2"), edit), tmp_path / "s_aoti.pt2")
    assert main(["inspect", str(pkg)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("one kernel each"))
    assert "\x1b" not in line and "\\x1b]0;owned\\x07 + b; 0 + 1 + 2" in line and len(line) <= 2000


def test_generated_index_inputs_stay_in_their_recorded_values():
    """bench draws an index input from its recorded values: [0, 2**63 - 1] overflowed randint's high
    (ValueError), and a range starting above 0 was drawn from 0."""
    from qexport.runtime.runner import input_infos
    from qexport.signature import InputSpec

    for dtype, values in (("int64", [0, 2 ** 63 - 1]), ("int64", [-2 ** 63, 2 ** 63 - 1]), ("uint8", [0, 255]), ("int16", [5, 6])):
        spec = InputSpec.from_json({"name": "ids", "dtype": dtype, "shape": [4, 64], "values": values})
        x = runners.make_inputs(input_infos([spec], generating=False))[0]
        assert x.dtype == getattr(torch, dtype) and max(values[0], 0) <= int(x.min()) <= int(x.max()) <= values[1]


def test_dim_names_that_are_not_text(pt2, tmp_path, capsys):
    """`extra.dim_names` renames torch's symbols in inspect's tables: `{"s1": 5}` raised TypeError."""
    from qexport.cli import main

    def edit(m):
        m["extra"]["dim_names"] = {"s1": 5, "s2": ["x"], "s3": "\x1b[2Jseq"}
        m["extra"]["inputs"] = [_input("float32", shape=({"name": n, "min": 1, "max": 4}, 64)) for n in ("s1", "s2", "s3")]

    assert main(["inspect", str(_archive.reseal(with_manifest(members(pt2), edit), tmp_path / "n.pt2"))]) == 0
    out = capsys.readouterr().out
    assert "inputs: x: float32[s1[1..4], 64], x: float32[s2[1..4], 64], x: float32[\\x1b[2Jseq[1..4], 64]" in out


@pytest.mark.parametrize("source, artifact", [("pt2", "pte"), ("pt2", "aoti"), ("aoti", "pt2"), ("aoti", "onnx")])
def test_a_manifest_must_describe_the_kind_of_file_it_is_in(pt2, demo, tmp_path, capsys, source, artifact):
    """Readers act on the manifest's `artifact`: a .pt2 whose manifest said "pte" loaded, and sent
    `qexport inspect` looking for a .pte's data file beside it (FileNotFoundError)."""
    from qexport.cli import main

    original = pt2 if source == "pt2" else demo / "model_aoti.pt2"
    edited = _archive.reseal(with_manifest(members(original), lambda m: m.update(artifact=artifact)), tmp_path / "k.pt2")
    words = f"its manifest describes a {artifact} artifact, but the file is {source}"
    for open_ in (qexport.inspect, runners.load):
        with pytest.raises(CorruptArtifactError, match=words):
            open_(edited)
    assert main(["inspect", str(edited)]) == 1 and words in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "cuda", 5, "\x1b[2J", ["cpu"]])
def test_aoti_manifest_device_must_be_the_compiled_codes(demo, tmp_path, device):
    """Runners move inputs to the manifest's `device`: "meta" over a CPU package segfaulted bench and
    generate; "cuda" over CPU code hands it pointers it cannot read."""
    pkg = _archive.reseal(with_manifest(members(demo / "model_aoti.pt2"), lambda m: m["extra"].update(device=device)),
                          tmp_path / "d_aoti.pt2")
    with pytest.raises(CorruptArtifactError, match=r"its manifest says device .* where its compiled code is for \['cpu'\]"):
        runners.load(pkg)
