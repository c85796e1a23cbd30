"""qexport.runners: one loader for every artifact kind, inputs from a program, verify and bench."""

from __future__ import annotations

import pytest
import torch

import qexport
from qexport import runners
from qexport.errors import ArtifactError, ArtifactNotFoundError, CorruptArtifactError, UsageError
from qexport.models import TinyNet, TinyTransformer


@pytest.fixture(scope="module")
def tt_program(tmp_path_factory):
    """TinyTransformer, int4 g32, dynamic batch, saved with qexport.save: (path, program, eager model)."""
    model = qexport.quantize(TinyTransformer(), qexport.schemes.get("int4_weight_only", group_size=32))
    x = torch.randint(0, 256, (2, 16))
    ep = qexport.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    path = tmp_path_factory.mktemp("runners") / "tt.pt2"
    qexport.save(ep, path)
    return path, ep, model


@pytest.fixture(scope="module")
def demo_artifacts(demo_run):
    code, _, out = demo_run
    assert code == 0
    return {kind: out / name for kind, name in
            (("pt2", "model.pt2"), ("aoti", "model_aoti.pt2"), ("pte", "model.pte"), ("onnx", "model.onnx"), ("fp32", "model_fp32.pt2"))}


def test_program_inputs_index_embeddings_and_concretize_dynamic_dims(tt_program):
    _, ep, _ = tt_program
    (info,) = runners.program_inputs(ep)
    assert info.dtype == torch.int64
    assert info.high == 256  # token ids stay inside the (quantized) embedding table
    assert info.shape == (2, 16)  # the dynamic batch takes its lower bound, raised to 2
    x = runners.make_inputs([info], seed=0)[0]
    assert x.min() >= 0 and x.max() < 256
    assert torch.equal(x, runners.make_inputs([info], seed=0)[0])


def test_pt2_runner_matches_eager_model(tt_program):
    path, _, model = tt_program
    r = runners.load(path)
    assert r.kind == "pt2" and r.program is not None and r.size == path.stat().st_size
    x = runners.make_inputs(r.inputs)
    (y,) = r(x)
    torch.testing.assert_close(y, model(*x))


@pytest.mark.parametrize("kind", ["pt2", "aoti", "pte", "onnx"])
def test_every_kind_loads_and_matches_the_program(demo_artifacts, kind):
    path = demo_artifacts[kind]
    assert runners.artifact_kind(path) == kind
    ref = runners.load(demo_artifacts["pt2"])
    r = runners.load(path)
    assert r.kind == kind
    x = runners.make_inputs(ref.inputs, seed=3)
    max_abs, rel = runners.compare(ref(x), r(x))
    tol, names = runners.tolerance_for(ref.program)
    assert names == ["int8_dynamic"] and tol == qexport.schemes.math_for(qexport.schemes.get("int8_dynamic")).tolerance
    assert rel <= tol, (kind, max_abs, rel)


@pytest.mark.parametrize("kind", ["pt2", "aoti", "pte", "onnx"])
def test_runners_refuse_inputs_they_cannot_take(demo_artifacts, kind):
    """ExecuTorch answered these with "error 0x12" and a native log line, onnxruntime with its feed
    errors, a .pt2 with a failed guard or ran float64, and a bare tensor was split into its rows."""
    r = runners.load(demo_artifacts[kind])
    x = torch.randn(1, 256)
    # the AOTI package's own check (load_compiled) words them its way
    for bad, says in (([x.double()], r"it takes .*float32\[1, 256\], not 1x256 float64|x is float64; the program takes float32"),
                      ([x, x], r"it takes 1 input, not 2|takes 1 tensor input\(s\) .*got 2"),
                      ([torch.randn(1, 128)], r"it takes .*\[1, 256\], not 1x128 float32|shape \[1, 128\], which does not fit"),
                      (x, r"a list of tensors, one per input \(runner\(\[x\]\)\)")):
        with pytest.raises(UsageError, match=says):
            r(bad)
    (y,) = r([x])  # and the runner still runs
    assert y.shape == (1, 10)


def test_pte_and_onnx_runners_describe_their_inputs(demo_artifacts):
    for kind in ("pte", "onnx"):
        (info,) = runners.load(demo_artifacts[kind]).inputs
        assert info.shape == (1, 256) and info.dtype == torch.float32


def test_plain_torch_archive_is_refused_with_the_fix(tmp_path):
    """torch.export.load would unpickle a plain archive's example inputs: only qexport files run."""
    ep = torch.export.export(TinyNet().eval(), (torch.randn(1, 256),))
    path = tmp_path / "plain.pt2"
    torch.export.save(ep, str(path))
    with pytest.raises(ArtifactError, match=r"not written by qexport .*qexport.save\(torch.export.load"):
        runners.load(path)
    qexport.save(torch.export.load(str(path)), path)  # the documented fix
    r = runners.load(path)
    x = runners.make_inputs(r.inputs)
    torch.testing.assert_close(r(x)[0], ep.module()(*x))


def test_verify_passes_within_tolerance_with_region_errors(tt_program):
    path, _, _ = tt_program
    (res,) = runners.verify(path, [path])
    assert res.passed and res.rel == 0.0 and res.tolerance == 0.05
    assert len(res.regions) == 1 + 2 * 4 + 1  # embedding, 4 linears per block, head
    assert all(e.rel == 0.0 for e in res.regions)


def test_verify_fails_a_different_model_and_reports_unloadable_files(demo_artifacts, tmp_path):
    other = tmp_path / "other.pt2"  # same shapes, other weights
    qexport.save(qexport.export(TinyNet(seed=1), (torch.randn(1, 256),)), other)
    bad = tmp_path / "damaged.pte"
    bad.write_bytes(demo_artifacts["pte"].read_bytes()[:200])
    fp32, wrong, broken = runners.verify(demo_artifacts["pt2"], [demo_artifacts["fp32"], other, bad])
    # int8_dynamic costs TinyNet ~1 % of its output range: the float model passes at the int8 tolerance
    assert fp32.passed and 0 < fp32.rel < fp32.tolerance
    assert not wrong.passed and wrong.error is None and wrong.rel > 0.5
    assert not broken.passed and broken.error and "damaged.pte" in broken.error


def test_verify_of_a_family_this_process_lacks_names_the_tolerance_fix(tt_program, monkeypatch):
    """A user family's tolerance lives with its math, in the user's module, which `qexport verify` never
    imports: the error says to import it or to give the tolerance, and the tolerance is enough."""
    from qexport.errors import UnknownSchemeError
    from qexport.schemes import registry

    path, _, _ = tt_program
    monkeypatch.delitem(registry._FAMILIES, "int4")  # as in a process that never registered the family
    with pytest.raises(UnknownSchemeError, match=r"family 'int4'.*--tolerance REL"):
        runners.verify(path, [path])
    (res,) = runners.verify(path, [path], tolerance=0.05)
    assert res.passed and res.rel == 0.0


def test_verify_errors_before_work(demo_artifacts, tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="nope.onnx"):
        runners.verify(demo_artifacts["pt2"], [tmp_path / "nope.onnx"])
    with pytest.raises(ArtifactError, match="reference must be an exported program"):
        runners.verify(demo_artifacts["pte"], [demo_artifacts["pt2"]])


def test_artifact_kind_refuses_unknown_files(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(CorruptArtifactError, match="not a qexport artifact"):
        runners.artifact_kind(f)
    with pytest.raises(ArtifactNotFoundError):
        runners.load(tmp_path / "missing.pt2")
    z = tmp_path / "cut.pt2"
    z.write_bytes(b"PK\x03\x04" + b"\0" * 30)
    with pytest.raises(CorruptArtifactError):
        runners.load(z)


def test_compare_refuses_mismatched_outputs():
    with pytest.raises(ArtifactError, match="2 outputs"):
        runners.compare([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ArtifactError, match="shape"):
        runners.compare([torch.zeros(2)], [torch.zeros(3)])
    assert runners.compare([torch.tensor([2.0, -4.0])], [torch.tensor([2.0, -3.0])]) == (1.0, 0.25)


def test_bench_same_inputs_side_by_side(demo_artifacts):
    paths = [demo_artifacts[k] for k in ("pt2", "pte", "onnx")]
    results = runners.bench(paths, min_time_s=0.0, min_iters=3, warmup=1)
    assert [r.kind for r in results] == ["pt2", "pte", "onnx"]
    for r, p in zip(results, paths):
        assert r.error is None and r.median_s > 0 and r.iters >= 3 and r.size == p.stat().st_size


def test_an_aoti_package_alone_is_benchmarked_on_its_manifests_inputs(demo_artifacts):
    aoti = runners.load(demo_artifacts["aoti"])
    assert [(i.name, i.dtype) for i in aoti.inputs] == [(i.name, i.dtype) for i in runners.load(demo_artifacts["pt2"]).inputs]
    (r,) = runners.bench([demo_artifacts["aoti"]], min_time_s=0.0, min_iters=2, warmup=0)
    assert r.kind == "aoti" and r.error is None and r.median_s > 0


@pytest.mark.parametrize("extra", [{}, {"inputs": 5}, {"inputs": "xy"}, {"inputs": [{"name": "x", "dtype": "os.system", "shape": []}]},
                                   {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1.5]}]}])
def test_a_package_manifest_without_usable_inputs_describes_none(extra):
    from qexport.runtime.loaders import _manifest_inputs

    assert _manifest_inputs(extra) is None  # the file is untrusted: bench then asks for --input


def test_bench_needs_inputs_from_somewhere(demo_artifacts):
    from qexport.runtime.bench import bench_inputs

    silent = runners.Runner("aoti", demo_artifacts["aoti"], lambda flat: flat)  # a package with no input specs
    with pytest.raises(ArtifactError, match="describes its inputs"):
        bench_inputs([silent])
    (r,) = runners.bench([demo_artifacts["aoti"]], inputs=[torch.randn(1, 256)], min_time_s=0.0, min_iters=2, warmup=0)
    assert r.kind == "aoti" and r.median_s > 0


def test_onnx_with_kept_regions_is_verified_region_by_region(demo_artifacts, tmp_path):
    kept = tmp_path / "kept.onnx"
    qexport.to_onnx(demo_artifacts["pt2"], kept, keep_regions=True)
    r = runners.load(kept)
    x = runners.make_inputs(runners.load(demo_artifacts["pt2"]).inputs)
    by_module = r.region_outputs(x)
    assert sorted(by_module) == ["layers.0", "layers.1", "layers.2"]
    assert by_module["layers.0"][1].shape == (1, 512)
    assert runners.load(demo_artifacts["onnx"]).region_outputs(x) is None  # regions inlined: not exposed
    kept_res, plain_res = runners.verify(demo_artifacts["pt2"], [kept, demo_artifacts["onnx"]])
    assert kept_res.passed and [e.module_path for e in kept_res.regions] == ["layers.0", "layers.1", "layers.2"]
    assert all(e.rel <= kept_res.tolerance for e in kept_res.regions)
    assert plain_res.passed and plain_res.regions is None


def test_reference_spread_is_how_far_the_reference_moves_with_exact_gemms(tt_program, tmp_path):
    path, ep, _ = tt_program
    flat = runners.make_inputs(runners.program_inputs(ep))
    assert runners.reference_spread(ep, flat, runners.program_runner(ep)(flat)) is None  # weight-only: nothing rounds
    torch.manual_seed(0)
    deep = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU()) for _ in range(12)))
    model = qexport.quantize(deep.eval(), "int8_dynamic")
    x = torch.randn(256, 256)
    dyn = qexport.export(model, (x,))
    expected = runners.program_runner(dyn)([x])
    spread = runners.reference_spread(dyn, [x], expected)
    # per-token rounding turns float64-vs-float32 GEMM differences into whole int8 steps
    assert spread is not None and spread > 1e-4
    qexport.save(dyn, tmp_path / "deep.pt2")
    (res,) = runners.verify(tmp_path / "deep.pt2", [tmp_path / "deep.pt2"])
    flat = runners.make_inputs(runners.program_inputs(dyn))  # what verify feeds (seed 0)
    assert res.passed and res.within_tolerance
    assert res.spread == pytest.approx(runners.reference_spread(dyn, flat, runners.program_runner(dyn)(flat)))
    (res,) = runners.verify(tmp_path / "deep.pt2", [tmp_path / "deep.pt2"], tolerance=0.5)
    assert res.spread is None  # an explicit bound is the whole bar


def test_an_artifact_within_the_references_own_spread_passes_and_says_so(tmp_path):
    from qexport.cli.verify_cmd import verify_table

    def result(rel, spread):
        return runners.VerifyResult(tmp_path / "m_aoti.pt2", "aoti", 0.02, max_abs=rel, rel=rel, spread=spread)

    inside, outside, plain = result(0.05, 0.03), result(0.07, 0.03), result(0.05, None)
    assert inside.passed and inside.within_spread and not inside.within_tolerance
    assert not outside.passed and not plain.passed and result(0.01, 0.03).within_tolerance
    table = verify_table([inside, outside, plain])
    assert "within the reference's own spread (3.00e-02" in table
    assert "above 2x the reference's own spread (3.00e-02)" in table and table.count("FAIL") == 2
