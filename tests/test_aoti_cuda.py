"""CUDA lowering: the kernel table's CUDA entries (qexport/lower/kernels/cuda.py) and qexport.compile
with device="cuda".

The graph rewrites (which kernel, which branch, torch.cond where M's range spans a crossover) and the
kernels that have CPU implementations (`_int_mm`, `_scaled_mm`) are checked here on any machine; the
packages themselves are compiled and run only where CUDA is (marked `cuda`, skipped elsewhere).
"""

from __future__ import annotations

import json
import math

import torch
import pytest

import qexport
from qexport.lower.aoti import plan as aoti_plan
from qexport.lower.kernels import apply_kernels, cuda as cuda_kernels, cuda_tune
from qexport.schemes import math_for

from conftest import MLP, TinyTransformer, exact_cpu_int_mm, quantized, scheme_for

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Rows that reach every bucket of every CUDA plan (cuda_kernels.PLANS): 1 GEMV, 6 tinygemm or the
# 16-row tile, 20 / 40 / 100 / 200 the wider Triton tiles, 300 dequant + cuBLAS, cuBLAS on bf16
# weights or the fp8/int8 GEMMs, 600 the int8 GEMM's widest tile.
ROWS = (1, 6, 20, 40, 100, 200, 300, 600)
DYN = ({0: torch.export.Dim("m", min=1, max=1024)},)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.fixture(autouse=True)
def cpu_stands_in_for_cublas():
    """The CUDA kernel bodies run here on the CPU in cuBLAS's place: `_int_mm` must be exact there."""
    with exact_cpu_int_mm():
        yield


def _conds(ep: torch.export.ExportedProgram) -> int:
    return len(ep.graph_module.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond))


def _exported(name: str, rows: int, dynamic: bool, dims=(64, 128, 32)):
    torch.manual_seed(0)
    x = torch.randn(rows, dims[0])
    m = quantized(MLP(dims), scheme_for(name), (x,))
    return m, qexport.export(m, (x,), dynamic_shapes=DYN if dynamic else None)


# -- on any machine -----------------------------------------------------------------------------

GEMV_THEN_INT_MM = [(4, "gemv"), (None, "int_mm")]
STATIC = {"qexport.cuda_plan": "static"}  # where a GPU is, plans are tuned there instead of read from PLANS


@pytest.fixture
def gemv_then_int_mm(monkeypatch):
    """int8_dynamic with a two-bucket plan whatever the tuned tables say (with Triton, per-token
    int8_dynamic runs Triton GEMMs at every M): the rewrite mechanics, not the tables, are tested."""
    for key in ("int8_dynamic", "int8_dynamic_per_tensor"):
        monkeypatch.setitem(cuda_kernels.PLANS, key, GEMV_THEN_INT_MM)

@pytest.mark.parametrize("name", ["int8_dynamic", "fp8_e4m3"])
def test_cuda_rewrite_matches_eager_on_cpu(name):
    """The kernel bodies (real int8 / fp8 GEMMs, padding for _int_mm) agree with the scheme's
    reference math at every row count; run through the rewritten program on the CPU."""
    m, ep = _exported(name, 8, dynamic=True)
    # Where CUDA is, the same rewrite runs there (its Triton buckets have no CPU implementation).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        m = m.cuda()
        ep = qexport.export(m, (torch.randn(8, 64, device=device),), dynamic_shapes=DYN)
    lowered, decisions = apply_kernels(ep, "cuda")
    assert [d.taken for d in decisions] == [True, True], [d.reason for d in decisions]
    tol = math_for(scheme_for(name)).tolerance
    for rows in ROWS:
        x = torch.randn(rows, 64, device=device)
        assert rel_err(lowered.module()(x), m(x)) <= tol, rows


def test_dynamic_rows_spanning_a_crossover_branch_with_cond(gemv_then_int_mm):
    _, ep = _exported("int8_dynamic", 8, dynamic=True)
    lowered, _ = apply_kernels(ep, "cuda", STATIC)
    assert _conds(lowered) == 2  # one per region: GEMV below the crossover, _int_mm above
    assert not lowered.graph_module.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_quant_packed)


@pytest.mark.parametrize("rows,kernel", [(1, "mul"), (32, "_int_mm")])
def test_static_rows_build_only_the_branch_they_need(rows, kernel, gemv_then_int_mm):
    _, ep = _exported("int8_dynamic", rows, dynamic=False)
    lowered, _ = apply_kernels(ep, "cuda", STATIC)
    assert _conds(lowered) == 0
    targets = {str(n.target) for n in lowered.graph_module.graph.nodes if n.op == "call_function"}
    assert any(kernel in t for t in targets), targets
    assert not any("_int_mm" in t for t in targets) if kernel != "_int_mm" else True


@pytest.mark.parametrize("lo,hi,conds", [(1, 1024, 1), (1, 4, 0), (8, 1024, 0)])
def test_buckets_follow_the_exported_row_range(lo, hi, conds, gemv_then_int_mm):
    """Only the buckets the program's range for M reaches are built (M=1 counts although export
    traces dynamic dims as >= 2)."""
    torch.manual_seed(0)
    m = quantized(MLP(), scheme_for("int8_dynamic"), (torch.randn(8, 64),))
    ep = qexport.export(m, (torch.randn(max(lo, 2), 64),), dynamic_shapes=({0: torch.export.Dim("m", min=lo, max=hi)},))
    lowered, decisions = apply_kernels(ep, "cuda", STATIC)
    assert _conds(lowered) == 2 * conds
    assert ("Inductor GEMV" in decisions[0].kernel) == (lo <= GEMV_THEN_INT_MM[0][0])


def test_nested_buckets_are_all_built_under_unique_names(monkeypatch):
    """Three buckets make two nested conds per region, each branch graph under its own name
    (AOTInductor generates one function per subgraph name)."""
    for key in ("int8_dynamic", "int8_dynamic_per_tensor"):
        monkeypatch.setitem(cuda_kernels.PLANS, key, [(4, "gemv"), (16, "int_mm"), (None, "gemv")])
    m, ep = _exported("int8_dynamic", 8, dynamic=True)
    lowered, _ = apply_kernels(ep, "cuda", STATIC)
    graphs = [g for g in lowered.graph_module.modules() if isinstance(g, torch.fx.GraphModule)]
    conds = [n for g in graphs for n in g.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond)]
    assert len(conds) == 4
    targets = [n.target for g in graphs for n in g.graph.find_nodes(op="get_attr")]
    assert len(targets) == len(set(targets)) == 8
    for rows in (1, 8, 40):
        x = torch.randn(rows, 64)
        assert rel_err(lowered.module()(x), m(x)) <= math_for(scheme_for("int8_dynamic")).tolerance


def test_kernel_nodes_are_tagged_with_their_region(gemv_then_int_mm):
    _, ep = _exported("int8_dynamic", 32, dynamic=False)
    lowered, _ = apply_kernels(ep, "cuda", STATIC)
    tagged = [n for n in lowered.graph_module.graph.nodes if "qexport_region" in (n.meta.get("custom") or {})]
    mm = [n for n in tagged if n.target is torch.ops.aten._int_mm.default]
    assert len(mm) == 2
    assert {n.meta["custom"]["qexport_region"]["module"] for n in mm} == {"layers.0", "layers.1"}
    assert {n.meta["custom"]["qexport_region"]["kernel"] for n in mm} == {"_int_mm"}


@pytest.mark.parametrize("family", sorted(cuda_kernels.LARGE_M_FROM))
@pytest.mark.parametrize("large_m", [None, "bf16_weights", "dequant"])
def test_large_m_policy_shapes_the_weight_only_plan(family, large_m):
    """By default ("dequant") the whole quantized plan (Triton tiles, then dequantize per call);
    with "bf16_weights" rows above LARGE_M_FROM go to cuBLAS on bf16 weights."""
    from qexport.lower.kernels import KernelContext
    from qexport.regions import iter_region_nodes, read_region

    _, ep = _exported("int8_dynamic", 8, dynamic=True)
    n = next(iter(iter_region_nodes(ep)))
    options = {} if large_m is None else {"qexport.large_m": large_m}
    plan = cuda_kernels.weight_only_plan(family, KernelContext(ep, n, read_region(n, 0), "cuda", options))
    kinds = [cuda_kernels._kind(k) for _, k in plan]
    if large_m in (None, "dequant"):
        assert plan == cuda_kernels.reachable(cuda_kernels.PLANS[family], (1, 1024)) and "bf16_weights" not in kinds
    else:
        assert kinds[-1] == "bf16_weights" and kinds.count("bf16_weights") == 1
        assert max(m for m, _ in plan[:-1]) == cuda_kernels.LARGE_M_FROM[family]


def test_large_m_option_is_checked_before_any_work(tmp_path):
    _, ep = _exported("int8_dynamic", 8, dynamic=False)
    with pytest.raises(qexport.errors.LoweringError, match=r"qexport.large_m='fast' is not one of \('bf16_weights', 'dequant'\)"):
        qexport.compile(ep, tmp_path / "o.pt2", options={"qexport.large_m": "fast"})
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback used where no GPU is present")
def test_without_a_gpu_the_static_plan_is_used_and_said():
    _, ep = _exported("int8_dynamic", 8, dynamic=True)
    for options in ({}, {"qexport.cuda_plan": "static"}):
        _, decisions = apply_kernels(ep, "cuda", options)
        assert all(d.reason.endswith("]") and "static plan" in d.reason and "tuned" not in d.reason for d in decisions)
        if cuda_kernels.triton is not None:  # Triton without a GPU: the tunable plan falls back
            want = "no CUDA device to tune on" if not options else "qexport.cuda_plan='static'"
            assert all(want in d.reason for d in decisions)


def test_cuda_plan_option_is_checked_before_any_work(tmp_path):
    _, ep = _exported("int8_dynamic", 8, dynamic=False)
    with pytest.raises(qexport.errors.LoweringError, match=r"qexport.cuda_plan='fast' is not one of \('tuned', 'static'\)"):
        qexport.compile(ep, tmp_path / "o.pt2", options={"qexport.cuda_plan": "fast"})
    assert not list(tmp_path.iterdir())


@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
    """An empty tuning cache of the test's own (memory and disk)."""
    monkeypatch.setenv("QEXPORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cuda_tune, "_MEMORY", {})
    return tmp_path / "cache" / "cuda_plans.json"


def test_tuning_keeps_the_fastest_kernel_per_probe_and_caches_it(plan_cache):
    """Buckets end at the log-midpoint between probes; a candidate that failed (NaN) or is outside
    its rows is never picked; the incumbent keeps its rows within STICKY; the cache answers next time."""
    times = {  # µs by (kernel, rows)
        "a": {1: 5.0, 16: 9.0, 256: 50.0},
        "b": {1: math.nan, 16: 8.9, 256: 40.0},  # failed at 1; within 3 % of "a" at 16: "a" keeps 16
        "c": {1: 7.0, 16: 1.0, 256: 1.0},  # would win above 1 row, where it is no candidate
    }
    calls = []

    def timer(kernel, m):
        calls.append((kernel, m))
        return times[kernel][m]

    cands = [cuda_tune.Candidate("a"), cuda_tune.Candidate("b"), cuda_tune.Candidate("c", max_rows=1)]
    plan, info = cuda_tune.tune("key", (1, 16, 256), cands, timer)
    assert plan == [(64, "a"), (None, "b")] and not info["cached"]
    assert ("c", 1) in calls and ("c", 16) not in calls
    assert json.loads(plan_cache.read_text())["key"]["plan"] == [[64, "a"], [None, "b"]]
    cuda_tune._MEMORY.clear()  # from disk, as a fresh process would
    calls.clear()
    again, info = cuda_tune.tune("key", (1, 16, 256), cands, timer)
    assert again == plan and info["cached"] and not calls
    with pytest.raises(RuntimeError, match="no candidate kernel ran at 16 rows"):
        cuda_tune.tune("other", (16,), [cuda_tune.Candidate("c")], lambda k, m: math.nan)


def test_plan_cache_key_changes_with_the_kernels_source(tmp_path, monkeypatch):
    """Plans timed against older kernels are not reused after an upgrade: the cache key carries a
    digest of the kernels' and the tuner's source."""
    for name in ("cuda.py", "cuda_tune.py"):
        (tmp_path / name).write_text(f"# {name}\n")
    monkeypatch.setattr(cuda_tune, "__file__", str(tmp_path / "cuda_tune.py"))
    before = cuda_tune.kernels_fingerprint()
    (tmp_path / "cuda.py").write_text("# a faster decode\n")
    after = cuda_tune.kernels_fingerprint()
    assert before != after and len(after) == 12
    (tmp_path / "cuda.py").write_text("# cuda.py\n")
    assert cuda_tune.kernels_fingerprint() == before


def test_tuned_tiles_round_trip_through_the_cache(plan_cache):
    tile = cuda_kernels.TILE_M16_K256
    plan, _ = cuda_tune.tune("k", (1, 4096), [cuda_tune.Candidate(("triton", tile)), cuda_tune.Candidate("gemv", max_rows=1)],
                             lambda k, m: 1.0 if k == "gemv" else 2.0)
    cuda_tune._MEMORY.clear()
    again, _ = cuda_tune.tune("k", (1, 4096), [], lambda k, m: math.nan)
    assert plan == again == [(64, "gemv"), (None, ("triton", tile))]
    assert cuda_tune.probes_for((1, float("inf"))) == cuda_tune.PROBE_ROWS
    assert cuda_tune.probes_for((8, 100)) == (8, 16, 64, 100)


def test_declines_say_why():
    _, ep = _exported("int8_dynamic", 4, dynamic=False, dims=(60, 32))
    _, decisions = apply_kernels(ep, "cuda")
    assert not decisions[0].taken and "in_features=60 is not a multiple of 8" in decisions[0].reason


# -- on a CUDA device ---------------------------------------------------------------------------

# Layers big enough for the real kernels' shapes (K a multiple of every tile depth) yet quick to compile.
CUDA_DIMS = (256, 512, 128)
SCHEMES_WITH_CUDA_KERNELS = {"int8_weight_only", "int4_weight_only", "fp8_e4m3", "int8_dynamic"}


@pytest.fixture(scope="module", params=qexport.schemes.builtin_names())
def cuda_package(request, tmp_path_factory):
    """(eager quantized model on CUDA, loaded package, plan) for one built-in scheme; compiled once."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from qexport.lower.aoti import plan

    name = request.param
    torch.manual_seed(0)
    x = torch.randn(16, CUDA_DIMS[0])
    m = quantized(MLP(CUDA_DIMS), scheme_for(name), (x,)).cuda()
    ep = qexport.export(m, (x.cuda(),), dynamic_shapes=DYN)
    path = tmp_path_factory.mktemp("cuda") / f"{name}.pt2"
    # The default (tuned) plans, from fewer probes than a user's compile: the suite checks their
    # numerics and capture, not which kernel wins (the H200 run of the full probes took > 5 min).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_tune, "PROBE_ROWS", (1, 64, 1024))
        qexport.compile(ep, path, device="cuda")
        planned = plan(ep, device="cuda")
    return name, m, qexport.load_compiled(path), planned


def _first(y):
    return y[0] if isinstance(y, (list, tuple)) else y


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_package_replays_in_a_cuda_graph(cuda_package):
    """`load_compiled`'s runner captures (CUDA packages load single-threaded); a replay on new input
    in the captured buffer gives what a plain call on that input gives, at two row counts."""
    name, m, runner, _ = cuda_package
    tol = math_for(scheme_for(name)).tolerance
    with torch.no_grad():
        for rows in (1, 64):
            x = torch.randn(rows, CUDA_DIMS[0], device="cuda")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
                runner(x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = _first(runner(x))
            for _ in range(2):
                x.copy_(torch.randn_like(x))
                graph.replay()
                torch.cuda.synchronize()
                want = _first(runner(x))
                assert torch.equal(y, want), (name, rows, rel_err(y, want))
                assert rel_err(y, m(x)) <= tol, (name, rows)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_plan_is_tuned_on_the_card_cached_and_recorded(plan_cache, tmp_path):
    from qexport.lower.aoti import plan

    torch.manual_seed(0)
    x = torch.randn(16, CUDA_DIMS[0])
    m = quantized(MLP(CUDA_DIMS), scheme_for("int8_weight_only"), (x,)).cuda()
    ep = qexport.export(m, (x.cuda(),), dynamic_shapes=DYN)
    path = qexport.compile(ep, tmp_path / "p.pt2", device="cuda")
    reasons = [r.lowering.reason for r in qexport.inspect(path).regions]
    card = torch.cuda.get_device_name()
    assert all(f"plan tuned on {card} (tuned now" in r for r in reasons), reasons
    entries = json.loads(plan_cache.read_text())
    assert len(entries) == 2 and all(k.startswith(card) and "int8_weight_only" in k for k in entries)  # one per weight shape
    cuda_tune._MEMORY.clear()
    assert all(f"plan tuned on {card} (cached" in r.reason for r in plan(ep, device="cuda").regions)
    static = plan(ep, device="cuda", options={"qexport.cuda_plan": "static"})
    assert all("qexport.cuda_plan='static'" in r.reason for r in static.regions)
    with torch.no_grad():
        runner = qexport.load_compiled(path)
        for rows in ROWS:
            xr = torch.randn(rows, CUDA_DIMS[0], device="cuda")
            assert rel_err(_first(runner(xr)), m(xr)) <= math_for(scheme_for("int8_weight_only")).tolerance, rows


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_package_matches_eager_quantized_model(cuda_package):
    name, m, runner, planned = cuda_package
    tol = math_for(scheme_for(name)).tolerance
    with torch.no_grad():
        for rows in ROWS:
            x = torch.randn(rows, CUDA_DIMS[0], device="cuda")
            y = runner(x)
            y = y[0] if isinstance(y, (list, tuple)) else y
            assert y.shape == (rows, CUDA_DIMS[-1])
            assert rel_err(y, m(x)) <= tol, (name, rows, rel_err(y, m(x)))
    taken = [r.kernel != "inductor" for r in planned.regions]
    assert all(taken) if name in SCHEMES_WITH_CUDA_KERNELS else not any(taken), [(r.kernel, r.reason) for r in planned.regions]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["int8_weight_only", "int4_weight_only"])
def test_cuda_transformer_with_3d_activations(name, tmp_path):
    torch.manual_seed(0)
    idx = torch.randint(0, 128, (2, 8), device="cuda")
    m = quantized(TinyTransformer(), scheme_for(name), (idx.cpu(),)).cuda()
    ep = qexport.export(m, (idx,))
    path = qexport.compile(ep, tmp_path / "t.pt2", device="cuda")
    with torch.no_grad():
        y = qexport.load_compiled(path)(idx)
        assert rel_err(y[0] if isinstance(y, (list, tuple)) else y, m(idx)) <= math_for(scheme_for(name)).tolerance


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("group", [32, 256])
def test_int4_embedding_kernel_is_the_reference_rows(group, tmp_path):
    """The int4 table's rows decoded by one kernel before their consumer, in a package whose plan
    names it, for any number of indices (the LayerNorm after it is Inductor's: equal to rounding); the
    kernel alone gives the region's own rows exactly, and NaN for an index outside the table instead
    of reading outside it."""
    s = qexport.schemes.get("int4_weight_only", group_size=group)
    torch.manual_seed(0)
    emb = torch.nn.Sequential(torch.nn.Embedding(1000, 512), torch.nn.LayerNorm(512))
    m = qexport.quantize(emb.eval(), {torch.nn.Embedding: s}).cuda()
    idx = torch.randint(0, 1000, (2, 7), device="cuda")
    ep = qexport.export(m, (idx,), dynamic_shapes=({1: torch.export.Dim("s", min=1, max=64)},))
    assert [r.kernel for r in aoti_plan(ep, device="cuda").regions] == ["Triton int4 rows"]
    runner = qexport.load_compiled(qexport.compile(ep, tmp_path / "e.pt2", device="cuda"))
    with torch.no_grad():
        for n in (1, 7, 64):
            ids = torch.randint(0, 1000, (2, n), device="cuda")
            y = runner(ids)
            torch.testing.assert_close(y[0] if isinstance(y, (list, tuple)) else y, m(ids), rtol=1e-5, atol=1e-5)
    t = {r: v.cuda() for r, v in math_for(s).quantize_weight(s, torch.randn(1000, 512)).items()}
    ids = torch.tensor([0, 999, 5, -1, 1000], device="cuda")
    rows = torch.ops.qexport.int4_embedding(ids, t["weight"], t["weight_scale"], t["weight_zero_point"], group, torch.bfloat16)
    want = math_for(s).dequantize_weight(s, t, (1000, 512)).to(torch.bfloat16)
    assert torch.equal(rows[:3], want[[0, 999, 5]]) and rows[3:].isnan().all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_dequant_kernel_is_the_scheme_math(group):
    """The large-M buckets' decode (dequant + cuBLAS) gives the scheme's dequantized weight bit for bit,
    in bf16 and fp32, for a row count and a K that its tiles do not divide, and for a packed weight
    that starts off a 4-byte boundary (it reads 32-bit words)."""
    s = qexport.schemes.get("int4_weight_only", group_size=group)
    n, k = 200, 768
    torch.manual_seed(0)
    t = {r: v.cuda() for r, v in math_for(s).quantize_weight(s, torch.randn(n, k)).items()}
    want = math_for(s).dequantize_weight(s, t, (n, k))
    for dtype in (torch.bfloat16, torch.float32):
        got = torch.ops.qexport.int4_dequant(t["weight"], t["weight_scale"], t["weight_zero_point"], group, dtype)
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    shifted = torch.cat([torch.zeros(2, dtype=torch.uint8, device="cuda"), t["weight"].reshape(-1)])[2:].view(n, k // 2)
    assert shifted.storage_offset() == 2
    got = torch.ops.qexport.int4_dequant(shifted, t["weight_scale"], t["weight_zero_point"], group, torch.bfloat16)
    assert torch.equal(got, want.to(torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tinygemm_layout_dequantizes_to_the_scheme():
    """The compile-time conversion (tinygemm's (q - 8) * s + z convention) reproduces the scheme's
    w = (q - zp) * s: multiplying the identity recovers the dequantized weight."""
    s = qexport.schemes.get("int4_weight_only", group_size=128)
    torch.manual_seed(0)
    t = math_for(s).quantize_weight(s, torch.randn(256, 512))
    packed, sz = cuda_kernels.tinygemm_operands(t["weight"], t["weight_scale"], t["weight_zero_point"], 8)
    eye = torch.eye(512, device="cuda", dtype=torch.bfloat16)
    got = torch.ops.aten._weight_int4pack_mm(eye, packed, 128, sz).t()
    want = math_for(s).dequantize_weight(s, t, (256, 512)).cuda()
    assert rel_err(got, want) <= 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["int8_weight_only", "int4_weight_only"])
@pytest.mark.parametrize("large_m", [None, "bf16_weights", "dequant"])
def test_cuda_large_m_policies_match_eager(name, large_m, tmp_path):
    """Both policies, every bucket: the bf16 copy is the scheme's own dequantization (so it must match
    the reference to bf16 rounding); the default, "dequant", keeps no such copy in the package."""
    torch.manual_seed(0)
    x = torch.randn(16, CUDA_DIMS[0])
    m = quantized(MLP(CUDA_DIMS), scheme_for(name), (x,)).cuda()
    ep = qexport.export(m, (x.cuda(),), dynamic_shapes=DYN)
    # The static plans: which kernels a tuned plan picks depends on the card.
    options = {"qexport.cuda_plan": "static", **({} if large_m is None else {"qexport.large_m": large_m})}
    lowered, decisions = apply_kernels(qexport.export(m, (x.cuda(),), dynamic_shapes=DYN), "cuda", options)
    copies = [n for n in lowered.graph_signature.buffers if n.endswith("weight_bf16")]
    assert len(copies) == (2 if large_m == "bf16_weights" else 0), lowered.graph_signature.buffers
    assert all(("cuBLAS on bf16 weights" in d.kernel) == (large_m == "bf16_weights") for d in decisions)
    runner = qexport.load_compiled(qexport.compile(ep, tmp_path / "p.pt2", device="cuda", options=options))
    with torch.no_grad():
        for rows in ROWS:
            xr = torch.randn(rows, CUDA_DIMS[0], device="cuda")
            y = runner(xr)
            y = y[0] if isinstance(y, (list, tuple)) else y
            assert rel_err(y, m(xr)) <= math_for(scheme_for(name)).tolerance, (rows, large_m)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(1, 64), (300, 4096), (7, 5000)])
def test_row_quantizers_are_the_reference_math(rows, cols, dtype):
    """The Triton row quantizers give the same codes, scales and zero points as `activation`'s
    fake-quant math (columns not a power of two exercise their masks; an all-positive row and a
    zero row their clamps)."""
    from qexport.schemes import activation as act

    x = (torch.randn(rows, cols, device="cuda") * 3).to(dtype)
    x[0, :3] = 0.0
    if rows > 2:
        x[1] = x[1].abs()
        x[2] = 0.0
    q, s = torch.ops.qexport.fp8_quantize_rows(x)
    q_ref, s_ref = act.quantize_fp8(x, per_token=True)
    assert torch.equal(s, s_ref) and s.shape == (rows, 1)
    assert torch.equal(q.float(), q_ref.float())

    q, s, z = torch.ops.qexport.int8_quantize_rows(x)
    xf = x.float()
    s_ref, z_ref = act.int8_asym_qparams(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True))
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
    assert q.dtype == torch.int8 and torch.equal(q.float(), act.quantize_int8(xf, s_ref, z_ref))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,group", [("int8_weight_only", None), ("int4_weight_only", 32), ("int4_weight_only", 128),
                                        ("int4_weight_only", 256)])
def test_triton_weight_only_kernels_decode_the_scheme(name, group):
    """The GEMV (every tile the tuner may pick) and the tensor-core GEMM (a small and a large tile)
    on the scheme's own tensors, at row counts and an output width no tile divides: the exponent-trick
    decode of int8 codes and the PTX word decode of packed int4 codes (`_int4_dot8`) are the scheme's
    dequantization; an int4 weight that starts off a 4-byte boundary is read too."""
    s = qexport.schemes.get(name, **({"group_size": group} if group else {}))
    n, k = 196, 1024
    torch.manual_seed(0)
    t = {r: v.cuda() for r, v in math_for(s).quantize_weight(s, torch.randn(n, k) * 0.02).items()}
    w = math_for(s).dequantize_weight(s, t, (n, k)).float()
    if group is None:
        t["weight_scale_per_channel"] = t["weight_scale"].float().reshape(-1).expand(n).contiguous()
    for rows in (1, 3, 5, 17):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w.t()
        # besides the offered tiles: no pipelining, several rows with two stages
        for tile in (*cuda_kernels.GEMV_TILES, (1, 16, 256, 4), (4, 32, 256, 8, 2)):
            assert rel_err(cuda_kernels.triton_gemv(x, t, tile, group), ref) <= 1e-2, (rows, tile)
        if group:
            shifted = torch.empty(t["weight"].numel() + 2, dtype=torch.uint8, device="cuda")[2:].view_as(t["weight"])
            shifted.copy_(t["weight"])
            y = cuda_kernels.triton_gemv(x, {**t, "weight": shifted}, cuda_kernels.GEMV_TILES[0], group)
            assert rel_err(y, ref) <= 1e-2, rows
        for tile in (cuda_kernels.TILE_M16_K256, (16, 32, 256, 1, 4, 4, 1), (128, 128, 64, 8, 4, 4, 1)):
            if group is None:
                y = cuda_kernels.triton_weight_mm(x, t["weight"], t["weight_scale_per_channel"], tile)
            else:
                y = cuda_kernels.triton_int4_mm(x, t["weight"], t["weight_scale"], t["weight_zero_point"], group, tile)
            assert rel_err(y, ref) <= 1e-2, (rows, tile)
