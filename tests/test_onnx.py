"""qexport.to_onnx: every built-in scheme as ONNX that onnxruntime runs, within the scheme's tolerance of
the eager quantized model, with and without regions kept as local functions; inspect; refusals."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import qexport
from qexport.errors import ArtifactError, ArtifactNotFoundError, LoweringError
from qexport.schemes import math_for
from serializers.onnx import region_functions

from conftest import MLP, ConvNet, EmbedNet, TinyTransformer, quantized, scheme_for

SCHEMES = qexport.schemes.builtin_names()
BATCH = torch.export.Dim("batch", min=1, max=64)


def _export(model, scheme, x):
    torch.manual_seed(0)
    m = quantized(model, scheme_for(scheme) if isinstance(scheme, str) else scheme, x)
    return m, qexport.export(m, (x,), dynamic_shapes=({0: BATCH},))


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _rel_err(y: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.detach().float().numpy()
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def _nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [*model.graph.node, *(n for f in model.functions for n in f.node)]


def _initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


@pytest.fixture(scope="module")
def mlp_artifacts(tmp_path_factory):
    """scheme -> keep_regions -> (eager quantized model, ExportedProgram, path, report); one export each."""
    out: dict = {}
    d = tmp_path_factory.mktemp("onnx")
    x = torch.randn(4, 64)
    for name in SCHEMES:
        m, ep = _export(MLP(), name, x)
        for keep in (False, True):
            path = d / f"{name}_{keep}.onnx"
            out.setdefault(name, {})[keep] = (m, ep, path, qexport.to_onnx(ep, path, keep_regions=keep))
    return out


@pytest.mark.parametrize("keep", [False, True], ids=["inlined", "functions"])
@pytest.mark.parametrize("name", SCHEMES)
def test_mlp_numerics_within_scheme_tolerance(mlp_artifacts, name, keep):
    m, _, path, _ = mlp_artifacts[name][keep]
    onnx.checker.check_model(str(path), full_check=True)
    x = torch.randn(7, 64)  # not the export batch: the batch dim stays dynamic
    y = _run(path, x)
    assert y.shape == (7, 32)
    assert _rel_err(y, m(x)) <= math_for(scheme_for(name)).tolerance


def test_exports_after_the_first_reuse_torchlibs_op_list(mlp_artifacts, tmp_path, monkeypatch):
    """torch.onnx.export rebuilds its registry per call, and onnxscript re-derived every traced torchlib
    function's signature from source for it (~1 s of each to_onnx); qexport keeps the list per process.
    The file is the same."""
    from onnxscript._internal import values

    _, ep, path, _ = mlp_artifacts["int8_dynamic"][False]
    monkeypatch.setattr(values.TracedOnnxFunction, "function_ir", property(lambda self: pytest.fail("op list rebuilt")))
    qexport.to_onnx(ep, tmp_path / "again.onnx")
    assert onnx.load(str(tmp_path / "again.onnx")) == onnx.load(str(path))


#: (op, what must be in the model) per scheme: the region is emitted from its scheme
EXPECTED = {
    "int8_weight_only": ({"DequantizeLinear": 2}, onnx.TensorProto.INT8, True),
    # per-token int8: integer MatMul of the quantized rows, no weight DequantizeLinear
    # weights that meet int8 activations are stored as uint8 + 128 (target "portable", the default)
    "int8_dynamic": ({"MatMulInteger": 2, "QuantizeLinear": 2, "ReduceMin": 2, "DequantizeLinear": 0}, onnx.TensorProto.UINT8, True),
    "int8_static": ({"DequantizeLinear": 6, "QuantizeLinear": 4}, onnx.TensorProto.UINT8, True),
    "int4_weight_only": ({"DequantizeLinear": 2}, onnx.TensorProto.UINT4, True),
    # per-token int8 activations dequantized with Sub/Mul, so onnxruntime fuses the weights' DQ into MatMulNBits
    "int8_dynamic_int4_weight": ({"DequantizeLinear": 2, "QuantizeLinear": 2}, onnx.TensorProto.UINT4, True),
    "fp8_e4m3": ({"DequantizeLinear": 4, "QuantizeLinear": 2}, onnx.TensorProto.FLOAT8E4M3FN, True),
    "nf4": ({"Gather": 2}, onnx.TensorProto.UINT4, False),
}


@pytest.mark.parametrize("keep", [False, True], ids=["inlined", "functions"])
@pytest.mark.parametrize("name", SCHEMES)
def test_regions_are_emitted_from_their_scheme(mlp_artifacts, name, keep):
    _, _, path, report = mlp_artifacts[name][keep]
    model = onnx.load(str(path))
    counts = Counter(n.op_type for n in _nodes(model))
    ops, weight_type, native = EXPECTED[name]
    for op, n in ops.items():
        assert counts[op] == n, (op, counts)
    types = _initializer_types(model)
    assert types["layers.0.weight"] == weight_type and types["layers.1.weight"] == weight_type
    assert "Region" not in counts and all(n.domain != "qexport.pending" for n in _nodes(model))
    assert [r.name for r in report.regions] == ["layers.0", "layers.1"]
    assert all(r.delegated is native and r.backend == "onnx" and r.kernel for r in report.regions)
    # the first region's weight DequantizeLinear: in the main graph, or in its function (input "weight")
    fn = [n for f in model.functions if f.name == "layers_0" for n in f.node if n.input and n.input[0] == "weight"]
    dq = [n for n in [*model.graph.node, *fn] if n.op_type == "DequantizeLinear" and n.input[0] in ("layers.0.weight", "weight")]
    if name in ("int8_weight_only", "int8_static"):  # per-channel: the out-features axis of MatMul's [in, out] weight
        assert {a.name: a.i for a in dq[0].attribute}["axis"] == 1
    if name == "int4_weight_only":
        attrs = {a.name: a.i for a in dq[0].attribute}
        assert attrs["block_size"] == scheme_for(name).group_size and attrs["axis"] == 0
    if name == "nf4":
        assert "NormalFloat4" in report.regions[0].reason and not dq


@pytest.mark.parametrize("level, bound", [("0", 1e-5), ("4", 2e-2)])
def test_int8_dynamic_int4_weight_runs_as_matmul_nbits(mlp_artifacts, tmp_path, level, bound):
    """onnxruntime fuses each 8da4w region into MatMulNBits (4-bit weights, never dequantized whole).
    At accuracy level 0 it computes in fp32 on the per-token int8 activations: the reference's numbers.
    At its default, level 4 (int8 compute), MLAS re-quantizes those activations per block of 32,
    symmetrically: a second rounding, well inside the family's tolerance."""
    m, _, path, _ = mlp_artifacts["int8_dynamic_int4_weight"][False]
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert _rel_err(y, m(x)) <= bound
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["MatMulNBits"] == 2 and ops["MatMul"] == 0 and ops["DequantizeLinear"] == 0, ops


@pytest.mark.parametrize("name, fused, unfused", [
    # per-token int8: Cast(MatMulInteger) * (s_x * s_w) is the pattern onnxruntime runs as one kernel
    ("int8_dynamic", "MatMulIntegerToFloat", ("MatMulInteger",)),
    ("int8_weight_only", "MatMulNBits", ("MatMul", "DequantizeLinear")),
])
def test_int8_linears_run_as_onnxruntime_fused_kernels(mlp_artifacts, tmp_path, name, fused, unfused):
    """Under onnxruntime's default session options each int8 linear region becomes one fused kernel
    (the speed of docs/benchmarks/onnx.md depends on it), and the result is still the reference's."""
    m, _, path, _ = mlp_artifacts[name][False]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(5))
    assert _rel_err(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], m(x)) <= math_for(scheme_for(name)).tolerance
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops[fused] == 2 and not any(ops[op] for op in unfused), ops


class SharedLayer(torch.nn.Module):
    """One layer called twice (ALBERT's shared encoder layer, at toy size), then a head."""

    def __init__(self):
        super().__init__()
        self.layer, self.head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.head(self.layer(torch.relu(self.layer(x))))


def test_a_weight_read_by_several_regions_says_onnxruntime_does_not_fuse_it(tmp_path):
    """onnxruntime fuses DQ -> MatMul into MatMulNBits only for a weight initializer read once: the
    layer called twice stays DQ + MatMul (dequantized per call), and its records say so; the head's do not."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    m, ep = _export(SharedLayer(), "int4_weight_only", x)
    report = qexport.to_onnx(ep, tmp_path / "s.onnx")
    said = {r.name: "read by 2 regions" in r.reason for r in report.regions}
    assert said == {"layer": True, "layer_1": True, "head": False}
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["MatMulNBits"] == 1 and ops["MatMul"] == 2, ops
    assert _rel_err(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], m(x)) <= math_for(scheme_for("int4_weight_only")).tolerance


def test_per_tensor_dynamic_int8_linears_run_as_dynamic_quantize_matmul(tmp_path):
    """int8_dynamic with per-tensor activations: each linear is the DynamicQuantizeLinear -> MatMulInteger
    form onnxruntime runs as one DynamicQuantizeMatMul (MatMulIntegerToFloat where regions share an
    input), per-channel weight scales and bias included, on 2-D and 3-D activations (not flattened)."""
    scheme = scheme_for("int8_dynamic").replace(act_granularity="per_tensor")
    for label, model, x in (("mlp", MLP(), torch.randn(4, 64)), ("transformer", TinyTransformer(), torch.randint(0, 128, (2, 16)))):
        torch.manual_seed(0)
        m = quantized(model, scheme, x)
        path = tmp_path / f"{label}.onnx"
        report = qexport.to_onnx(qexport.export(m, (x,)), path)
        linears = [r for r in report.regions if "per-tensor int8 activations (DynamicQuantizeLinear)" in r.kernel]
        assert linears and all(r.delegated for r in linears), report.regions
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{label}.optimized.onnx")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        assert _rel_err(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], m(x)) <= math_for(scheme).tolerance
        ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == len(linears), (label, ops)
        assert ops["MatMulInteger"] == 0 and ops["DequantizeLinear"] == 0, (label, ops)


def test_keep_regions_makes_one_function_per_region_carrying_its_scheme(mlp_artifacts):
    for name in SCHEMES:
        _, ep, path, _ = mlp_artifacts[name][True]
        model = onnx.load(str(path))
        funcs = {f.name: f for f in model.functions if f.domain == "qexport.region"}
        assert sorted(funcs) == ["layers_0", "layers_1"]
        calls = [n for n in model.graph.node if n.domain == "qexport.region"]
        assert sorted(n.op_type for n in calls) == ["layers_0", "layers_1"]
        for region in qexport.regions(ep):
            props = {p.key: p.value for p in funcs[region.name.replace(".", "_")].metadata_props}
            assert json.loads(props["qexport.scheme"]) == region.scheme.to_dict()
            record = json.loads(props["qexport.region"])
            assert record["module_path"] == region.module_path and record["op"] == "linear"
        read = region_functions(path)
        assert {k: v[0] for k, v in read.items()} == {"layers_0": scheme_for(name), "layers_1": scheme_for(name)}
        _, _, inlined, _ = mlp_artifacts[name][False]
        assert not onnx.load(str(inlined)).functions and region_functions(inlined) == {}


@pytest.mark.parametrize("keep", [False, True], ids=["inlined", "functions"])
def test_inspect_reads_regions_and_schemes(mlp_artifacts, keep):
    _, ep, path, report = mlp_artifacts["int4_weight_only"][keep]
    manifest = qexport.inspect(path)
    assert manifest.artifact == "onnx"
    assert [(r.name, r.scheme) for r in manifest.regions] == [(r.name, r.scheme) for r in qexport.regions(ep)]
    assert manifest.extra["keep_regions"] is keep and manifest.extra["opset"] == 21
    assert manifest.region("layers.0").lowering.kernel == report.regions[0].kernel
    assert report.bytes == path.stat().st_size


@pytest.mark.parametrize("name", ["int8_weight_only", "int8_dynamic", "int8_static"])
def test_conv2d_regions(tmp_path, name):
    x = torch.randn(2, 3, 8, 8)
    m, ep = _export(ConvNet(), name, x)
    report = qexport.to_onnx(ep, tmp_path / "c.onnx")
    assert sum(r.delegated for r in report.regions) == 3
    x = torch.randn(3, 3, 8, 8)
    assert _rel_err(_run(tmp_path / "c.onnx", x), m(x)) <= math_for(scheme_for(name)).tolerance
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "c.onnx")).graph.node)
    assert ops["Conv"] == 2
    if name == "int8_dynamic":  # conv activations have no token axis: per-tensor
        assert ops["DynamicQuantizeLinear"] == 2
    # onnxruntime fuses no dynamically quantized conv, and the conv records say so (the linear's do not)
    said = [r.name for r in report.regions if "no fused kernel for a dynamically quantized conv" in r.reason]
    assert said == (["conv1", "conv2"] if name == "int8_dynamic" else [])


@pytest.mark.parametrize("name", ["int8_weight_only", "int4_weight_only", "nf4"])
def test_embedding_regions(tmp_path, name):
    x = torch.randint(0, 100, (2, 5))
    m, ep = _export(EmbedNet(), name, x)
    report = qexport.to_onnx(ep, tmp_path / "e.onnx", keep_regions=True)
    assert [r.name for r in report.regions] == ["emb", "fc"]
    assert "rows" in report.regions[0].kernel  # rows are gathered, then dequantized (not the whole table)
    x = torch.randint(0, 100, (3, 5))
    assert _rel_err(_run(tmp_path / "e.onnx", x), m(x)) <= math_for(scheme_for(name)).tolerance


@pytest.mark.parametrize("name, keep", [("int8_static", False), ("int8_static", True), ("int8_dynamic", False), ("fp8_e4m3", True)])
def test_transformer_3d_activations(tmp_path, name, keep):
    x = torch.randint(0, 128, (2, 8))
    m, ep = _export(TinyTransformer(), name, x)
    qexport.to_onnx(ep, tmp_path / "t.onnx", keep_regions=keep)
    x = torch.randint(0, 128, (3, 8))  # per-token qparams over [batch, seq] rows, batch dynamic
    assert _rel_err(_run(tmp_path / "t.onnx", x), m(x)) <= math_for(scheme_for(name)).tolerance


def test_int4_before_opset_21_is_a_float_decomposition_with_its_reason(tmp_path):
    x = torch.randn(4, 64)
    m, ep = _export(MLP(), "int4_weight_only", x)
    report = qexport.to_onnx(ep, tmp_path / "o20.onnx", opset=20)
    assert not report.regions[0].delegated and "opset 20" in report.regions[0].reason
    model = onnx.load(str(tmp_path / "o20.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == 20
    assert _initializer_types(model)["layers.0.weight"] == onnx.TensorProto.UINT8
    assert _rel_err(_run(tmp_path / "o20.onnx", x), m(x)) <= math_for(scheme_for("int4_weight_only")).tolerance


def test_unknown_family_falls_back_to_its_reference_math(tmp_path):
    from qexport.schemes.int8 import Int8Math

    class MyMath(Int8Math):
        family = "my_int8"

    scheme = qexport.schemes.register(
        qexport.Scheme(name="my_int8_wo", family="my_int8", weight_dtype="int8", bits=8, granularity="per_channel"),
        MyMath(), overwrite=True,
    )
    try:
        x = torch.randn(4, 64)
        m, ep = _export(MLP(), scheme, x)
        report = qexport.to_onnx(ep, tmp_path / "u.onnx", keep_regions=True)
        assert not report.regions[0].delegated and "'my_int8'" in report.regions[0].reason
        assert {k: v[0].name for k, v in region_functions(tmp_path / "u.onnx").items()} == {
            "layers_0": "my_int8_wo", "layers_1": "my_int8_wo"}
        assert _rel_err(_run(tmp_path / "u.onnx", x), m(x)) <= 1e-4
    finally:
        qexport.schemes.unregister("my_int8_wo")


def test_from_pt2_path_and_cli(tmp_path, mlp_artifacts, capsys):
    from qexport.cli import main

    m, ep, _, _ = mlp_artifacts["int8_static"][False]
    qexport.save(ep, tmp_path / "m.pt2")
    report = qexport.to_onnx(tmp_path / "m.pt2", tmp_path / "m.onnx")
    assert report.all_delegated
    assert main(["partition", str(tmp_path / "m.pt2"), "--target", "onnx", "-o", str(tmp_path / "k.onnx"),
                 "--keep-regions", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keep_regions"] is True
    assert len(region_functions(tmp_path / "k.onnx")) == 2
    x = torch.randn(2, 64)
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), _run(tmp_path / "k.onnx", x), atol=1e-5)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"opset": 17}, LoweringError, "opset=17 is not supported"),
    ({"opset": "21"}, LoweringError, "choose an int"),
    ({"keep_regions": "no"}, LoweringError, "keep_regions must be True or False, got 'no'"),
])
def test_bad_opset_refused_before_work(tmp_path, mlp_artifacts, kwargs, error, message):
    _, ep, _, _ = mlp_artifacts["int8_static"][False]
    with pytest.raises(error, match=message):
        qexport.to_onnx(ep, tmp_path / "x.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_an_opset_onnxruntime_cannot_run_is_refused_before_work(tmp_path, mlp_artifacts, monkeypatch):
    """onnx 1.23 defines opset 28; onnxruntime 1.32 has no QuantizeLinear(28): such a file never loaded."""
    from qexport.lower import onnx as onnx_lower

    runnable = onnx_lower.newest_runnable_opset()
    assert runnable >= onnx_lower.DEFAULT_OPSET  # the probe itself: a Q/DQ model loads at the default opset
    monkeypatch.setattr(onnx_lower, "newest_runnable_opset", lambda: 24)
    _, ep, _, _ = mlp_artifacts["int8_static"][False]
    with pytest.raises(LoweringError, match=r"from 18 to 24 \(the newest whose QuantizeLinear/DequantizeLinear onnxruntime"):
        qexport.to_onnx(ep, tmp_path / "x.onnx", opset=25)
    assert list(tmp_path.iterdir()) == []


class GeluMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 32)

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(x))


def test_an_opset_past_onnxscripts_converter_keeps_a_gelu(tmp_path):
    """torch.onnx converts past onnxscript's newest opset (25) with onnx's C converter from its opset-18
    graph, which has no adapter for the Gelu torchlib already put in it: the model stayed at opset 18
    and failed the checker for every model with a GELU (BERT, ViT, GPT-2)."""
    from qexport.lower.onnx import _converter_max, newest_runnable_opset

    opset = _converter_max() + 1
    assert opset <= newest_runnable_opset()
    x = torch.randn(4, 64)
    m, ep = _export(GeluMLP(), "int8_dynamic", x)
    qexport.to_onnx(ep, tmp_path / "g.onnx", opset=opset)
    assert {o.domain: o.version for o in onnx.load(str(tmp_path / "g.onnx")).opset_import}[""] == opset
    assert _rel_err(_run(tmp_path / "g.onnx", x), m(x)) <= math_for(scheme_for("int8_dynamic")).tolerance


def test_refusals_leave_no_file(tmp_path, mlp_artifacts):
    _, ep, _, _ = mlp_artifacts["fp8_e4m3"][False]
    with pytest.raises(LoweringError, match="opset>=21"):
        qexport.to_onnx(ep, tmp_path / "f.onnx", opset=20)
    with pytest.raises(ArtifactError, match=r"must end with \.onnx"):
        qexport.to_onnx(ep, tmp_path / "f.pte")
    with pytest.raises(ArtifactNotFoundError, match="does not exist"):
        qexport.to_onnx(ep, tmp_path / "nope" / "f.onnx")
    with pytest.raises(LoweringError, match="takes an ExportedProgram"):
        qexport.to_onnx(torch.nn.Linear(2, 2), tmp_path / "f.onnx")
    assert list(tmp_path.iterdir()) == []


@torch.library.custom_op("qexport_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


def test_an_op_onnx_cannot_express_is_named(tmp_path):
    """torch.onnx's ConversionError opens with next-steps boilerplate and names the op last (a Mixtral's
    `transformers.grouped_mm_fallback`): the error must carry that cause, not the boilerplate."""
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 8)

        def forward(self, x):
            return _twice(self.fc(x))

    model = qexport.quantize(Twice().eval(), "int8_dynamic")
    ep = qexport.export(model, (torch.randn(2, 64),))
    with pytest.raises(LoweringError, match=r"No ONNX function found for .*qexport_test\.twice") as e:
        qexport.to_onnx(ep, tmp_path / "x.onnx")
    assert "\x1b[" not in str(e.value) and "Next steps" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


class ScratchBuffer(torch.nn.Module):
    """transformers' LongRoPE rotary (Phi-3 128k / 3.5): it writes the factors it picks into a buffer on
    every call, before reading them; the buffer's old value is never read, so it is no state."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 8)
        self.register_buffer("short", torch.ones(8))
        self.register_buffer("long", torch.full((8,), 2.0))
        self.register_buffer("factors", torch.ones(8), persistent=False)

    def forward(self, x):
        self.factors.copy_(torch.where(x.sum() > 0, self.long, self.short))
        return self.fc(x) * self.factors


def test_a_buffer_written_before_it_is_read_is_no_state(tmp_path):
    model = qexport.quantize(ScratchBuffer().eval(), "int8_dynamic")
    x = torch.randn(2, 64)
    ep = qexport.export(model, (x,))
    qexport.to_onnx(ep, tmp_path / "s.onnx")  # was refused: "the program writes state between calls (factors)"
    for sample in (x.abs(), -x.abs()):  # either factor, picked per call
        np.testing.assert_allclose(_run(tmp_path / "s.onnx", sample), model(sample).detach().numpy(), rtol=0.02, atol=0.02)
    assert "factors" in ep.graph_signature.inputs_to_buffers.values()  # the caller's program is left as it was


def test_a_file_onnxruntimes_cpu_provider_has_no_kernels_for_names_the_dtype(tmp_path):
    """A model exported in bfloat16 writes a valid .onnx that onnxruntime's CPU provider cannot run (no
    bf16 Relu, Mul, Add, ...): opening it said the file was corrupt, with no way out."""
    model = qexport.quantize(MLP().to(torch.bfloat16).eval(), "int8_weight_only")
    qexport.to_onnx(qexport.export(model, (torch.randn(2, 64, dtype=torch.bfloat16),)), tmp_path / "bf16.onnx")
    with pytest.raises(qexport.BackendUnavailableError, match=r"bf16.onnx: onnxruntime's CPU provider cannot run this file "
                       r"\(.*Could not find an implementation.*\).*export it in float32"):
        qexport.runners.load(tmp_path / "bf16.onnx")
