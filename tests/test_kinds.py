"""serializers.kinds: the one table of artifact kinds. Every kind in it round-trips (written by its
stage -> sniffed -> manifest read -> run by its runner), and a kind added from outside (this module
is its serializer and its runtime) works through the same public entry points with one table entry."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

import qexport
from qexport import runners
from qexport.errors import ArtifactError, CorruptArtifactError
from qexport.models import TinyNet
from serializers import kinds
from serializers.manifest import Manifest


@pytest.fixture(scope="module")
def demo_dir(demo_run):
    code, _, out = demo_run
    assert code == 0
    return out


@pytest.mark.parametrize("name", kinds.BUILTIN)
def test_every_kind_round_trips_through_the_table(demo_dir, name):
    kind = kinds.get(name)
    path = demo_dir / kind.file_name()  # the demo writes every kind the table lists, under the table's name
    assert path.name.endswith(kind.suffix)
    assert kinds.sniff(path) is kind and runners.artifact_kind(path) == name
    manifest = qexport.inspect(path)
    program = qexport.inspect(demo_dir / kinds.get("pt2").file_name())
    assert manifest.artifact == name
    assert [(r.name, r.scheme) for r in manifest.regions] == [(r.name, r.scheme) for r in program.regions]
    runner = runners.load(path)
    assert runner.kind == name
    ref = runners.load(demo_dir / kinds.get("pt2").file_name())
    x = runners.make_inputs(ref.inputs, seed=1)
    assert runners.compare(ref(x), runner(x))[1] <= runners.tolerance_for(ref.program)[0]
    for stage, (module, _) in kind.stages().items():  # the stages a kind names are qexport's public ones
        assert runners.STAGES[stage][0] == module and getattr(qexport, stage) is runners.stage(stage)


def test_the_demo_and_the_stages_come_from_the_table():
    assert qexport.demo.BACKENDS == tuple(k.name for k in kinds.lowered()) == ("aoti", "pte", "onnx")
    assert set(runners.STAGES) == {"save", "load", "compile", "load_compiled", "to_executorch", "to_onnx"}
    assert runners.ARTIFACT_KINDS == kinds.names() == ("pt2", "aoti", "pte", "onnx")


def test_the_hostile_file_fuzzer_covers_every_kind():
    import fuzz_artifacts

    assert fuzz_artifacts.KINDS == kinds.names()
    assert fuzz_artifacts.SUFFIX == {k.name: k.suffix for k in kinds.kinds()}


@pytest.mark.parametrize("name", kinds.BUILTIN)
def test_a_loader_given_another_kind_names_what_it_is_and_what_opens_it(demo_dir, name):
    path = demo_dir / kinds.get(name).file_name()
    for stage, expected in ((qexport.load, "pt2"), (qexport.load_compiled, "aoti")):
        if name == expected:
            continue
        with pytest.raises(ArtifactError) as e:
            stage(path)
        if (stage, name) == (qexport.load, "aoti"):  # compiled code in a program's place: the security check's words
            assert "load it with qexport.load_compiled" in str(e.value)
            continue
        opener = f"qexport.{kinds.get(name).loader.split(':')[1]}(" if kinds.get(name).loader else "qexport.runners.load("
        assert f"{kinds.get(name).what}, not {kinds.get(expected).what}" in str(e.value)
        assert opener in str(e.value)


def test_table_errors(tmp_path):
    with pytest.raises(ArtifactError, match=r"no artifact kind 'tflite'; qexport knows pt2, aoti, pte, onnx"):
        kinds.get("tflite")
    with pytest.raises(ArtifactError, match="built-in artifact kind"):
        kinds.register(kinds.ArtifactKind("onnx", ".onnx", "another ONNX", __name__))
    with pytest.raises(ArtifactError, match="built-in artifact kind"):
        kinds.unregister("pte")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptArtifactError, match=r"junk.bin: not a qexport artifact .*reads: pt2, aoti, pte, onnx\)"):
        kinds.sniff(junk)


# -- a kind added from outside: this module is its serializer (sniff, read_manifest, write) and its runtime
MAGIC = b"QXTOY\n"


def sniff(path: Path, head: bytes) -> bool:
    return head.startswith(MAGIC)


def _parts(path: Path) -> tuple[bytes, bytes]:
    data = Path(path).read_bytes()[len(MAGIC):]
    size = int.from_bytes(data[:8], "little")
    return data[8:8 + size], data[8 + size:]


def read_manifest(path: Path) -> Manifest:
    return Manifest.from_json(_parts(path)[0], source=str(path))


def write_toy(ep: torch.export.ExportedProgram, path: Path) -> Manifest:
    """The toy format: the magic, the manifest, and the program as a qexport .pt2."""
    manifest = Manifest.from_program(ep, "qxtoy")
    with tempfile.TemporaryDirectory() as d:
        qexport.save(ep, Path(d) / "p.pt2")
        program = (Path(d) / "p.pt2").read_bytes()
    text = manifest.to_json().encode()
    Path(path).write_bytes(MAGIC + len(text).to_bytes(8, "little") + text + program)
    return manifest


def toy_runner(path: Path, expected_sha256: str | None) -> runners.Runner:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "p.pt2").write_bytes(_parts(path)[1])
        runner = runners.load(Path(d) / "p.pt2")
    return runners.Runner("qxtoy", Path(path), runner.call, inputs=runner.inputs)


@pytest.fixture
def toy_kind():
    kind = kinds.register(kinds.ArtifactKind("qxtoy", ".qxt", "a toy artifact", __name__,
                                             writer=f"{__name__}:write_toy", runner=f"{__name__}:toy_runner"))
    yield kind
    kinds.unregister("qxtoy")


def test_a_new_kind_is_one_table_entry(toy_kind, tmp_path):
    model = qexport.quantize(TinyNet((32, 16)), "int8_weight_only")
    x = torch.randn(2, 32)
    ep = qexport.export(model, (x,))
    path = tmp_path / toy_kind.file_name()
    written = write_toy(ep, path)
    assert kinds.sniff(path) is toy_kind and runners.artifact_kind(path) == "qxtoy"
    assert qexport.inspect(path) == written and written.artifact == "qxtoy" and len(written.regions) == 1
    runner = runners.load(path)
    assert runner.kind == "qxtoy"
    torch.testing.assert_close(runner([x])[0], model(x))
    (result,) = runners.verify(ep, [path])
    assert result.passed and result.kind == "qxtoy"
    assert kinds.stages()["write_toy"] == (__name__, "")

    kinds.unregister("qxtoy")  # without its entry, qexport knows nothing of the kind
    with pytest.raises(CorruptArtifactError, match=r"not a qexport artifact .*\(it reads: pt2, aoti, pte, onnx\)"):
        qexport.inspect(path)
    with pytest.raises(ArtifactError, match=r"artifact='qxtoy' is not one of \('pt2', 'aoti', 'pte', 'onnx'\)"):
        Manifest.from_program(ep, "qxtoy")
    kinds.register(toy_kind)  # the fixture removes it again


def test_a_kind_without_a_runtime_is_inspected_but_not_run(tmp_path):
    kinds.register(kinds.ArtifactKind("qxread", ".qxt", "a read-only artifact", __name__))
    try:
        model = TinyNet((32, 16))
        ep = qexport.export(model, (torch.randn(1, 32),))
        path = tmp_path / "m.qxt"
        manifest = Manifest.from_program(ep, "qxread")
        text = manifest.to_json().encode()
        path.write_bytes(MAGIC + len(text).to_bytes(8, "little") + text)
        assert qexport.inspect(path) == manifest
        with pytest.raises(ArtifactError, match="reads qxread artifacts but has no runtime for them"):
            runners.load(path)
    finally:
        kinds.unregister("qxread")
