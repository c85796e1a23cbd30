"""AOTInductor lowering (qexport.compile / load_compiled / plan) and the CPU kernel table.

Every built-in scheme is compiled once (module-scoped fixture) on TinyTransformer, whose regions are
linear layers with 3-D inputs and an embedding, exported with dynamic batch and sequence dims; the
package then runs on a shape it was not traced with and must match the eager quantized model within
the scheme's documented tolerance.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import qexport
import serializers
from qexport.errors import ArtifactError, ArtifactNotFoundError, LoweringError
from qexport.lower import aoti
from qexport.lower.cpu_target import CPUTarget, compile_target
from qexport.lower.kernels import cpu as cpu_kernels
from qexport.lower.kernels import Decline, KernelChoice, apply_kernels, register_kernel, unregister_kernel
from qexport.regions import iter_region_nodes
from qexport.schemes import math_for

from conftest import MLP, ConvNet, EmbedNet, TinyTransformer, SCHEME_ARGS, quantized, scheme_for

SCHEMES = qexport.schemes.builtin_names()
# The CPU table's family of each scheme's linear regions (None: no CPU kernel, Inductor fuses them).
# The kernels per row bucket depend on the compile target's ISA: tests/test_aoti_isa.py checks them
# per forced ISA; here the package must record the plan the table gives for this machine.
CPU_FAMILY = {
    "int8_weight_only": "int8_weight_only", "int4_weight_only": "int4", "int8_dynamic": "int8_activations",
    "int8_static": "int8_activations", "fp8_e4m3": "fp8", "nf4": None,
    "int8_dynamic_int4_weight": "int8_dynamic_int4_weight",
}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def dynamic_tokens():
    return ({0: torch.export.Dim("batch", max=16), 1: torch.export.Dim("seq", min=2, max=64)},)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aoti")


class _Built(dict):
    """scheme -> (eager quantized model, exported program, package path), compiled on first use,
    once per module (so `-k int4` compiles one package, the full file six)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.workdir = workdir

    def __missing__(self, name: str):
        torch.manual_seed(0)
        idx = torch.randint(0, 128, (2, 8))
        if name == "int8_dynamic":  # exported from a transposed view: the package still takes contiguous inputs
            idx = idx.t().contiguous().t()
        model = quantized(TinyTransformer(), scheme_for(name), idx)
        ep = qexport.export(model, (idx,), dynamic_shapes=dynamic_tokens())
        source = ep
        if name == "int8_weight_only":  # compile from a saved .pt2 path as well as from a program
            source = self.workdir / f"{name}_program.pt2"
            qexport.save(ep, source)
        path = qexport.compile(source, self.workdir / f"{name}.pt2", device="cpu")
        self[name] = (model, ep, path)
        return self[name]


@pytest.fixture(scope="module")
def built(workdir):
    return _Built(workdir)


@pytest.mark.parametrize("name", SCHEMES)
def test_numerics_match_eager_on_new_shapes(built, name):
    model, _, path = built[name]
    runner = qexport.load_compiled(path)
    tol = math_for(scheme_for(name)).tolerance
    # none is the traced (2, 8): dynamic batch and sequence; (1, 1): one row, below seq's exported min 2,
    # which torch (and load_compiled's check) take as the tracer's 0/1 specialization, not the model's
    for shape in [(1, 5), (3, 17), (17, 3), (1, 1)]:
        idx = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(1))
        if shape == (17, 3):  # a transposed view: load_compiled's runner copies it into the package's layout
            idx = idx.t()
        with torch.no_grad():
            ref = model(idx)
        y = runner(idx)
        assert y.shape == ref.shape
        assert rel_err(y, ref) <= tol, f"{name} {shape}: {rel_err(y, ref):.2e} > {tol}"


@pytest.mark.parametrize("inputs, match", [
    ((torch.zeros(2, 8),), "input idx is float32; the program takes int64"),
    ((torch.zeros(2, 8, dtype=torch.int32),), "input idx is int32; the program takes int64"),
    ((torch.zeros(17, 8, dtype=torch.int64),), r"shape \[17, 8\], which does not fit idx: int64\[batch\[0..16\], seq\[2..64\]\]"),
    ((torch.zeros(2, 65, dtype=torch.int64),), r"shape \[2, 65\]"),
    ((torch.zeros(8, dtype=torch.int64),), r"shape \[8\]"),
    ((torch.full((2, 8), 128),), r"holds 128, outside \[0, 127\]"),
    ((torch.zeros(2, 8, dtype=torch.int64),) * 2, r"takes 1 tensor input\(s\) \(idx: .*\); got 2"),
    ((), "got 0"),
    # not tensors: a numpy array and a nested list used to be dropped silently, leaving "got 0 (none)"
    ((torch.zeros(2, 8, dtype=torch.int64).numpy(),), r"got 0 tensor\(s\) and 1 other value\(s\) \(ndarray\): pass torch tensors"),
    (([[0, 1], [2, 3]],), r"got 0 tensor\(s\) and 4 other value\(s\) \(int\)"),
])
def test_load_compiled_refuses_inputs_the_package_would_misread(built, inputs, match):
    """AOTI packages read whatever they are handed (torch 2.13): a float input gave NaN, a wrong rank
    garbage of a wrong shape, a token id past the table aborts the process. The runner refuses first."""
    _, _, path = built["int8_weight_only"]
    with pytest.raises(qexport.UsageError, match=match):
        qexport.load_compiled(path)(*inputs)


@pytest.mark.parametrize("name", SCHEMES)
def test_inspect_lists_regions_schemes_and_kernels(built, name):
    _, ep, path = built[name]
    manifest = qexport.inspect(path)
    assert manifest.artifact == "aoti"
    assert [(r.name, r.scheme) for r in manifest.regions] == [(r.name, r.scheme) for r in qexport.regions(ep)]
    records = {r.name: {"kernel": r.lowering.kernel, **r.lowering.details} for r in manifest.regions}
    assert manifest.extra["device"] == "cpu"
    target = CPUTarget.from_dict(manifest.extra["cpu_target"])
    assert target == compile_target()
    isa = cpu_kernels.plan_isa(target)
    planned = {r.name: r.kernel for r in aoti.plan(ep).regions}
    for region in qexport.regions(ep):
        record = records[region.name]
        assert record["kernel"] == planned[region.name], region.name
        if region.op != "linear" or CPU_FAMILY[name] is None:
            assert record["kernel"] == "inductor" and "plan" not in record, region.name
            continue
        # batch and sequence are dynamic up to 16 x 64 rows: every bucket of the ISA's plan is reachable
        table = cpu_kernels.PLANS[CPU_FAMILY[name]][isa]
        assert record["isa"] == isa
        assert [b["max_m"] for b in record["plan"]] == [m for m, _ in table], region.name
        gemm = cpu_kernels.gemm_dtype(target, scheme_for(name).torch_compute_dtype)
        names = [cpu_kernels.KERNEL_NAMES[k].format(dtype=str(gemm).removeprefix("torch.")) for _, k in table]
        assert [b["kernel"] for b in record["plan"]] == names, region.name


@pytest.mark.parametrize("name,dtype,params", [
    ("int4_weight_only", torch.bfloat16, {}), ("int8_weight_only", torch.bfloat16, {}),
    ("int4_weight_only", torch.float32, {"compute_dtype": "float32"}),
])
def test_a_quantized_table_whose_casts_are_no_ops_compiles(name, dtype, params, tmp_path):
    """When the model's dtype is the scheme's compute dtype, the casts at the end of a weight-only table's
    region are no-ops; its output must still be a buffer of its own (as a view of the dequantized rows,
    Inductor's invoke_quant lowering failed: NotImplementedError: ReinterpretView; seen compiling a bf16
    Llama, and an fp32 one with int4 weights computing in fp32)."""
    torch.manual_seed(0)
    idx = torch.randint(0, 100, (2, 5))
    model = quantized(EmbedNet().to(dtype), qexport.schemes.get(name, **SCHEME_ARGS.get(name, {}), **params), (idx,))
    ep = qexport.export(model, (idx,), dynamic_shapes=({0: torch.export.Dim("b", max=64), 1: torch.export.Dim("s", max=64)},))
    y = qexport.load_compiled(qexport.compile(ep, tmp_path / "emb.pt2"))(idx)
    with torch.no_grad():
        assert rel_err(y, model(idx)) <= math_for(scheme_for(name)).tolerance


def test_a_package_compiled_on_one_thread_runs_its_loops_on_the_runtimes_threads(tmp_path):
    """Inductor freezes the compiling process's thread count into the C++ (one thread: no parallel loop at
    all); packages must take the count where they run, so one built in a one-CPU container still spreads
    over a server's cores."""
    import zipfile

    torch.manual_seed(0)
    x = torch.randn(1, 1024)  # one row: the int8 loop over 1024 outputs, wide enough for Inductor to split
    model = quantized(torch.nn.Sequential(torch.nn.Linear(1024, 1024)), scheme_for("int8_weight_only"), x)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        path = qexport.compile(qexport.export(model, (x,)), tmp_path / "one_thread.pt2")
    finally:
        torch.set_num_threads(saved)
    assert qexport.inspect(path).extra["inductor_options"]["cpp.dynamic_threads"] is True
    with zipfile.ZipFile(path) as z:
        cpp = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("kernel.cpp"))
    assert "#pragma omp parallel" in cpp  # without the option: none (a one-thread compile writes serial loops)
    torch.set_num_threads(2)
    try:
        y = qexport.load_compiled(path)(x)
    finally:
        torch.set_num_threads(saved)
    with torch.no_grad():
        assert rel_err(y, model(x)) <= math_for(scheme_for("int8_weight_only")).tolerance


def test_package_loads_with_torch_alone(built):
    _, _, path = built["int4_weight_only"]
    runner = torch._inductor.aoti_load_package(path)
    assert runner(torch.randint(0, 128, (1, 4))).shape == (1, 4, 128)


# -- the rewrite itself (no compile) ------------------------------------------------------------

def _targets(ep) -> list:
    """call_function targets of the program, torch.cond's branches (the row buckets) included."""
    return [n.target for m in ep.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function"]


def test_int4_weights_are_repacked_once_into_buffers(built):
    _, ep, _ = built["int4_weight_only"]
    lowered, decisions = apply_kernels(ep, "cpu", {"qexport.fuse_siblings": "off"})  # one kernel per region
    linear = [d for d in decisions if d.region.op == "linear"]
    targets = _targets(lowered)
    assert targets.count(torch.ops.quantized.int4mm_packed_weight_cpu.default) == len(linear) == 13
    # Packing happened here, not in the graph: no per-call conversion or unpacking remains.
    assert torch.ops.aten._convert_weight_to_int4pack_for_cpu.default not in targets
    assert sum(1 for _ in iter_region_nodes(lowered)) == 1  # the embedding stays a region for Inductor
    for d in linear:
        m = d.region.module_path
        packed = lowered.state_dict[f"{m}.weight_int4pack"]
        assert packed.dtype == torch.int32 or packed.dtype == torch.uint8
        assert f"{m}.weight" not in lowered.state_dict  # the unpacked weight is dropped
        assert lowered.state_dict[f"{m}.weight_scales_and_zeros"].dtype == torch.bfloat16
    tagged = [n for n in lowered.graph.nodes if "qexport_region" in (n.meta.get("custom") or {})]
    assert {n.meta["custom"]["qexport_region"]["kernel"] for n in tagged} == {d.kernel for d in linear}
    assert all("aten._weight_int4pack_mm_for_cpu" in d.kernel for d in linear)  # after the one-row loop on AVX2
    # the original program is untouched
    assert sum(1 for _ in iter_region_nodes(ep)) == 14 and "blocks.0.q.weight" in ep.state_dict


def _state_bytes(ep) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in ep.state_dict.values()}.values())


@pytest.mark.parametrize("name", ["int4_weight_only", "int8_weight_only", "int8_dynamic"])
def test_sibling_regions_run_as_one_kernel_on_stacked_weights(built, name):
    """q, k and v read one input with one scheme: one kernel over their stacked weights, a slice of its
    output each (fewer kernels per decode step); same numbers, same bytes, every plan saying so."""
    model, ep, _ = built[name]
    fused, plans = apply_kernels(ep, "cpu")
    apart, plans_apart = apply_kernels(ep, "cpu", {"qexport.fuse_siblings": "off"})
    by_name = {p.region.name: p for p in plans}
    for b in ("blocks.0", "blocks.1"):
        qkv = [f"{b}.{p}" for p in "qkv"]
        for region in qkv:
            plan = by_name[region]
            assert plan.details["siblings"] == qkv and plan.details["stacked_out_features"] == 3 * 64
            assert "one kernel with" in plan.reason and plan.kernel == by_name[qkv[0]].kernel
        for region in (f"{b}.o", f"{b}.up", f"{b}.down"):  # o, up and down read other inputs
            assert "siblings" not in by_name[region].details
        assert [k for k in fused.state_dict if k.startswith(f"{b}.q.")]  # the stack is stored under the first one
        assert not [k for k in fused.state_dict if k.startswith((f"{b}.k.", f"{b}.v."))]  # stored once, in the stack
    assert [p.region.name for p in plans] == [p.region.name for p in plans_apart]
    slices = [n for n in fused.graph.nodes if n.target == torch.ops.aten.slice.Tensor and n.args[1] == n.args[0].meta["val"].dim() - 1
              and (n.meta.get("custom") or {}).get("qexport_region")]
    assert len(slices) == 6
    # the stack replaces the three weights, no copy kept (a few bytes less: per-region scalars stored once)
    assert 0.999 * _state_bytes(apart) <= _state_bytes(fused) <= _state_bytes(apart)
    for shape in [(1, 5), (3, 17)]:
        idx = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            y, y_apart, ref = fused.module()(idx), apart.module()(idx), model(idx)
        assert rel_err(y, y_apart) <= 1e-5, shape
        assert rel_err(y, ref) <= math_for(scheme_for(name)).tolerance, shape


class _HeadsOnOneInput(torch.nn.Module):
    """Two heads read one hidden state; the first shares its weight with the embedding (tied)."""

    def __init__(self, tied: bool):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 32)
        self.head, self.aux = torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(32, 64, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        return self.head(h) + self.aux(h)


@pytest.mark.parametrize("tied", [False, True])
def test_siblings_with_a_tied_weight_stay_apart(tied):
    """Stacking a weight that another region also reads (the embedding) would store it twice: such
    siblings keep one kernel each; untied ones are stacked."""
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 8))
    model = qexport.quantize(_HeadsOnOneInput(tied).eval(), {torch.nn.Linear: "int8_weight_only", torch.nn.Embedding: "int8_weight_only"})
    ep = qexport.export(model, (idx,))
    lowered, plans = apply_kernels(ep, "cpu")
    heads = [p for p in plans if p.region.op == "linear"]
    assert len(heads) == 2 and all(p.taken for p in heads)
    assert [("siblings" in p.details) for p in heads] == [not tied, not tied]
    apart, _ = apply_kernels(ep, "cpu", {"qexport.fuse_siblings": "off"})
    assert _state_bytes(lowered) <= _state_bytes(apart)
    with torch.no_grad():
        assert rel_err(lowered.module()(idx), model(idx)) <= math_for(scheme_for("int8_weight_only")).tolerance


class _ViewedSiblings(torch.nn.Module):
    """Four siblings whose outputs are viewed as the model likes: merged across the last dim (no view of a
    slice can), split (one can), returned as they are, and windowed by as_strided (Longformer's chunks)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(32, n) for n in (16, 16, 32, 16))

    def forward(self, x):
        heads = self.b(x).view(x.shape[0], x.shape[1], 4, 4).transpose(1, 2) * 2
        windows = self.d(x).as_strided((x.shape[0], 2, 16), (x.shape[1] * 16, 16, 1)) * 1
        return self.a(x).mul_(2).view(x.shape[0], -1), heads, self.c(x), windows  # mul_: an alias too


def test_sibling_slices_are_copied_only_where_a_view_or_the_output_needs_it():
    """A sibling's output is a slice of the stack's, strided: a `view` export traced across its last dim
    failed AOTInductor's retrace ("Cannot view a tensor with shape [2, 5, 16] and strides (240, 48, 1)"),
    an `as_strided` read the stack's other columns, and an output reached the caller strided. Those get
    a contiguous copy; a view that holds does not."""
    torch.manual_seed(0)
    model = qexport.quantize(_ViewedSiblings().eval(), "int8_weight_only")
    ep = qexport.export(model, (torch.randn(2, 5, 32),), dynamic_shapes=({0: torch.export.Dim("b", max=8), 1: torch.export.Dim("s", min=3, max=64)},))
    lowered, plans = apply_kernels(ep, "cpu")
    assert all(p.details["siblings"] == ["b", "d", "a", "c"] for p in plans)  # graph order
    copies = [n for n in lowered.graph.nodes if n.target == torch.ops.aten.clone.default]
    # d's slice (outputs 16:32), a's (32:48) and c's (48:80) copied; b's (0:16) view splits its last dim and holds
    assert sorted(n.args[0].args[2] for n in copies) == [16, 32, 48]
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        ys, refs = lowered.module()(x), model(x)
    for y, ref in zip(ys, refs):
        assert rel_err(y, ref) <= math_for(scheme_for("int8_weight_only")).tolerance
        assert y.stride() == ref.stride()


def test_inspect_cli_names_the_siblings(built, capsys):
    from qexport.cli import main

    assert main(["inspect", str(built["int8_weight_only"][2])]) == 0
    out = capsys.readouterr().out
    assert "one kernel each, weights stacked: blocks.0.q + blocks.0.k + blocks.0.v; blocks.1.q + blocks.1.k + blocks.1.v\n" in out


class _TwoSixteenWide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.a(x) * self.b(x)


@pytest.mark.parametrize("scheme, stackable", [("int8_weight_only", True), ("nf4", False)])
def test_sibling_key_takes_only_per_channel_roles(scheme, stackable):
    """Stacking is decided by the scheme's roles, not by a first dim that happens to match: nf4's
    16-entry codebook is shared by every channel, and out_features=16 must not make it look per channel."""
    from qexport.lower.kernels import _sibling_key
    from qexport.regions import region_nodes

    x = torch.randn(4, 32)
    ep = qexport.export(quantized(_TwoSixteenWide(), scheme_for(scheme) if scheme != "nf4" else qexport.schemes.get("nf4", group_size=32), x), (x,))
    keys = [_sibling_key(ep, node, region) for node, region in region_nodes(ep)]
    assert len(keys) == 2
    if stackable:
        assert keys[0] is not None and keys[0] == keys[1]
    else:
        assert keys == [None, None]


def test_sibling_fusion_reaches_plan_and_refuses_unknown_modes(built):
    _, ep, _ = built["int8_weight_only"]
    report = aoti.plan(ep)
    assert sum("one kernel with" in r.reason for r in report.regions) == 6
    assert not any("one kernel with" in r.reason for r in aoti.plan(ep, options={"qexport.fuse_siblings": "off"}).regions)
    with pytest.raises(LoweringError, match="qexport.fuse_siblings='yes' is not one of"):
        aoti.plan(ep, options={"qexport.fuse_siblings": "yes"})


AVX2_TARGET = CPUTarget("x86_64", "AVX2", "x86-64-v3", ("avx", "avx2", "fma3"), forced=True)
VNNI_TARGET = CPUTarget("x86_64", "AVX512", "native", ("avx2", "avx512_bf16", "avx512_f", "avx512_vnni"))


@pytest.mark.parametrize("target", [AVX2_TARGET, VNNI_TARGET], ids=["avx2", "avx512_vnni_bf16"])
def test_int4_head_with_output_features_not_a_multiple_of_16(monkeypatch, target):
    """tinygemm's CPU packing refuses N % 16 != 0 ("expect N to be dividable by 16"; the README's
    Linear(128, 10) raised a RuntimeError in qexport.compile): such a layer decodes its weights instead,
    the others keep tinygemm."""
    monkeypatch.setattr(cpu_kernels, "compile_target", lambda: target)
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    model = quantized(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval(),
                      scheme_for("int4_weight_only"), x)
    ep = qexport.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=256)},))
    lowered, decisions = apply_kernels(ep, "cpu")
    kernels = [{b["kernel"].split(" ")[0] for b in d.details["plan"]} for d in decisions]
    assert "aten._weight_int4pack_mm_for_cpu" in kernels[0] and "aten._weight_int4pack_mm_for_cpu" not in kernels[1]
    assert "2.weight_int4pack" not in lowered.state_dict and "0.weight_int4pack" in lowered.state_dict
    for rows in (3, 40):  # tinygemm up to 24 rows on AVX2, 4 on AVX-512; decoded weights above
        x2 = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            assert rel_err(lowered.module()(x2), model(x2)) <= 2e-2, rows


class _TwoHeads(torch.nn.Module):
    """Two linear heads on one input (siblings): 32 outputs tinygemm packs, 10 it cannot."""

    def __init__(self):
        super().__init__()
        self.body, self.wide, self.narrow = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32), torch.nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.wide(h), self.narrow(h)


@pytest.mark.parametrize("target", [AVX2_TARGET, VNNI_TARGET], ids=["avx2", "avx512_vnni_bf16"])
def test_siblings_stay_apart_where_the_stack_would_lose_a_members_kernel(monkeypatch, target):
    """Stacked, the heads have 42 outputs, which tinygemm cannot pack: the 32-output head ran on decoded
    weights where its own plan had tinygemm. Siblings are stacked only where the stack keeps every kernel."""
    monkeypatch.setattr(cpu_kernels, "compile_target", lambda: target)
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    model = quantized(_TwoHeads().eval(), scheme_for("int4_weight_only"), x)
    ep = qexport.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=256)},))
    lowered, decisions = apply_kernels(ep, "cpu")
    plans = {d.region.name: {b["kernel"].split(" ")[0] for b in d.details["plan"]} for d in decisions}
    assert "aten._weight_int4pack_mm_for_cpu" in plans["wide"] and "aten._weight_int4pack_mm_for_cpu" not in plans["narrow"]
    assert not any("siblings" in d.details for d in decisions)
    x2 = torch.randn(3, 64)
    with torch.no_grad():
        assert all(rel_err(y, r) <= 2e-2 for y, r in zip(lowered.module()(x2), model(x2)))


@pytest.mark.parametrize("scheme, k", [("int8_dynamic_int4_weight", 32), ("int4_weight_only", 32), ("int8_weight_only", 48)])
def test_one_row_program_whose_layer_the_loop_cannot_take(monkeypatch, scheme, k):
    """A static one-row program (a pooled classifier head) reaches only the one-row bucket; where the
    loop cannot take K (int4: 32, under one 64-code block; int8: 48, not whole 32-byte blocks) the
    bucket falls to the next kernel, not to nothing (compile raised StopIteration)."""
    monkeypatch.setattr(cpu_kernels, "compile_target", lambda: AVX2_TARGET)
    torch.manual_seed(0)
    x = torch.randn(1, k)
    s = qexport.schemes.get(scheme, **({"group_size": 32} if "int4" in scheme else {}))
    model = quantized(torch.nn.Sequential(torch.nn.Linear(k, 48)).eval(), s, x)
    lowered, (decision,) = apply_kernels(qexport.export(model, (x,)), "cpu")
    assert "Inductor C++ loop" not in decision.kernel
    with torch.no_grad():
        assert rel_err(lowered.module()(x), model(x)) <= 2e-2


@pytest.mark.parametrize("target", [AVX2_TARGET, VNNI_TARGET], ids=["avx2", "avx512_vnni_bf16"])
@pytest.mark.parametrize("large_m", ["bf16_weights", "dequant"])
def test_int8_dynamic_int4_weight_cpu_kernel_is_the_reference_at_every_row_count(monkeypatch, target, large_m):
    """8da4w on CPU computes in fp32 as its reference does, on every ISA: the int4 loop at one row, the
    fp32 GEMM above (on weights decoded at compile time, or per call with large_m="dequant"); never
    tinygemm, whose bf16 output moved greedy tokens of a small LM off eager's."""
    monkeypatch.setattr(cpu_kernels, "compile_target", lambda: target)
    torch.manual_seed(0)
    x = torch.randn(4, 256)
    model = quantized(torch.nn.Sequential(torch.nn.Linear(256, 192), torch.nn.ReLU(), torch.nn.Linear(192, 64)).eval(),
                      scheme_for("int8_dynamic_int4_weight"), x)
    ep = qexport.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=256)},))
    lowered, decisions = apply_kernels(ep, "cpu", options={"qexport.large_m": large_m})
    assert len(decisions) == 2 and all(d.taken for d in decisions)
    assert sum(1 for _ in iter_region_nodes(lowered)) == 0
    assert [[(b["max_m"], b["kernel"].split(" ")[0]) for b in d.details["plan"]] for d in decisions] == \
        [[(1, "Inductor"), (None, "float32")]] * 2
    assert all(("per call" if large_m == "dequant" else "compile time") in d.kernel for d in decisions)
    state = lowered.state_dict
    assert not [k for k in state if "int4pack" in k]
    assert len([k for k in state if k.endswith("weight_float32")]) == (0 if large_m == "dequant" else 2)
    # the loop's layout follows the vector width: 16 lanes with AVX-512 where K allows (256), 8 where not (192)
    lanes = 16 if target is VNNI_TARGET else 8
    assert [state[f"{i}.weight_int4_words"].shape[-1] for i in (0, 2)] == [lanes, 8]
    for rows in (1, 3, 25, 200):
        x2 = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            assert rel_err(lowered.module()(x2), model(x2)) <= 1e-5, rows


@pytest.mark.parametrize("target", [VNNI_TARGET, AVX2_TARGET], ids=["avx512_vnni_bf16", "avx2"])
def test_int8_dynamic_int4_weight_stores_each_tokens_qparams_once(monkeypatch, target):
    """Every 8da4w kernel's per-token scale and zero point pass through `_stored` (one buffer per row,
    not recomputed inside the vector loop that rounds the activation), as every activation kernel's do;
    the one-row int4 loop and the fp32 GEMM store the rounded / incoming activation too (the loop
    reads it once per output channel: left inline, 8da4w's loop ran at 3x int4 weight-only's time)."""
    monkeypatch.setattr(cpu_kernels, "compile_target", lambda: target)
    x = torch.randn(4, 64)
    model = quantized(MLP(), scheme_for("int8_dynamic_int4_weight"), x)
    ep = qexport.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=256)},))
    lowered, _ = apply_kernels(ep, "cpu")
    stored = [n for m in lowered.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
              for n in m.graph.nodes if n.target == torch.ops.prims.inductor_force_stride_order.default]
    # per region, the loop: scale, zero point, the activation pre-scaled per nibble position, its
    # per-group sums and its top nibble's per-block sums; the fp32 GEMM: scale, zero point, activation
    assert len(stored) == 2 * (6 + 3)


def test_int8_weight_only_uses_bf16_activations(built):
    _, ep, _ = built["int8_weight_only"]
    lowered, _ = apply_kernels(ep, "cpu")
    mms = [n for m in lowered.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
           for n in m.graph.nodes if n.target == torch.ops.aten._weight_int8pack_mm.default]
    assert len(mms) == 13 - 2 * 2  # 13 linear regions; each block's q/k/v as one kernel (siblings)
    assert all(n.args[0].meta["val"].dtype == torch.bfloat16 for n in mms)
    assert all(n.args[2].meta["val"].dtype == torch.bfloat16 for n in mms)


def test_conv_regions_fall_back_to_inductor_and_match(workdir):
    x = torch.randn(2, 3, 16, 16)
    model = quantized(ConvNet(), scheme_for("int8_static"), x)
    ep = qexport.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=8)},))
    report = aoti.plan(ep)
    assert [(r.name, r.kernel) for r in report.regions][:2] == [("conv1", "inductor"), ("conv2", "inductor")]
    assert report.regions[2].kernel != "inductor"  # which kernel depends on the ISA (test_aoti_isa.py)
    assert "no aoti-cpu lowering registered for int8_static conv2d" in report.regions[0].reason
    lowered, _ = apply_kernels(ep, "cpu")
    x2 = torch.randn(5, 3, 16, 16)
    assert rel_err(lowered.module()(x2), model(x2)) <= math_for(scheme_for("int8_static")).tolerance


def test_inductor_only_option_keeps_every_region():
    x = torch.randn(4, 64)
    ep = qexport.export(quantized(MLP(), scheme_for("int8_weight_only"), x), (x,))
    report = aoti.plan(ep, options={"qexport.kernels": "inductor"})
    assert [r.kernel for r in report.regions] == ["inductor", "inductor"]
    assert str(report).endswith("\naoti-cpu: plan only, nothing written")  # no file, no "0 bytes"


# -- the kernel table mechanism -------------------------------------------------------------------

@pytest.fixture
def custom_scheme():
    s = qexport.schemes.register(qexport.schemes.get("int8_weight_only").replace(name="test_aoti_int8_pt", granularity="per_tensor"))
    yield s
    qexport.schemes.unregister(s.name)


def test_register_kernel_scheme_entry_wins_over_family(custom_scheme):
    x = torch.randn(4, 64)
    model = quantized(MLP(), custom_scheme, x)
    ep = qexport.export(model, (x,))
    calls = []

    @register_kernel("test_aoti_int8_pt", "cpu", "linear")
    def dequant_then_mm(ctx):
        calls.append(ctx.region.name)
        if ctx.region.name == "layers.1":
            return Decline("test: second layer declined")
        w = ctx.tensor("weight").float() * ctx.tensor("weight_scale").float()  # a float copy, for the test only
        return KernelChoice("test.float_mm", "test kernel", lambda x, w, *b: torch.nn.functional.linear(x, w, *b),
                            operands=(("weight_f32", w), *ctx.optional("bias")))

    try:
        lowered, decisions = apply_kernels(ep, "cpu")
    finally:
        unregister_kernel("test_aoti_int8_pt", "cpu", "linear", "dequant_then_mm")
    assert calls == ["layers.0", "layers.1"]
    assert decisions[0].kernel == "test.float_mm"
    # declined by the scheme entry, then taken by the family's int8 kernel
    assert decisions[1].kernel == "aten._weight_int8pack_mm"
    assert "layers.0.weight_f32" in lowered.state_dict
    assert rel_err(lowered.module()(x), model(x)) <= math_for(custom_scheme).tolerance
    # per-tensor scale expanded to one per output channel for int8pack_mm
    assert lowered.state_dict["layers.1.weight_scale_bfloat16"].shape == (32,)


def test_decline_reason_reaches_the_report():
    s = qexport.schemes.get("int8_weight_only", compute_dtype="float32")
    x = torch.randn(4, 64)
    ep = qexport.export(quantized(MLP(), s, x), (x,))
    report = aoti.plan(ep)
    assert all(r.kernel == "inductor" and "fp32 activations" in r.reason for r in report.regions)


# -- errors, before any work, and no partial files ------------------------------------------------

@pytest.fixture(scope="module")
def small_program():
    x = torch.randn(4, 64)
    return qexport.export(quantized(MLP(), scheme_for("int8_weight_only"), x), (x,))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"device": "tpu"}, LoweringError, "device='tpu' is not one of"),
        ({"options": {"max_autotun": True}}, LoweringError, "unknown Inductor option"),
        ({"options": {"qexport.kernel": "auto"}}, LoweringError, "unknown qexport option"),
        ({"options": {"qexport.kernels": "fast"}}, LoweringError, "is not one of"),
        ({"options": {"aot_inductor.output_path": "x"}}, LoweringError, "set by qexport.compile"),
        # each compiled, then wrote a package that crashed (SIGSEGV), was refused or failed at the end
        ({"options": {"aot_inductor.package_constants_in_so": False}}, LoweringError, "would hold no weights"),
        ({"options": {"aot_inductor.package_constants_on_disk_format": "pickle_weights"}}, LoweringError,
         "files beside the model code"),
        ({"options": {"aot_inductor.link_libtorch": False}}, LoweringError, "link_libtorch=True"),
        ({"options": {"aot_inductor_mode.compile_standalone": True}}, LoweringError, "standalone C\\+\\+"),
        ({"options": {1: True}}, LoweringError, "option names are strings"),
        ({"progress": "yes"}, LoweringError, "progress must be a function .* or a bool, got str"),
    ],
)
def test_bad_arguments_refused_before_work(small_program, tmp_path, monkeypatch, kwargs, error, match):
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(error, match=match):
        qexport.compile(small_program, tmp_path / "out.pt2", **kwargs)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu_is_refused(small_program, tmp_path):
    with pytest.raises(LoweringError, match="no CUDA device"):
        qexport.compile(small_program, tmp_path / "out.pt2", device="cuda")


def test_bad_paths_refused(small_program, tmp_path):
    with pytest.raises(ArtifactError, match="must end with .pt2"):
        qexport.compile(small_program, tmp_path / "out.so")
    with pytest.raises(ArtifactError, match="output path must be a str or os.PathLike, got NoneType"):
        qexport.compile(small_program, None)
    with pytest.raises(ArtifactNotFoundError, match="does not exist"):
        qexport.compile(small_program, tmp_path / "missing" / "out.pt2")
    with pytest.raises(ArtifactNotFoundError):
        qexport.compile(tmp_path / "nope.pt2", tmp_path / "out.pt2")
    with pytest.raises(LoweringError, match="ExportedProgram or the path"):
        qexport.compile(torch.nn.Linear(2, 2), tmp_path / "out.pt2")
    assert os.listdir(tmp_path) == []
    qexport.save(small_program, tmp_path / "m.pt2")
    with pytest.raises(qexport.UsageError, match="must differ from the program's .pt2"):
        qexport.compile(str(tmp_path / "m.pt2"), tmp_path / "." / "m.pt2")
    assert os.listdir(tmp_path) == ["m.pt2"] and qexport.inspect(tmp_path / "m.pt2").artifact == "pt2"


def test_failed_compile_leaves_nothing(small_program, tmp_path, monkeypatch, capsys):
    def fail(ep, package_path, **_):
        Path(package_path).write_bytes(b"partial")
        raise RuntimeError("C++ compiler crashed")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    with pytest.raises(LoweringError, match="C\\+\\+ compiler crashed"):
        qexport.compile(small_program, tmp_path / "out.pt2", progress=True)  # as to_executorch(progress=True)
    assert os.listdir(tmp_path) == []
    assert "qexport.compile: kernels: 2/2 regions to scheme kernels" in capsys.readouterr().err


def test_load_compiled_refuses_a_plain_pt2(small_program, tmp_path):
    path = tmp_path / "program.pt2"
    qexport.save(small_program, path)
    with pytest.raises(ArtifactError, match="not an AOTInductor package"):
        qexport.load_compiled(path)
    with pytest.raises(ArtifactNotFoundError):
        qexport.load_compiled(tmp_path / "missing.pt2")
    with pytest.raises(ArtifactError, match="the artifact path must be a str or os.PathLike, got NoneType"):
        qexport.load_compiled(None)


def test_inspect_of_a_torch_only_aoti_package_says_who_wrote_it(small_program, tmp_path):
    path = torch._inductor.aoti_compile_and_package(small_program, package_path=str(tmp_path / "plain.pt2"))
    with pytest.raises(qexport.CorruptArtifactError, match="not written by qexport.compile"):
        serializers.inspect(path)
