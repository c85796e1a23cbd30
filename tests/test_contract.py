"""The backend contract (qexport/lower/_contract.py): one registry, one RegionPlan per region, one
lowering record in every artifact's manifest.

The worked example is a toy backend declared here through the public API only, as a user adding a
backend would: `register_backend`, one `register_lowering` per (family, op) it takes, and an entry
point that plans with `plan_regions` and reports/records the plans.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import qexport
import serializers
from qexport import Decline, LoweringError, PlanContext, RegionPlan
from qexport.lower import lowerings_for, plan_regions, register_backend, register_lowering, unregister_backend, unregister_lowering
from qexport.lower.report import LoweringReport, RegionReport
from serializers.manifest import LoweringRecord, Manifest

from conftest import MLP, quantized, scheme_for

TOY = "toy-accelerator"


def toy_linear(ctx: PlanContext) -> RegionPlan | Decline:
    """The toy accelerator's int8 linear: int8 activations only, K a multiple of 16 (its tile)."""
    if ctx.scheme.activation == "none":
        return Decline("toy: needs int8 activations; quantize with int8_dynamic")
    k = ctx.region.weight_shape[1]
    if k % 16:
        return Decline(f"toy: in_features={k} is not a multiple of 16")
    return RegionPlan(taken=True, kernel="toy.qlinear", details={"tile": 16, "k": k}, lowering=("qlinear", ctx.region.name))


def to_toy(ep: torch.export.ExportedProgram) -> tuple[LoweringReport, Manifest]:
    """The toy backend's entry point: plan, (lower: nothing to do here), report and record."""
    plans = plan_regions(ep, TOY)
    report = LoweringReport(TOY, "", [RegionReport.from_record(p.region.name, p.region.scheme, p.record()) for p in plans])
    return report, Manifest.from_program(ep, "pt2").with_lowering([p.record() for p in plans])


@pytest.fixture
def toy():
    register_backend(TOY, title="Toy accelerator")
    register_lowering("int8", TOY, "linear", toy_linear)
    yield
    unregister_backend(TOY)


def _program(scheme: "str | qexport.Scheme", dims=(64, 128, 32)):
    torch.manual_seed(0)
    x = torch.randn(4, dims[0])
    return qexport.export(quantized(MLP(dims), scheme_for(scheme) if isinstance(scheme, str) else scheme, x), (x,))


def test_toy_backend_plans_reports_and_records(toy):
    report, manifest = to_toy(_program("int8_dynamic"))
    assert [(r.name, r.backend, r.delegated, r.kernel) for r in report.regions] == [
        ("layers.0", TOY, True, "toy.qlinear"), ("layers.1", TOY, True, "toy.qlinear")]
    assert report.regions[0].details == {"tile": 16, "k": 64} and "toy.qlinear" in report.table()
    # the record survives the manifest's JSON, the same keys as every artifact kind's
    back = Manifest.from_json(manifest.to_json())
    assert back.region("layers.1").lowering == LoweringRecord(TOY, True, "toy.qlinear", "", {"tile": 16, "k": 128})
    assert json.loads(manifest.to_json())["regions"][0]["lowering"] == {
        "backend": TOY, "taken": True, "kernel": "toy.qlinear", "reason": "", "details": {"tile": 16, "k": 64}}
    assert back.region("layers.0").lowering == report.regions[0].record()


def test_toy_backend_declines_with_reasons(toy):
    first, _ = to_toy(_program("int8_weight_only"))[0].regions
    assert not first.delegated and first.kernel == "none"
    assert first.reason == "toy: needs int8 activations; quantize with int8_dynamic"
    odd = plan_regions(_program("int8_dynamic", dims=(24, 32, 8)), TOY)
    assert [p.taken for p in odd] == [False, True] and odd[0].reason == "toy: in_features=24 is not a multiple of 16"
    (nf4, _) = plan_regions(_program("nf4"), TOY)
    assert nf4.reason == "no toy-accelerator lowering registered for nf4 linear"


def test_scheme_entries_are_asked_before_the_family_and_replace_by_name(toy):
    ep = _program("int8_dynamic")
    register_lowering("int8_dynamic", TOY, "linear", lambda ctx: Decline("scheme entry: not today"), name="picky")
    try:
        assert [n for n, _ in lowerings_for(qexport.regions(ep)[0], TOY)] == ["picky", "toy_linear"]
        assert all(p.taken for p in plan_regions(ep, TOY))  # declined by the scheme's entry, taken by the family's
        register_lowering("int8_dynamic", TOY, "linear", lambda ctx: RegionPlan(False, "slow path", "scheme entry"), name="picky")
        assert [(p.kernel, p.reason) for p in plan_regions(ep, TOY)] == [("slow path", "scheme entry")] * 2
    finally:
        unregister_lowering("int8_dynamic", TOY, "linear", "picky")
    assert [n for n, _ in lowerings_for(qexport.regions(ep)[0], TOY)] == ["toy_linear"]


def test_contract_errors_name_the_problem(toy):
    ep = _program("int8_dynamic")
    with pytest.raises(LoweringError, match=r"backend 'no-such' is not declared; known: .*'onnx'.*register_backend"):
        plan_regions(ep, "no-such")
    register_lowering("int8_dynamic", TOY, "linear", lambda ctx: "yes", name="sloppy")
    with pytest.raises(LoweringError, match=r"toy-accelerator lowering 'sloppy' returned str; expected RegionPlan, Decline or None"):
        plan_regions(ep, TOY)
    register_lowering("int8_dynamic", TOY, "linear", lambda ctx: RegionPlan(False, None, 5), name="sloppy")
    with pytest.raises(LoweringError, match=r"'sloppy' planned region layers.0 with RegionPlan\(taken=False, kernel=None, reason=5.*kernel and reason are strings"):
        plan_regions(ep, TOY)
    with pytest.raises(LoweringError, match=r"plan_regions: options must be a dict, got list"):
        plan_regions(ep, TOY, options=[("k", 1)])


def test_register_lowering_refuses_a_key_it_would_never_ask():
    region = qexport.regions(_program("int8_dynamic"))[0]
    before = lowerings_for(region, "onnx")
    with pytest.raises(LoweringError, match=r"register_lowering\('int8', 'onnx-gpu', 'linear'\): backend 'onnx-gpu' is not declared; known: "):
        register_lowering("int8", "onnx-gpu", "linear", toy_linear)
    with pytest.raises(LoweringError, match=r"op 'matmul' is not a region op; regions are one of \['linear', "):
        register_lowering("int8", "onnx", "matmul", toy_linear)
    with pytest.raises(qexport.UnknownSchemeError, match=r"'int8_dynamc' is neither a registered scheme nor a scheme family \(families: .*int8"):
        register_lowering("int8_dynamc", "onnx", "linear", toy_linear)
    with pytest.raises(LoweringError, match=r"the plan must be a function \(ctx: PlanContext\) -> RegionPlan \| Decline \| None, got str"):
        register_lowering("int8", "onnx", "linear", "toy_linear")
    assert lowerings_for(region, "onnx") == before
    with pytest.raises(LoweringError, match=r"backend 'onnx' is qexport's own and already declared; declare yours under another name"):
        register_backend("onnx", title="mine")
    with pytest.raises(LoweringError, match=r"backend 'onnx' is qexport's own and cannot be unregistered"):
        unregister_backend("onnx")
    assert plan_regions(_program("int8_dynamic"), "onnx")[0].taken


def test_a_users_entry_replaces_a_builtin_one_by_name():
    """Named like a built-in entry, a user's entry takes its place (the built-in module is imported first,
    so it cannot overwrite the user's later); a plan it does not take runs through the backend's fallback."""
    ep = _program("int8_dynamic")
    region = qexport.regions(ep)[0]
    (name, builtin), = lowerings_for(region, "executorch")
    register_lowering("int8", "executorch", "linear", lambda ctx: RegionPlan(False, "mine", "the user's"), name=name)
    try:
        assert [n for n, _ in lowerings_for(region, "executorch")] == [name]
        plan = plan_regions(ep, "executorch")[0]
        assert (plan.taken, plan.kernel, plan.reason) == (False, "mine", "the user's") and callable(plan.lowering)
    finally:
        register_lowering("int8", "executorch", "linear", builtin, name=name)
    assert plan_regions(ep, "executorch")[0].taken


def _kernel(body):
    from qexport.lower.kernels import KernelChoice

    return lambda ctx: RegionPlan(True, "test.k", lowering=KernelChoice("test.k", "", body, operands=("weight", "weight_scale")))


def _broken_onnx_form(ctx):
    from qexport.lower.onnx_regions import Int8Lowering, _entry

    class Broken(Int8Lowering):
        def weights(self, lw, t):
            raise KeyError("weight_zero_point")

    return _entry(Broken())(ctx)


@pytest.mark.parametrize("backend, plan, message", [
    ("aoti-cpu", lambda ctx: 1 / 0, r"aoti-cpu lowering 'bad' failed on region layers.0 \(int8_dynamic linear\): ZeroDivisionError"),
    ("aoti-cpu", lambda ctx: RegionPlan(True, "k"), r"aoti-cpu lowering 'bad' planned region layers.0 with RegionPlan.lowering=NoneType; aoti-cpu applies a KernelChoice"),
    ("executorch", lambda ctx: RegionPlan(True, "k", lowering="q/dq"), r"executorch lowering 'bad' planned region layers.0 with RegionPlan.lowering=str; executorch applies a Callable"),
    ("onnx", lambda ctx: RegionPlan(True, "k"), r"onnx lowering 'bad' .* onnx applies a Lowering"),
    ("aoti-cpu", _kernel(lambda x, w, s: 1 / 0), r"region layers.0: lowering it to test.k failed: ZeroDivisionError"),
    ("aoti-cpu", _kernel(lambda x, w, s: x @ w.float()), r"region layers.0: lowering it to test.k failed: RuntimeError: a and b must have same reduction dim"),
    ("aoti-cpu", _kernel(lambda x, w, s: F.linear(x, w.float())[..., :3]),
     r"region layers.0: lowering it to test.k gives a torch.float32 tensor of shape \(4, 3\); the region's output is a torch.float32 tensor of shape \(4, 128\)"),
    ("aoti-cpu", _kernel(lambda x, w, s: F.linear(x, w.float()).bfloat16()), r"test.k gives a torch.bfloat16 tensor of shape \(4, 128\)"),
    ("executorch", lambda ctx: RegionPlan(True, "k", lowering=lambda site: 1 / 0), r"region layers.0: lowering it to k failed: ZeroDivisionError"),
    ("executorch", lambda ctx: RegionPlan(True, "k", lowering=lambda site: site.input), r"lowering it to k gives a torch.float32 tensor of shape \(4, 64\)"),
    ("onnx", _broken_onnx_form, r"region layers.0: emitting its ONNX form \(MatMulInteger: .*\) failed: KeyError: 'weight_zero_point'"),
    # details a manifest cannot store: ExecuTorch lowered the whole program first, then said ArtifactError
    *((b, lambda ctx: RegionPlan(True, "k", details={"t": torch.ones(1)}),
       r"lowering 'bad' planned region layers.0 with details the manifest cannot store \(Object of type Tensor")
      for b in ("aoti-cpu", "executorch", "onnx")),
])
def test_a_failing_lowering_is_one_error_and_writes_nothing(backend, plan, message, tmp_path):
    """A user's lowering that raises, names nothing to apply, or computes another shape or dtype than its
    region: one LoweringError naming the entry or the region, before anything is written."""
    ep = _program("int8_dynamic")
    lower = {"aoti-cpu": lambda: qexport.compile(ep, tmp_path / "m.pt2"),
             "executorch": lambda: qexport.to_executorch(ep, tmp_path / "m.pte", progress=False),
             "onnx": lambda: qexport.to_onnx(ep, tmp_path / "m.onnx")}[backend]
    register_lowering("int8_dynamic", backend, "linear", plan, name="bad")
    try:
        with pytest.raises(LoweringError, match=message):
            lower()
    finally:
        unregister_lowering("int8_dynamic", backend, "linear", "bad")
    assert list(tmp_path.iterdir()) == []


def test_details_must_be_json(toy):
    ep = _program("int8_dynamic")
    register_lowering("int8_dynamic", TOY, "linear", lambda ctx: RegionPlan(True, "k", details={"nan": float("nan")}), name="bad")
    with pytest.raises(LoweringError, match=r"toy-accelerator lowering 'bad' planned region layers.0 with details the manifest cannot store"):
        to_toy(ep)
    record = LoweringRecord(TOY, True, "k", "", {"t": torch.ones(1)})  # a record built without a plan: the manifest refuses it
    with pytest.raises(qexport.ArtifactError, match=r"region layers.0: its lowering record must be JSON-serializable"):
        Manifest.from_program(ep, "pt2").with_lowering([record] * 2)


def test_builtin_backends_are_in_the_registry():
    names = {b.name: b for b in qexport.lower.backends()}
    assert {"aoti-cpu", "aoti-cuda", "executorch", "onnx"} <= set(names)
    assert not names["aoti-cuda"].plans_anywhere  # CUDA plans are tuned on the GPU
    ep = _program("int8_dynamic")
    for backend in ("aoti-cpu", "executorch", "onnx"):
        plans = plan_regions(ep, backend)
        assert [p.backend for p in plans] == [backend] * 2 and all(p.taken for p in plans), backend
    assert plan_regions(ep, "onnx")[0].details == {"target": "portable", "weight_codes_max_abs": 127,
                                                   "int8_weights_stored_as": "uint8+128"}
    assert {"isa", "plan"} <= set(plan_regions(ep, "aoti-cpu")[0].details)


# -- every artifact kind records the same thing ---------------------------------------------------------------

DECLINED = "test_contract: this test declines it"


@pytest.fixture
def declined_nf4():
    """An nf4 scheme of its own name, which a user's entry declines on every built-in CPU backend
    (scheme entries are asked first); the backends' own nf4 reasons follow."""
    scheme = qexport.schemes.register(scheme_for("nf4").replace(name="test_contract_nf4"))
    for backend in ("aoti-cpu", "executorch", "onnx"):
        register_lowering(scheme.name, backend, "linear", lambda ctx: Decline(DECLINED), name="test_contract_decline")
    yield scheme
    for backend in ("aoti-cpu", "executorch", "onnx"):
        unregister_lowering(scheme.name, backend, "linear", "test_contract_decline")
    qexport.schemes.unregister(scheme.name)


def test_a_declined_region_carries_its_reason_into_every_artifact(declined_nf4, tmp_path, capsys):
    from qexport.lower import aoti

    ep = _program(declined_nf4, dims=(64, 64, 32))
    reports = {
        "aoti": aoti.plan(ep),
        "pte": qexport.to_executorch(ep, tmp_path / "m.pte", progress=False),
        "onnx": qexport.to_onnx(ep, tmp_path / "m.onnx"),
    }
    qexport.compile(ep, tmp_path / "m.pt2")
    for kind, suffix in (("aoti", "pt2"), ("pte", "pte"), ("onnx", "onnx")):
        manifest = qexport.inspect(tmp_path / f"m.{suffix}")
        assert manifest.artifact == kind
        for region, line in zip(manifest.regions, reports[kind].regions):
            record = region.lowering
            assert record is not None and not record.taken, (kind, region.name)
            assert record.reason.startswith(DECLINED), (kind, record.reason)
            assert (record.kernel, record.reason) == (line.kernel, line.reason), kind
    # and each backend's own words follow the user's
    by_kind = {k: qexport.inspect(tmp_path / f"m.{s}").regions[0].lowering.reason
               for k, s in (("aoti", "pt2"), ("pte", "pte"), ("onnx", "onnx"))}
    assert by_kind["aoti"] == f"{DECLINED}; Inductor fuses the region"
    assert "XNNPACK has no codebook (NF4) weights" in by_kind["pte"]
    assert "ONNX has no NormalFloat4 type" in by_kind["onnx"]
    # `qexport inspect` shows the record of any lowered artifact
    from qexport.cli import main

    for suffix in ("pt2", "pte", "onnx"):
        assert main(["inspect", str(tmp_path / f"m.{suffix}")]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1].split()[-2:] == ["taken", "kernel"], suffix
        kernel = qexport.inspect(tmp_path / f"m.{suffix}").regions[0].lowering.kernel
        assert out[3].rstrip().endswith(kernel) and " no " in out[3], (suffix, out[3])


# -- manifests written before the record existed ----------------------------------------------------------------

def _old(manifest: Manifest, **extra) -> Manifest:
    data = manifest.to_dict()
    data.pop("minor_version")
    for r in data["regions"]:
        r.pop("lowering", None)
    data["extra"].update(extra)
    return Manifest.from_json(json.dumps(data))


def test_minor_0_manifests_are_read_into_the_record():
    m = Manifest.from_program(_program("int8_weight_only"), "aoti")
    aoti = _old(m, kernels=[
        {"name": "layers.0", "scheme": "int8_weight_only", "backend": "aoti-cpu", "delegated": True,
         "reason": "why", "kernel": "aten._weight_int8pack_mm", "isa": "AVX2", "plan": [{"max_m": None}]},
        {"name": "layers.1", "scheme": "int8_weight_only", "backend": "aoti-cpu", "delegated": False,
         "reason": "no kernel took it; Inductor fuses the region", "kernel": "inductor"},
    ])
    assert aoti.region("layers.0").lowering == LoweringRecord(
        "aoti-cpu", True, "aten._weight_int8pack_mm", "why", {"isa": "AVX2", "plan": [{"max_m": None}]})
    assert aoti.region("layers.1").lowering.kernel == "inductor"
    onnx = _old(m, lowering={"layers.0": {"native": False, "kernel": "k", "reason": "r"}})
    assert onnx.region("layers.0").lowering == LoweringRecord("onnx", False, "k", "r")
    assert onnx.region("layers.1").lowering is None
    assert _old(m, kernels="garbage").region("layers.0").lowering is None  # unreadable legacy facts are left out
    assert serializers.MANIFEST_VERSION == 1  # a new optional field is a minor change


def test_malformed_lowering_record_is_refused():
    data = Manifest.from_program(_program("int8_weight_only"), "aoti").to_dict()
    data["regions"][0]["lowering"] = {"backend": "aoti-cpu", "taken": "yes", "kernel": "k"}
    with pytest.raises(qexport.CorruptArtifactError, match=r"region layers.0: lowering: 'taken' must be true or false"):
        Manifest.from_dict(data, source="m.pt2")


# -- a scheme family from outside the library (docs/architecture.md, "A new scheme family") ---------------------

class Int6Math(qexport.SchemeMath):
    """6-bit per-channel codes in int8 storage: a family the library does not have."""

    family = "test_contract_int6"
    weight_roles = ("weight", "weight_scale")
    supported_ops = frozenset({"linear"})
    tolerance = 5e-2

    def quantize_weight(self, s, weight, hessian=None):
        scale = (weight.detach().abs().amax(1) / s.qmax).clamp(min=1e-8)
        return {"weight": (weight.detach() / scale[:, None]).round().clamp(s.qmin, s.qmax).to(torch.int8), "weight_scale": scale}

    def dequantize_weight(self, s, t, shape):
        return t["weight"].float() * t["weight_scale"][:, None]


def test_a_family_from_user_code_runs_everywhere_and_takes_its_own_kernel():
    from qexport.lower.kernels import KernelChoice, apply_kernels

    scheme = qexport.schemes.register(qexport.Scheme(name="test_contract_int6", family=Int6Math.family, weight_dtype="int8",
                                                     bits=6, granularity="per_channel", qmin=-31, qmax=31), Int6Math())

    @qexport.register_lowering(Int6Math.family, "aoti-cpu", "linear")
    def int6_cpu(ctx: PlanContext) -> RegionPlan:
        return RegionPlan(True, "test.int6_mm", details={"k": ctx.region.weight_shape[1]}, lowering=KernelChoice(
            "test.int6_mm", "", lambda x, w, s, *b: F.linear(x, w.float() * s[:, None], *b),
            operands=("weight", "weight_scale", *ctx.optional("bias"))))

    try:
        torch.manual_seed(0)
        x = torch.randn(4, 64)
        model = quantized(MLP(), scheme, x)
        ep = qexport.export(model, (x,))
        lowered, plans = apply_kernels(ep, "cpu")
        assert [(p.kernel, p.details) for p in plans] == [("test.int6_mm", {"k": 64}), ("test.int6_mm", {"k": 128})]
        torch.testing.assert_close(lowered.module()(x), model(x))
        # the backends without a form of it run its reference math and say so
        (et, _), (onnx, _) = plan_regions(ep, "executorch"), plan_regions(ep, "onnx")
        assert not et.taken and "XNNPACK has no test_contract_int6 linear pattern" in et.reason
        assert not onnx.taken and "no ONNX lowering for scheme family 'test_contract_int6' linear" in onnx.reason
    finally:
        unregister_lowering(Int6Math.family, "aoti-cpu", "linear", "int6_cpu")
        qexport.schemes.unregister(scheme.name)
