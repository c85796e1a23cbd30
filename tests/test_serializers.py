"""serializers: .pt2 save/load round trips (every built-in scheme and a user scheme, in process and in a
fresh process, through qexport.load and torch.export.load), the manifest, inspect, and every way a
file can be refused."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from torch.export import Dim

import qexport
import serializers
from qexport import (
    ArtifactError, ArtifactNotFoundError, CorruptArtifactError, ManifestMismatchError,
    UnsafeArtifactError, UnsupportedVersionError,
)
from qexport.quantize import quantized_modules
from qexport.regions import HOP_TARGETS
from qexport.schemes import Scheme, SchemeMath
from serializers import MANIFEST_VERSION, Manifest, RegionRecord
from serializers import _archive
from serializers.pt2 import MANIFEST_NAME

from conftest import MLP, ConvNet, TiedLM, TinyTransformer, quantized, scheme_for

torch.manual_seed(0)


# -- a user-defined scheme family ---------------------------------------------------------------

class Int6Math(SchemeMath):
    """Symmetric per-channel 6-bit weights stored one per int8: a family qexport does not ship."""

    family = "test_int6"
    weight_roles = ("weight", "weight_scale")
    supported_ops = frozenset({"linear"})
    tolerance = 5e-2

    def quantize_weight(self, s, weight):
        w = weight.detach().float()
        scale = (w.abs().amax(1) / s.qmax).clamp(min=1e-12)
        return {"weight": torch.round(w / scale[:, None]).clamp(s.qmin, s.qmax).to(torch.int8), "weight_scale": scale}

    def dequantize_weight(self, s, t, shape):
        return t["weight"].float() * t["weight_scale"][:, None]


USER_SCHEME = Scheme(
    name="test_int6_weight_only", family="test_int6", weight_dtype="int6", bits=6, granularity="per_channel",
    qmin=-31, qmax=31, compute_dtype="float32",
)


@pytest.fixture(scope="module")
def user_scheme():
    qexport.schemes.register(USER_SCHEME, Int6Math())
    yield USER_SCHEME
    qexport.schemes.unregister(USER_SCHEME.name)


# -- artifacts, built once ----------------------------------------------------------------------

def hop_nodes(ep):
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target in HOP_TARGETS]


class Case:
    def __init__(self, key, model, args, ep, path, manifest):
        self.key, self.model, self.args, self.ep, self.path, self.manifest = key, model, args, ep, path, manifest
        with torch.no_grad():
            self.expected = model(*args)


def _make_case(root: Path, key: str, model: nn.Module, args: tuple, **export_kw) -> Case:
    ep = qexport.export(model, args, **export_kw)
    path = root / f"{key}.pt2"
    manifest = qexport.save(ep, path)
    return Case(key, model, args, ep, path, manifest)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, user_scheme) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("pt2")
    x = torch.randn(4, 64)
    out = {}
    for name in qexport.schemes.builtin_names():
        out[name] = _make_case(root, name, quantized(MLP(), scheme_for(name), (x,)), (x,))
    out["user"] = _make_case(root, "user", quantized(MLP(), user_scheme, (x,)), (x,))
    img = torch.randn(2, 3, 16, 16)
    out["conv_int8_static"] = _make_case(root, "conv_int8_static", quantized(ConvNet(), scheme_for("int8_static"), (img,)), (img,))
    idx = torch.randint(0, 128, (2, 8))
    out["transformer_dynamic"] = _make_case(
        root, "transformer_dynamic", quantized(TinyTransformer(), scheme_for("int4_weight_only"), (idx,)), (idx,),
        dynamic_shapes=({0: Dim("batch", max=64)},),
    )
    return out


ALL_KEYS = [*qexport.schemes.builtin_names(), "user", "conv_int8_static", "transformer_dynamic"]


def _graph_signature(ep) -> list:
    """What must survive a round trip: every node's op/target/args shape, and each region's kwargs
    and subgraph code."""
    out = []
    for n in ep.graph.nodes:
        item = [n.op, str(n.target), n.name]
        if n in hop_nodes(ep):
            item += [n.kwargs, getattr(ep.graph_module, n.args[0].target).code]
        out.append(item)
    return out


@pytest.mark.parametrize("key", ALL_KEYS)
def test_round_trip_in_process(cases, key):
    case = cases[key]
    for loaded in (qexport.load(case.path), torch.export.load(case.path)):
        assert len(hop_nodes(loaded)) == len(hop_nodes(case.ep)) == len(case.manifest.regions) > 0
        assert _graph_signature(loaded) == _graph_signature(case.ep)
        assert qexport.regions(loaded) == qexport.regions(case.ep)
        torch.testing.assert_close(loaded.module()(*case.args), case.expected, rtol=0, atol=0)
    assert [r.scheme for r in case.manifest.regions] == [r.scheme for r in qexport.regions(case.ep)]


def test_torch_returns_the_manifest_as_an_extra_file(cases):
    extra = {MANIFEST_NAME: ""}
    torch.export.load(cases["int8_dynamic"].path, extra_files=extra)
    assert Manifest.from_json(extra[MANIFEST_NAME]) == cases["int8_dynamic"].manifest


def test_user_scheme_survives(cases, user_scheme):
    m = qexport.inspect(cases["user"].path)
    assert {r.scheme for r in m.regions} == {user_scheme}
    assert m.regions[0].scheme.family == "test_int6"


def test_dynamic_dims_are_recorded_as_symbols(cases):
    case = cases["transformer_dynamic"]
    m = qexport.inspect(case.path)
    batch_dims = {r.input_shapes[0][0] for r in m.regions}
    assert all(isinstance(d, str) for d in batch_dims), batch_dims
    loaded = qexport.load(case.path)
    idx = torch.randint(0, 128, (5, 8))
    torch.testing.assert_close(loaded.module()(idx), case.model(idx), rtol=0, atol=0)


FRESH_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    index = json.loads(sys.argv[1])
    if index["import_qexport"]:
        import qexport
    from torch._higher_order_ops import invoke_quant_packed  # noqa: F401  (torch's own HOP)
    report = {}
    for key, item in index["cases"].items():
        args = torch.load(item["args"], weights_only=True)
        expected = torch.load(item["expected"], weights_only=True)
        loaders = {"torch": torch.export.load}
        if index["import_qexport"]:
            loaders["qexport"] = qexport.load
        for via, load in loaders.items():
            ep = load(item["path"])
            hops = [n for n in ep.graph.nodes if n.target is torch.ops.higher_order.invoke_quant_packed]
            report[f"{key}/{via}"] = {
                "equal": bool(torch.equal(ep.module()(*args), expected)),
                "options": [n.kwargs["quant_options"] for n in hops],
                "schemes": [n.kwargs["scheme"] for n in hops],
            }
        if index["import_qexport"]:
            report[f"{key}/inspect"] = qexport.inspect(item["path"]).to_dict()
    print(json.dumps(report))
    """
)


def _run_fresh(tmp_path: Path, cases: dict[str, Case], keys, import_qexport: bool) -> dict:
    index = {"import_qexport": import_qexport, "cases": {}}
    for key in keys:
        c = cases[key]
        torch.save(c.args, tmp_path / f"{key}.args.pt")
        torch.save(c.expected, tmp_path / f"{key}.expected.pt")
        index["cases"][key] = {"path": str(c.path), "args": str(tmp_path / f"{key}.args.pt"), "expected": str(tmp_path / f"{key}.expected.pt")}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_SCRIPT, json.dumps(index)], capture_output=True, text=True, timeout=300,
        cwd=tmp_path,  # nothing of the test's own modules (Int6Math) is importable there
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _options(ep) -> list:
    return [n.kwargs["quant_options"] for n in hop_nodes(ep)]


def test_round_trip_fresh_process(cases, tmp_path):
    """A process that imports qexport and nothing else (not the user scheme's module) loads every
    artifact, via qexport.load and torch.export.load, with the same regions and outputs."""
    report = _run_fresh(tmp_path, cases, ALL_KEYS, import_qexport=True)
    for key in ALL_KEYS:
        for via in ("qexport", "torch"):
            r = report[f"{key}/{via}"]
            assert r["equal"], f"{key} via {via}: outputs differ"
            assert r["options"] == _options(cases[key].ep), f"{key} via {via}: quant_options changed"
            assert r["schemes"] == [n.kwargs["scheme"] for n in hop_nodes(cases[key].ep)]
        assert Manifest.from_dict(report[f"{key}/inspect"]) == cases[key].manifest


def test_torch_alone_loads_a_qexport_artifact(cases, tmp_path):
    """torch.export.load needs nothing from qexport: the HOP is torch's and the options are JSON."""
    report = _run_fresh(tmp_path, cases, ["user", "nf4"], import_qexport=False)
    for key in ("user", "nf4"):
        assert report[f"{key}/torch"]["equal"]
        assert report[f"{key}/torch"]["options"] == _options(cases[key].ep)


# -- the manifest ------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [*qexport.schemes.builtin_names(), "conv_int8_static"])
def test_manifest_bytes_match_the_quantized_modules(cases, key):
    case = cases[key]
    m = case.manifest
    mods = dict(quantized_modules(case.model))
    assert [r.name for r in m.regions] == list(mods)
    for r in m.regions:
        assert r.weight_bytes == mods[r.name].quantized_bytes()
        assert r.float_bytes == mods[r.name].float_bytes()
        assert r.module_path == r.name and r.op in ("linear", "conv2d")
        assert r.weight_shape == mods[r.name].weight_shape
    assert m.quantized_bytes == sum(r.weight_bytes for r in m.regions)
    assert m.float_bytes == sum(r.float_bytes for r in m.regions)
    state = {**case.ep.state_dict, **case.ep.constants}
    assert m.quantized_bytes + m.other_bytes == sum(t.nbytes for t in state.values())
    assert m.artifact == "pt2" and m.version == MANIFEST_VERSION
    assert m.torch_version == torch.__version__ and m.qexport_version == qexport.__version__


class _TiedTwiceCalled(TiedLM):
    """GPT-2's tied wte / lm_head, and a head called twice: one set of quantized tensors read by three regions."""

    def forward(self, idx):
        h = self.emb(idx)
        return self.head(h) + self.head(h * 2)


def test_manifest_totals_count_tied_and_shared_tensors_once_as_the_file_stores_them(tmp_path):
    model = qexport.quantize(_TiedTwiceCalled().eval(), {nn.Embedding: "int8_weight_only", nn.Linear: "int8_weight_only"})
    ep = qexport.export(model, (torch.randint(0, 64, (2, 5)),))
    m = qexport.save(ep, tmp_path / "tied.pt2")
    assert [r.name for r in m.regions] == ["emb", "head", "head_1"] and len({r.weight_bytes for r in m.regions}) == 1
    with zipfile.ZipFile(tmp_path / "tied.pt2") as z:
        payloads = sum(i.file_size for i in z.infolist() if "/data/weights/weight_" in i.filename or "/data/constants/tensor_" in i.filename)
    assert m.quantized_bytes == m.regions[0].weight_bytes and m.float_bytes == 64 * 16 * 4
    assert m.quantized_bytes + m.other_bytes == payloads


def test_manifest_json_round_trip_and_forward_compatible_fields(cases):
    m = cases["int8_static"].manifest
    assert Manifest.from_json(m.to_json()) == m
    data = json.loads(m.to_json())
    data["a_field_from_a_newer_minor"] = 1
    data["regions"][0]["another_one"] = [1]
    assert Manifest.from_json(json.dumps(data)) == m
    rec = m.regions[0]
    assert RegionRecord.from_dict(rec.to_dict()) == rec


@pytest.mark.parametrize(
    "edit, error, words",
    [
        (lambda d: d.update(version=MANIFEST_VERSION + 1), UnsupportedVersionError, f"manifest version {MANIFEST_VERSION + 1}"),
        (lambda d: d["regions"][0]["scheme"].update(version=99), UnsupportedVersionError, "schema version 99"),
        (lambda d: d.update(format="something-else"), CorruptArtifactError, "not a qexport manifest"),
        (lambda d: d.update(version="1"), CorruptArtifactError, "manifest version '1'"),
        (lambda d: d.update(regions={}), CorruptArtifactError, "'regions' must be a list"),
        (lambda d: d["regions"][0].pop("op"), CorruptArtifactError, "lacks 'op'"),
        (lambda d: d["regions"][0].update(weight_bytes=-1), CorruptArtifactError, "weight_bytes"),
        (lambda d: d["regions"][0].update(input_shapes=[[1.5]]), CorruptArtifactError, "input_shapes"),
        (lambda d: d["regions"][0]["scheme"].update(colour="red"), CorruptArtifactError, "unknown scheme field"),
        # a scheme field a newer qexport added within scheme version 1 (as `algorithm` was): an upgrade, not damage
        (lambda d: (d.update(qexport_version="9.1.0"), d["regions"][0]["scheme"].update(rounding="nearest")),
         UnsupportedVersionError, "unknown scheme field(s) ['rounding']; known: ['name'"),
        (lambda d: (d.update(qexport_version="9.1.0"), d["regions"][0]["scheme"].update(algorithm="awq")),
         UnsupportedVersionError, "it was written by qexport 9.1.0: upgrade qexport"),
        (lambda d: d.update(artifact="zip"), CorruptArtifactError, "artifact 'zip'"),
    ],
)
def test_manifest_refuses(cases, edit, error, words):
    data = json.loads(cases["int8_weight_only"].manifest.to_json())
    edit(data)
    with pytest.raises(error, match="^model.pt2: ") as e:
        Manifest.from_json(json.dumps(data), source="model.pt2")
    assert words in str(e.value)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '{"format": "qexport-manifest", "version": NaN}', "\x00\xff"])
def test_manifest_bad_json(text):
    with pytest.raises(CorruptArtifactError, match="x.pt2"):
        Manifest.from_json(text, source="x.pt2")


def test_check_against_names_the_difference(cases):
    m = cases["int8_weight_only"].manifest
    m.check_against(cases["int8_weight_only"].ep)
    with pytest.raises(ManifestMismatchError, match="region 0 is 'layers.0' .*int8_weight_only.* but 'layers.0' .*int4_weight_only"):
        m.check_against(cases["int4_weight_only"].ep)
    other = cases["transformer_dynamic"].ep
    with pytest.raises(ManifestMismatchError, match=f"lists 2 regions, the graph has {len(hop_nodes(other))}"):
        m.check_against(other)


def test_manifest_extra_must_be_json(cases):
    ep = cases["int8_weight_only"].ep
    extra = Manifest.from_program(ep, note="ok", n=[1, 2]).extra
    assert extra == {"note": "ok", "n": [1, 2], "inputs": [{"name": "x", "dtype": "float32", "shape": [4, 64]}]}
    with pytest.raises(ArtifactError, match="JSON-serializable"):
        Manifest.from_program(ep, bad=object())
    with pytest.raises(ArtifactError, match="artifact='tar'"):
        Manifest.from_program(ep, artifact="tar")


def test_hand_written_region_counts_its_lifted_tensors(tmp_path):
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("codes", torch.randint(-8, 8, (16, 16), dtype=torch.int8))
            self.register_buffer("scale", torch.rand(16))

        def forward(self, x):
            fn = lambda x, c, s: (x @ (c.float() * s[:, None]).T,)  # noqa: E731
            return qexport.invoke_quant(fn, x, self.codes, self.scale, scheme="int8_weight_only")[0]

    model = Custom().eval()
    x = torch.randn(2, 16)
    ep = torch.export.export(model, (x,), strict=False)
    path = tmp_path / "custom.pt2"
    m = qexport.save(ep, path, extra={"author": "test"})
    (r,) = m.regions
    assert (r.op, r.module_path, r.name) == ("custom", "", "region_0")
    assert r.weight_bytes == 16 * 16 + 16 * 4 and r.float_bytes == 0
    assert r.input_shapes == ((2, 16),)
    assert m.extra == {"author": "test", "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 16]}]}
    torch.testing.assert_close(qexport.load(path).module()(x), model(x), rtol=0, atol=0)


# -- inspect -----------------------------------------------------------------------------------

def test_inspect_reads_only_the_manifest(cases, monkeypatch):
    def no(*a, **k):
        raise AssertionError("inspect must not deserialize the program")

    monkeypatch.setattr(torch.export, "load", no)
    assert qexport.inspect(cases["nf4"].path) == cases["nf4"].manifest
    assert serializers.inspect(str(cases["nf4"].path)) == cases["nf4"].manifest


def test_register_reader_dispatch(tmp_path, cases):
    import importlib

    registry = importlib.import_module("serializers.inspect")  # the module (serializers.inspect is the function)
    manifest = cases["int8_weight_only"].manifest
    good = tmp_path / "model.qxt"
    good.write_bytes(b"QXTEST" + manifest.to_json().encode())
    broken = tmp_path / "broken.qxt"
    broken.write_bytes(b"QXTEST{")
    calls = []

    def read(p: Path) -> Manifest:
        calls.append(p)
        data = p.read_bytes()[6:]
        if data == b"{":
            raise ValueError("truncated")
        return Manifest.from_json(data, source=str(p))

    serializers.register_reader("qxtest", lambda p, head: head.startswith(b"QXTEST"), read)
    try:
        assert qexport.inspect(good) == manifest and calls == [good]
        with pytest.raises(CorruptArtifactError, match=r"broken.qxt: not a readable qxtest artifact: ValueError: truncated"):
            qexport.inspect(broken)
        assert "qxtest" in registry.reader_kinds()
    finally:
        serializers.kinds.unregister("qxtest")
    with pytest.raises(ArtifactError):
        serializers.register_reader("", lambda p, h: True, read)


def test_inspect_unknown_file_lists_kinds(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(CorruptArtifactError, match=r"notes.txt: not a qexport artifact .*reads: .*pt2"):
        qexport.inspect(p)
    with pytest.raises(ArtifactNotFoundError, match="nothing.pt2: no such file"):
        qexport.inspect(tmp_path / "nothing.pt2")
    with pytest.raises(ArtifactError, match="not a file"):
        qexport.inspect(tmp_path)


# -- refusing files ------------------------------------------------------------------------------

def rezip(src: Path, dst: Path, mutate: Callable[[str, bytes], bytes | None] = lambda n, d: d,
          add: dict[str, bytes] | None = None, compression: int | None = None) -> Path:
    """Rewrite a .pt2 with changed contents (None drops a member) as a hostile author would: valid
    CRCs, qexport's layout, fresh member digests in the manifest (so the checks behind the digests
    are reached). With `compression`, a plain zipfile rewrite instead."""
    with zipfile.ZipFile(src) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    root = members[0][0].split("/")[0]
    out = [(name, mutate(name.split("/", 1)[1], data)) for name, data in members]
    out = [(n, d) for n, d in out if d is not None] + [(f"{root}/{n}", d) for n, d in (add or {}).items()]
    if compression is not None:
        with zipfile.ZipFile(dst, "w", compression) as z:
            for name, data in out:
                z.writestr(name, data)
        return dst
    return _archive.reseal(out, dst)


MANIFEST_MEMBER = "extra/" + MANIFEST_NAME


def _edit_manifest(edit):
    def mutate(name, data):
        if name != MANIFEST_MEMBER:
            return data
        d = json.loads(data)
        edit(d)
        return json.dumps(d).encode()

    return mutate


def test_rezipped_artifact_still_loads(cases, tmp_path):
    """The refusal tests below edit archives this way; unchanged, it loads."""
    p = rezip(cases["int8_weight_only"].path, tmp_path / "same.pt2")
    torch.testing.assert_close(qexport.load(p).module()(*cases["int8_weight_only"].args), cases["int8_weight_only"].expected)


def test_inspecting_a_program_in_memory_points_to_regions(cases):
    with pytest.raises(ArtifactError, match=r"got ExportedProgram \(ExportedProgram:\); for a program in memory use qexport.regions\(ep\)"):
        qexport.inspect(cases["nf4"].ep)


def test_missing_and_not_a_file(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match=r"gone.pt2: no such file"):
        qexport.load(tmp_path / "gone.pt2")
    with pytest.raises(ArtifactError, match="not a file"):
        qexport.load(tmp_path)


def test_not_a_zip(tmp_path):
    p = tmp_path / "text.pt2"
    p.write_text("not an archive")
    with pytest.raises(CorruptArtifactError, match=r"text.pt2: not a zip archive"):
        qexport.load(p)


def test_truncated(cases, tmp_path):
    data = cases["int8_weight_only"].path.read_bytes()
    p = tmp_path / "cut.pt2"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArtifactError, match=r"cut.pt2: not a zip archive, or a truncated one"):
        qexport.load(p)
    with pytest.raises(CorruptArtifactError, match="cut.pt2"):
        qexport.inspect(p)


def test_damaged_member_is_caught_before_torch(cases, tmp_path, monkeypatch):
    src = cases["int8_weight_only"].path
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/weights/weight_0"))
    data = bytearray(src.read_bytes())
    off = info.header_offset  # the local header's own name and extra (padding) lengths locate the data
    start = off + 30 + int.from_bytes(data[off + 26:off + 28], "little") + int.from_bytes(data[off + 28:off + 30], "little")
    data[start + 5] ^= 0xFF
    p = tmp_path / "flipped.pt2"
    p.write_bytes(bytes(data))
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: pytest.fail("torch saw a damaged archive"))
    with pytest.raises(CorruptArtifactError, match=r"flipped.pt2: member '.*weight_0' is damaged \(CRC mismatch\)"):
        qexport.load(p)


def test_zip_that_is_not_a_torch_archive(tmp_path):
    p = tmp_path / "other.pt2"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CorruptArtifactError, match="other.pt2: a zip, but not a torch.export archive"):
        qexport.load(p)


def test_compressed_member_is_refused(cases, tmp_path):
    p = rezip(cases["int8_weight_only"].path, tmp_path / "deflated.pt2", compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(CorruptArtifactError, match="not stored as torch.export.save stores it"):
        qexport.load(p)


def test_plain_torch_archive_has_no_manifest(cases, tmp_path):
    p = tmp_path / "plain.pt2"
    torch.export.save(cases["int8_weight_only"].ep, p)
    for fn in (qexport.load, qexport.inspect):
        with pytest.raises(CorruptArtifactError, match="plain.pt2: no qexport manifest .*not written by qexport.save"):
            fn(p)


def test_manifest_that_does_not_match_the_graph(cases, tmp_path):
    src = cases["int4_weight_only"].path

    def regroup(d):
        d["regions"][1]["scheme"]["group_size"] = 64

    p = rezip(src, tmp_path / "regrouped.pt2", _edit_manifest(regroup))
    with pytest.raises(ManifestMismatchError, match=r"regrouped.pt2: .*region 1 is 'layers.1' \(int4_weight_only\(g64"):
        qexport.load(p)
    p = rezip(src, tmp_path / "dropped.pt2", _edit_manifest(lambda d: d["regions"].pop()))
    with pytest.raises(ManifestMismatchError, match="dropped.pt2: .*lists 1 regions, the graph has 2"):
        qexport.load(p)


def test_newer_manifest_version(cases, tmp_path):
    p = rezip(cases["nf4"].path, tmp_path / "future.pt2", _edit_manifest(lambda d: d.update(version=MANIFEST_VERSION + 1, qexport_version="9.0")))
    for fn in (qexport.load, qexport.inspect):
        with pytest.raises(UnsupportedVersionError, match=rf"future.pt2: manifest version {MANIFEST_VERSION + 1} .*qexport 9.0: upgrade qexport"):
            fn(p)


def test_newer_scheme_version_in_manifest_and_graph(cases, tmp_path):
    src = cases["nf4"].path

    def bump_manifest(d):
        for r in d["regions"]:
            r["scheme"]["version"] = 2

    p = rezip(src, tmp_path / "m.pt2", _edit_manifest(bump_manifest))
    with pytest.raises(UnsupportedVersionError, match=r"m.pt2: scheme 'nf4' has schema version 2"):
        qexport.load(p)

    def bump_graph(name, data):
        if name != "models/model.json":
            return data
        return data.replace(b'"version": {"as_int": 1}', b'"version": {"as_int": 2}')

    p = rezip(src, tmp_path / "g.pt2", bump_graph)
    with pytest.raises(UnsupportedVersionError, match=r"g.pt2: scheme 'nf4' has schema version 2"):
        qexport.load(p)

    def bump_region_format(name, data):
        return data.replace(b'"format": {"as_int": 1}', b'"format": {"as_int": 5}') if name == "models/model.json" else data

    p = rezip(src, tmp_path / "f.pt2", bump_region_format)
    with pytest.raises(UnsupportedVersionError, match=r"f.pt2: region node .* uses region format 5"):
        qexport.load(p)


def test_damaged_graph_json_is_wrapped(cases, tmp_path):
    p = rezip(cases["nf4"].path, tmp_path / "j.pt2", lambda n, d: d[:-10] if n == "models/model.json" else d)
    with pytest.raises(CorruptArtifactError, match=r"j.pt2: record 'models/model.json' is not valid JSON"):
        qexport.load(p)


class _Boom:
    """Unpickling this creates a directory: the observable side effect of running code from a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_example_inputs_are_never_run(cases, tmp_path):
    marker = tmp_path / "code_ran"
    evil = pickle.dumps(((_Boom(str(marker)),), {}), protocol=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # torch.save's zip layout around a hand-made pickle
        z.writestr("archive/data.pkl", evil)
        z.writestr("archive/version", "3\n")
    p = rezip(cases["int8_weight_only"].path, tmp_path / "evil.pt2",
              lambda n, d: buf.getvalue() if n == "data/sample_inputs/model.pt" else d)
    with pytest.raises(UnsafeArtifactError, match="evil.pt2: the stored example inputs .*refusing to unpickle"):
        qexport.load(p)
    assert not marker.exists()


def test_pickled_weights_are_refused(cases, tmp_path):
    def pickle_flag(name, data):
        if name != "data/weights/model_weights_config.json":
            return data
        d = json.loads(data)
        next(iter(d["config"].values()))["use_pickle"] = True
        return json.dumps(d).encode()

    p = rezip(cases["int8_weight_only"].path, tmp_path / "pickled.pt2", pickle_flag)
    with pytest.raises(UnsafeArtifactError, match=r"pickled.pt2: weight 'layers.0.weight' is pickled"):
        qexport.load(p)


def test_compiled_code_is_refused_by_load(cases, tmp_path):
    p = rezip(cases["int8_weight_only"].path, tmp_path / "so.pt2", add={"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(UnsafeArtifactError, match="so.pt2: holds AOTInductor compiled code"):
        qexport.load(p)


# -- saving ---------------------------------------------------------------------------------------

def test_save_checks_before_any_work(cases, tmp_path):
    ep = cases["int8_weight_only"].ep
    with pytest.raises(ArtifactError, match="takes a torch.export.ExportedProgram, got MLP"):
        qexport.save(cases["int8_weight_only"].model, tmp_path / "m.pt2")
    with pytest.raises(ArtifactError, match="must end with .pt2"):
        qexport.save(ep, tmp_path / "m.zip")
    with pytest.raises(ArtifactNotFoundError, match="directory .*nowhere does not exist"):
        qexport.save(ep, tmp_path / "nowhere" / "m.pt2")
    (tmp_path / "dir.pt2").mkdir()
    with pytest.raises(ArtifactError, match="is a directory"):
        qexport.save(ep, tmp_path / "dir.pt2")
    assert sorted(os.listdir(tmp_path)) == ["dir.pt2"]


def test_failed_save_leaves_nothing_behind(cases, tmp_path, monkeypatch):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"previous version")

    def half_write(ep, f, **kw):
        Path(f).write_bytes(b"PK\x03\x04 half an archive")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.export, "save", half_write)
    with pytest.raises(ArtifactError, match="model.pt2: torch.export.save failed: RuntimeError: disk full"):
        qexport.save(cases["int8_weight_only"].ep, target)
    assert target.read_bytes() == b"previous version"
    assert os.listdir(tmp_path) == ["model.pt2"]


def test_save_replaces_atomically(cases, tmp_path):
    target = tmp_path / "model.pt2"
    qexport.save(cases["int8_weight_only"].ep, target)
    qexport.save(cases["nf4"].ep, target)
    assert qexport.inspect(target) == cases["nf4"].manifest
    assert os.listdir(tmp_path) == ["model.pt2"]
    with zipfile.ZipFile(target) as z:  # torch names the archive's root folder after the file
        assert {n.split("/")[0] for n in z.namelist()} == {"model"}


def test_save_refuses_what_load_would_refuse(cases, tmp_path, monkeypatch):
    from fractions import Fraction

    ep = cases["int8_weight_only"].ep
    monkeypatch.setattr(type(ep), "example_inputs", property(lambda self: ((Fraction(1, 2),), {})))
    with pytest.raises(UnsafeArtifactError, match="example inputs cannot be stored without pickling"):
        qexport.save(ep, tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


def test_debug_metadata_left_out_of_the_file_only(cases, tmp_path):
    """Region bodies' copies of the call's debug metadata are never written (the HOP node keeps its
    own); stack traces are dropped by default and kept with keep_stack_traces=True; the program in
    memory is untouched either way."""
    ep = cases["int4_weight_only"].ep
    body = getattr(ep.graph_module, hop_nodes(ep)[0].args[0].target)
    before = [dict(n.meta) for n in body.graph.nodes]
    assert any("stack_trace" in m for m in before)
    qexport.save(ep, tmp_path / "a.pt2", keep_stack_traces=True)
    qexport.save(ep, tmp_path / "b.pt2")
    assert [dict(n.meta) for n in body.graph.nodes] == before
    a, b = qexport.load(tmp_path / "a.pt2"), qexport.load(tmp_path / "b.pt2")
    assert hop_nodes(a)[0].meta.get("stack_trace") == hop_nodes(ep)[0].meta["stack_trace"]
    a_body = getattr(a.graph_module, hop_nodes(a)[0].args[0].target)
    assert not any(n.meta.get(k) for n in a_body.graph.nodes for k in ("stack_trace", "nn_module_stack", "source_fn_stack"))
    assert not any(n.meta.get("stack_trace") for n in b.graph.nodes)
    assert (tmp_path / "b.pt2").stat().st_size < (tmp_path / "a.pt2").stat().st_size
    x = cases["int4_weight_only"].args
    torch.testing.assert_close(b.module()(*x), cases["int4_weight_only"].expected, rtol=0, atol=0)
