"""export() and regions(): one HOP per region, strict and non-strict, dynamic dims, metadata."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

import qexport
from qexport import ExportError, invoke_quant
from qexport.regions import HOP_TARGETS

from conftest import MLP, ConvNet, EmbedNet, TiedLM, TinyTransformer, quantized, scheme_for

WEIGHT_SCHEMES = ["int8_weight_only", "int4_weight_only", "fp8_e4m3", "nf4"]


def hop_nodes(ep):
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target in HOP_TARGETS]


def check_program(ep, model, args, n_regions):
    """The invariants every exported quantized program must hold."""
    assert len(hop_nodes(ep)) == n_regions
    # the whole graph is made of verifier-clean ops: no InvokeQuant dataclass node
    assert not [n for n in ep.graph.nodes if n.op == "call_function" and isinstance(n.target, type)]
    torch.testing.assert_close(ep.module()(*args), model(*args), rtol=0, atol=0)
    dec = ep.run_decompositions()
    assert len(hop_nodes(dec)) == n_regions
    # Decomposed bf16 ops (addmm -> mm + add) may round once more; in schemes that quantize
    # activations dynamically that step can flip a code downstream: stay within the scheme's tolerance.
    got, want = dec.module()(*args), model(*args)
    if all(r.scheme.compute_dtype == "float32" for r in qexport.regions(ep)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        tol = max(qexport.schemes.math_for(r.scheme).tolerance for r in qexport.regions(ep))
        assert ((got - want).abs().max() / want.abs().max()).item() <= tol


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_every_scheme_exports(builtin_scheme, strict):
    torch.manual_seed(0)
    model = quantized(MLP(), builtin_scheme, (torch.randn(4, 64),))
    x = torch.randn(4, 64)
    ep = qexport.export(model, (x,), strict=strict, dynamic_shapes=({0: Dim("batch")},))
    check_program(ep, model, (x,), 2)
    regs = qexport.regions(ep)
    assert [r.name for r in regs] == ["layers.0", "layers.1"]
    r = regs[0]
    assert r.scheme == builtin_scheme and r.scheme_name == builtin_scheme.name
    assert r.op == "linear" and r.module_path == "layers.0"
    assert r.roles[0] == "input" and set(r.roles[1:]) >= set(qexport.schemes.math_for(builtin_scheme).weight_roles)
    assert r.input_shapes[0][1] == 64 and isinstance(r.input_shapes[0][0], str)  # dynamic batch stays symbolic
    assert r.output_shapes == ((r.input_shapes[0][0], 128),)
    assert r.input_dtypes[0] == "float32" and r.output_dtypes == ("float32",)
    assert r.codegen_low_precision is True
    # a different batch size runs through the same program
    x2 = torch.randn(9, 64)
    torch.testing.assert_close(ep.module()(x2), model(x2), rtol=0, atol=0)


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_operands_follow_roles(strict):
    """Strict export lifts HOP inputs in first-use order; export() puts them back in role order."""
    model = quantized(EmbedNet(), scheme_for("nf4"), None)
    idx = torch.randint(0, 100, (2, 5))
    ep = qexport.export(model, (idx,), strict=strict)
    sig = ep.graph_signature.inputs_to_buffers
    for node, region in zip(hop_nodes(ep), qexport.regions(ep)):
        operands = node.args[1:]
        assert len(operands) == len(region.roles)
        for arg, role in zip(operands, region.roles):
            if role == "input":
                assert arg.name not in sig
            else:
                assert sig[arg.name] == f"{region.module_path}.{role}"
    torch.testing.assert_close(ep.module()(idx), model(idx))


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic", "int8_static"])
def test_conv_and_dynamic_spatial_dims(scheme):
    x = torch.randn(2, 3, 16, 16)
    model = quantized(ConvNet(), scheme, (x,))
    ep = qexport.export(model, (x,), dynamic_shapes=({0: Dim("b"), 2: Dim("h", min=4, max=64), 3: Dim("w", min=4, max=64)},))
    check_program(ep, model, (x,), 3)
    x2 = torch.randn(1, 3, 20, 12)
    torch.testing.assert_close(ep.module()(x2), model(x2))
    assert [r.op for r in qexport.regions(ep)] == ["conv2d", "conv2d", "linear"]
    assert qexport.regions(ep)[1].op_params["stride"] == [2, 2]


@pytest.mark.parametrize("scheme", WEIGHT_SCHEMES)
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_transformer_one_region_per_linear(scheme, strict):
    """Acceptance: attention + MLP blocks, each weight scheme, one region per Linear, module() == eager."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    qexport.quantize(model, scheme_for(scheme), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    idx = torch.randint(0, 128, (2, 12))
    ep = qexport.export(model, (idx,), strict=strict, dynamic_shapes=({1: Dim("seq", min=2, max=64)},))
    check_program(ep, model, (idx,), 13)
    assert len({r.module_path for r in qexport.regions(ep)}) == 13


def test_multiple_regions_mixed_schemes():
    model = MLP((64, 64, 64, 32)).eval()
    qexport.quantize(model, "int8_weight_only", filter_fn=lambda m, fqn: fqn == "layers.0")
    qexport.quantize(model, scheme_for("int4_weight_only"), filter_fn=lambda m, fqn: fqn == "layers.1")
    qexport.quantize(model, "fp8_e4m3")
    x = torch.randn(3, 64)
    ep = qexport.export(model, (x,))
    check_program(ep, model, (x,), 3)
    assert [r.scheme.name for r in qexport.regions(ep)] == ["int8_weight_only", "int4_weight_only", "fp8_e4m3"]


def test_scheme_name_is_pattern_matchable():
    """`scheme` stays the bare name (upstream's Inductor patterns match scheme="nf4")."""
    model = quantized(MLP(), scheme_for("nf4"), None)
    ep = qexport.export(model, (torch.randn(2, 64),))
    for n in hop_nodes(ep):
        assert n.kwargs["scheme"] == "nf4"
        assert n.kwargs["quant_options"]["qexport"]["scheme"]["group_size"] == 32


def test_export_errors():
    with pytest.raises(ExportError, match="args must be a tuple"):
        qexport.export(MLP(), torch.randn(2, 64))
    with pytest.raises(ExportError, match="takes an nn.Module"):
        qexport.export(lambda x: x, (torch.randn(2),))
    with pytest.raises(ExportError, match="torch.export failed"):
        qexport.export(MLP(), (torch.randn(2, 10),))  # wrong feature size
    with pytest.raises(ExportError, match="kwargs must be a dict"):  # was a bare TypeError from dict([...])
        qexport.export(MLP(), (torch.randn(2, 64),), [torch.randn(2)])
    with pytest.raises(ExportError, match="strict must be True or False, got 'no'"):  # was a strict export
        qexport.export(MLP(), (torch.randn(2, 64),), strict="no")


def test_shared_quantized_module_is_reported():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.fc(x))

    m = qexport.quantize(Twice().eval(), "int8_weight_only")
    ep = qexport.export(m, (torch.randn(2, 8),))  # called twice: two regions, same module
    assert [r.module_path for r in qexport.regions(ep)] == ["fc", "fc"]


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_a_tied_module_the_forward_never_calls_is_read_through_its_twin(strict):
    """T5's `shared` embedding is tied to `encoder.embed_tokens`, which the forward calls instead:
    the tied pair has one region and exports; an untied module that is never called is an error."""
    class Tied(nn.Module):
        def __init__(self, unused_head: bool = False):
            super().__init__()
            self.shared = nn.Embedding(16, 8)
            self.embed_tokens = nn.Embedding(16, 8)
            self.embed_tokens.weight = self.shared.weight
            self.head = nn.Linear(8, 4) if unused_head else None

        def forward(self, ids):
            return self.embed_tokens(ids)

    ids = torch.randint(0, 16, (2, 5))
    m = qexport.quantize(Tied().eval(), "int8_weight_only")
    ep = qexport.export(m, (ids,), strict=strict)
    assert [r.module_path for r in qexport.regions(ep)] == ["embed_tokens"]
    torch.testing.assert_close(ep.module()(ids), m(ids))
    with pytest.raises(ExportError, match=r"1 quantized module\(s\) have no region.*\(head\).*'head': None"):
        qexport.export(qexport.quantize(Tied(unused_head=True).eval(), "int8_weight_only"), (ids,), strict=strict)


# -- hand-written regions ---------------------------------------------------------------------------
class Custom(nn.Module):
    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.register_buffer("w", torch.randint(-127, 127, (8, 16), dtype=torch.int8))
        self.register_buffer("s", torch.rand(8) / 100)
        self.returns_tuple = returns_tuple

    def forward(self, x):
        def fn(x, w, s):
            y = torch.nn.functional.linear(x, w.float() * s[:, None])
            return (y, y.relu()) if self.returns_tuple else y

        out = invoke_quant(fn, x, self.w, self.s, scheme="int8_weight_only", codegen_low_precision=False)
        return out[0] + out[1] if self.returns_tuple else out * 2


@pytest.mark.parametrize("returns_tuple", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_invoke_quant_tensor_or_tuple(returns_tuple, strict):
    m = Custom(returns_tuple).eval()
    x = torch.randn(3, 16)
    ep = torch.export.export(m, (x,), strict=strict, dynamic_shapes=({0: Dim("b")},))
    (node,) = hop_nodes(ep)
    assert isinstance(node.meta["val"], (tuple, list))  # always a tuple HOP (AOTI needs it)
    torch.testing.assert_close(ep.module()(x), m(x))
    (r,) = qexport.regions(ep)
    assert r.op == "custom" and r.codegen_low_precision is False and r.scheme.name == "int8_weight_only"
    assert len(r.output_shapes) == (2 if returns_tuple else 1)


def test_invoke_quant_eager_just_calls():
    calls = []
    out = invoke_quant(lambda x: calls.append(1) or x + 1, torch.ones(2), scheme="nf4")
    assert calls == [1] and torch.equal(out, torch.full((2,), 2.0))
    with pytest.raises(qexport.UnknownSchemeError):
        invoke_quant(lambda x: x, torch.ones(2), scheme="nope")


def test_export_restores_each_modules_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8))
    qexport.quantize(model, "int8_weight_only")
    model.train()
    model[1].eval()  # the user's choice for this one submodule
    qexport.export(model, (torch.randn(2, 8),))
    assert model.training and not model[1].training and model[0].training
    dropouts = [n for n in qexport.export(model, (torch.randn(2, 8),)).graph.nodes if n.target == torch.ops.aten.dropout.default]
    assert all(n.args[2] is False for n in dropouts)  # traced in eval mode


class _Wrapped(nn.Module):
    """A loaded program inside post-processing."""

    def __init__(self, program):
        super().__init__()
        self.program = program

    def forward(self, idx):
        return self.program(idx).softmax(-1)


@pytest.mark.parametrize("strict", [False, True])
def test_a_loaded_program_re_exports_alone_and_wrapped(strict, tmp_path):
    """ep.module() of a .pt2 refuses eval() (was a bare NotImplementedError out of export), torch.export.load
    reads a tied weight back as two tensors over one storage (was "two operands claim role 'input'"),
    and a wrapped program's regions live under the wrapper's path (their tensors were not found)."""
    model = quantized(TiedLM(), "int8_weight_only", None)
    idx = torch.randint(0, 64, (2, 5))
    qexport.save(qexport.export(model, (idx,)), tmp_path / "tied.pt2")
    program = qexport.load(tmp_path / "tied.pt2").module()
    alone = qexport.export(program, (idx,), strict=strict)
    assert [r.module_path for r in qexport.regions(alone)] == ["emb", "head"]
    wrapped = qexport.export(_Wrapped(program), (idx,), strict=strict)
    assert [r.module_path for r in qexport.regions(wrapped)] == ["program.emb", "program.head"]
    torch.testing.assert_close(wrapped.module()(idx), model(idx).softmax(-1), rtol=0, atol=0)
    assert [r.module_path for r in qexport.regions(program)] == ["emb", "head"]  # the user's module is left as it was
    if not strict:  # torch's strict export refuses an UnflattenedModule itself (torch.compiler.disable'd input processing)
        unflat = qexport.export(_Wrapped(torch.export.unflatten(qexport.load(tmp_path / "tied.pt2"))), (idx,))
        assert [r.module_path for r in qexport.regions(unflat)] == ["program.emb", "program.head"]


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_dim_names_reach_every_manifest(form, tmp_path):
    """Named torch.export.Dims replace torch's symbols in the .pt2 manifest, survive load, and reach
    the artifacts lowered from it (inputs named, dim_names recorded)."""
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 8)

        def forward(self, x, mask):
            return self.fc(x) * mask[..., :1]

    model = qexport.quantize(TwoInputs(), "int8_dynamic")
    batch, seq = Dim("batch"), Dim("seq", max=64)
    spec = {0: batch, 1: seq}
    shapes = (spec, spec) if form == "tuple" else {"x": spec, "mask": spec}
    ep = qexport.export(model, (torch.randn(2, 5, 16),), {"mask": torch.ones(2, 5, 3)}, dynamic_shapes=shapes)
    qexport.save(ep, tmp_path / "m.pt2")
    assert sorted(qexport.inspect(tmp_path / "m.pt2").extra["dim_names"].values()) == ["batch", "seq"]
    pytest.importorskip("onnx", reason="the .onnx half needs qexport[onnx]; the core install (torch, numpy) stops here")
    qexport.to_onnx(qexport.load(tmp_path / "m.pt2"), tmp_path / "m.onnx")
    inputs = qexport.inspect(tmp_path / "m.onnx").extra["inputs"]
    assert [[d if isinstance(d, int) else d["name"] for d in i["shape"]] for i in inputs] == [["batch", "seq", 16], ["batch", "seq", 3]]
    assert inputs[0]["shape"][1]["max"] == 64


def test_dim_names_from_a_shapes_collection(tmp_path):
    """torch's per-tensor form of dynamic_shapes names its dims too (they were left as torch's symbols)."""
    x = torch.randn(3, 5, 64)
    shapes = torch.export.ShapesCollection()
    shapes[x] = {0: Dim("batch"), 1: Dim("seq")}
    ep = qexport.export(quantized(MLP(), "int8_dynamic", (x,)), (x,), dynamic_shapes=shapes)
    manifest = qexport.save(ep, tmp_path / "m.pt2")
    assert sorted(manifest.extra["dim_names"].values()) == ["batch", "seq"]
    assert [d["name"] for d in manifest.extra["inputs"][0]["shape"][:2]] == ["batch", "seq"]


def test_integer_inputs_that_index_a_table_record_its_range():
    """signature.index_ranges: embedding, index_select and indexing bound the input they are fed from,
    through ops that keep every value (view); a slice does not (the part left out may be anything)."""
    from qexport.signature import InputSpec, program_inputs

    class Indexing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.register_buffer("table", torch.randn(7, 4))

        def forward(self, a, b, c, d, x):
            return (self.emb(a.view(-1)).sum() + self.table.index_select(0, b).sum() + self.table[c].sum()
                    + self.emb(d[:, :2]).sum() + x.sum())

    args = (torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
            torch.zeros(2, 4, dtype=torch.long), torch.zeros(2))
    specs = program_inputs(torch.export.export(Indexing(), args))
    assert [s.values for s in specs] == [(0, 9), (0, 6), (-7, 6), None, None]
    assert specs[0].describe() == "a: int64[2, 3] in [0, 9]"
    assert InputSpec.from_json(specs[2].to_json()) == specs[2] and "values" not in specs[3].to_json()
