"""Upstream's InvokeQuant keeps its torch.compile behaviour with qexport imported, and now exports.

The compile tests mirror pytorch's test/higher_order_ops/test_invoke_quant.py, with operands passed
unpacked: its packed `(x, y)` form fails on torch 2.13 with or without qexport ("gn() missing 1 required
positional argument").
"""

from __future__ import annotations

import logging
import subprocess
import sys
import unittest.mock

import pytest
import torch
from torch._higher_order_ops import InvokeQuant
from torch._inductor.pattern_matcher import Arg, CallFunction, Ignored, Match, PatternMatcherPass, register_graph_pattern
from torch.export import Dim

import qexport  # noqa: F401  (installs the fixes)
from qexport.regions import HOP_TARGETS

invoke_quant_tracer = InvokeQuant()
BACKENDS = ["eager", "aot_eager", "inductor"]


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_simple(backend):
    def gn(x, y):
        return (torch.mul(x, y) + y,)

    def fn(x, y):
        return invoke_quant_tracer(gn, x, y, scheme="nf4", quant_options=invoke_quant_tracer)[0]

    x, y = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(torch.compile(fn, backend=backend)(x, y), gn(x, y)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_construct_inline(backend):
    def gn(x, y):
        return (torch.mul(x, y) + y,)

    def fn(x, y):
        return InvokeQuant(codegen_low_precision=False)(gn, x, y, scheme="nf4")[0]

    x, y = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(torch.compile(fn, backend=backend)(x, y), gn(x, y)[0])


def test_multiple_inductor_keeps_scheme_in_post_grad_graph():
    torch._logging.set_logs(post_grad_graphs=True)
    try:
        def gn(x, y):
            return torch.mul(x, y) + y

        def fn(x, y, z):
            return invoke_quant_tracer(gn, x, y, scheme="nf4") + invoke_quant_tracer(gn, y, z, scheme="nf4")

        x, y, z = torch.randn(8), torch.randn(8), torch.randn(8)
        logger = logging.getLogger("torch._inductor")
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logger.addHandler(handler)
        try:
            res = torch.compile(fn, backend="inductor")(x, y, z)
        finally:
            logger.removeHandler(handler)
        torch.testing.assert_close(res, fn(x, y, z))
        logs = "\n".join(r.getMessage() for r in records)
        assert logs.count("torch.ops.higher_order.invoke_quant(") >= 2 and "nf4" in logs
    finally:
        torch._logging.set_logs()


def _count_nf4_mm_matches(fn, *args) -> int:
    counter = 0
    test_pass = PatternMatcherPass()

    @register_graph_pattern(
        CallFunction(torch.ops.aten.mm, CallFunction(torch.ops.higher_order.invoke_quant, Ignored(), Ignored(), Ignored(), scheme="nf4"), Arg()),
        pass_dict=test_pass,
    )
    def quant_matching(match: Match, *a, **kw):
        nonlocal counter
        counter += 1

    with unittest.mock.patch("torch._inductor.config.post_grad_custom_pre_pass", test_pass.apply):
        torch.compile(fn)(*args)
    return counter


def test_pattern_matching_upstream_form():
    def gn(x, y):
        return torch.mul(x, y) + y

    x, y, z = (torch.randn(64, 64) for _ in range(3))
    assert _count_nf4_mm_matches(lambda x, y, z: invoke_quant_tracer(gn, x, y, scheme="nf4") @ z, x, y, z) == 1
    torch._dynamo.reset()
    assert _count_nf4_mm_matches(lambda x, y, z: invoke_quant_tracer(gn, x, y) @ z, x, y, z) == 0


def test_pattern_matching_qexport_regions():
    """qexport's own regions (dict quant_options with the scheme payload) match the same patterns."""

    def gn(x, y):
        return torch.mul(x, y) + y

    def fn(x, y, z):
        return qexport.invoke_quant(gn, x, y, scheme="nf4") @ z

    x, y, z = (torch.randn(64, 64) for _ in range(3))
    assert _count_nf4_mm_matches(fn, x, y, z) == 1


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("clp", [True, False])
def test_public_invoke_quant_exports_saves_and_loads(strict, clp, tmp_path):
    """FINDINGS: without qexport this fails with 'Node.meta invoke_quant is missing val field'."""

    class M(torch.nn.Module):
        def forward(self, x, y):
            return InvokeQuant(codegen_low_precision=clp)(lambda a, b: (a * b + b,), x, y, scheme="nf4")[0]

    x, y = torch.randn(4, 8), torch.randn(4, 8)
    ep = torch.export.export(M(), (x, y), strict=strict, dynamic_shapes=({0: Dim("b")}, {0: Dim("b")}))
    (node,) = [n for n in ep.graph.nodes if n.op == "call_function" and n.target in HOP_TARGETS]
    assert node.kwargs["scheme"] == "nf4"
    assert node.kwargs["quant_options"] == {"codegen_low_precision": clp}
    torch.testing.assert_close(ep.module()(x, y), x * y + y)
    ep.run_decompositions()
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2")
    (node,) = [n for n in loaded.graph.nodes if n.op == "call_function" and n.target in HOP_TARGETS]
    assert node.kwargs["quant_options"] == {"codegen_low_precision": clp}
    torch.testing.assert_close(loaded.module()(x, y), x * y + y)
    (r,) = qexport.regions(loaded)
    assert r.scheme.name == "nf4" and r.codegen_low_precision is clp


def test_canonicalize_keeps_codegen_low_precision():
    """The Inductor pre-step hands upstream's pass an InvokeQuant built from the dict."""
    from torch._inductor.fx_passes import joint_graph

    class M(torch.nn.Module):
        def forward(self, x):
            return InvokeQuant(codegen_low_precision=False)(lambda a: (a.sin(),), x, scheme="nf4")[0]

    gm = torch.export.export(M(), (torch.randn(3),)).module()
    from torch.fx.experimental.proxy_tensor import make_fx

    g = make_fx(gm)(torch.randn(3))
    joint_graph.canonicalize_quant_mapping(g)
    (n,) = [n for n in g.graph.nodes if n.target is torch.ops.higher_order.invoke_quant]
    assert n.meta["quant_options"] == InvokeQuant(codegen_low_precision=False)
    assert not [x for x in g.graph.nodes if x.target is InvokeQuant]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic", "nf4"])
def test_quantized_model_under_torch_compile(backend, scheme):
    """qexport regions under torch.compile: eager, aot_eager and Inductor match the eager model."""
    from conftest import MLP, quantized, scheme_for

    x = torch.randn(4, 64)
    model = quantized(MLP(), scheme_for(scheme), (x,))
    want = model(x)
    got = torch.compile(model, backend=backend)(x)
    tol = qexport.schemes.math_for(model.layers[0].scheme).tolerance
    assert ((got - want).abs().max() / want.abs().max()).item() <= (1e-6 if backend != "inductor" else tol)


def test_pt2_loads_where_torch_lacks_the_opaque_object_constant(monkeypatch, tmp_path):
    """torch 2.11 (the CUDA image's) has no OPAQUE_OBJ_FILENAME_PREFIX; every qexport.load failed
    there with AttributeError. The shim supplies it, and a saved program loads."""
    from torch.export.pt2_archive import constants

    from conftest import MLP, quantized, scheme_for
    from qexport import _upstream

    monkeypatch.delattr(constants, "OPAQUE_OBJ_FILENAME_PREFIX")
    _upstream.pt2_archive_constants_compat()
    assert constants.OPAQUE_OBJ_FILENAME_PREFIX == "opaque_obj_"
    x = torch.randn(4, 64)
    ep = qexport.export(quantized(MLP(), scheme_for("int8_weight_only"), (x,)), (x,))
    qexport.save(ep, tmp_path / "m.pt2")
    assert torch.equal(qexport.load(tmp_path / "m.pt2").module()(x), ep.module()(x))


def test_a_region_ending_in_a_view_compiles_with_inductor():
    """A linear on a 3-D activation ends its region in `mm` then `view`; upstream's invoke_quant lowering
    asked that view for its operation name (`NotImplementedError: ReinterpretView`): torch.compile failed
    on int8_dynamic transformers, and AOTInductor (the same lowering) on every region it fuses on 3-D
    activations, e.g. every user-defined scheme's."""
    from conftest import MLP, quantized, scheme_for

    x = torch.randn(2, 3, 64)
    model = quantized(MLP(), scheme_for("int8_dynamic"), (x,))
    want = model(x)
    got = torch.compile(model, backend="inductor")(x)
    assert ((got - want).abs().max() / want.abs().max()).item() <= qexport.schemes.math_for(model.layers[0].scheme).tolerance


@pytest.mark.parametrize("version, ok", [("2.10.1+cu128", False), ("1.13.1", False), ("2.11.0+cu130", True),
                                         ("2.12.1", True), ("2.16.0a0+git1234", True), ("3.0.0", True)])
def test_a_torch_older_than_the_minimum_is_refused_by_name(version, ok):
    """pyproject pins torch>=2.11, but a torch installed beside qexport (--no-deps, PYTHONPATH) bypasses the pin."""
    from qexport import _upstream
    from qexport.errors import BackendUnavailableError

    if ok:
        _upstream.check_torch_version(version)
    else:
        with pytest.raises(BackendUnavailableError, match=r"needs torch 2\.11 or newer; this is torch .*pip install 'torch>=2\.11'"):
            _upstream.check_torch_version(version)


def test_the_cli_refuses_an_old_torch_in_one_line(tmp_path):
    """The refusal happens while the CLI imports a command's module, before the command's own error handler."""
    code = ("import sys, torch; torch.__version__ = '2.10.0+cpu'\n"
            "from qexport.cli import main\n"
            f"sys.exit(main(['export', 'm:Net', '--input', '1x4', '-o', {str(tmp_path / 'm.pt2')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip() == ("qexport export: error: qexport needs torch 2.11 or newer; this is torch 2.10.0+cpu: "
                                  "pip install 'torch>=2.11'")
    assert not (tmp_path / "m.pt2").exists()
