"""schemes/algorithms.py: int4 codes chosen by rtn, hqq (calibration-free) and gptq (calibrated), int8
codes by rtn, mse (calibration-free) and gptq — each lowers its own error measure vs rtn on a layer
with outliers, fills its family's grid, is recorded per region (scheme, manifest) and survives a .pt2
round trip; the errors come before work."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qexport
from qexport.quantize import quantized_modules
from qexport.schemes import algorithms as alg
from qexport.schemes.packing import grouped, unpack_uint4

from conftest import EmbedNet


def _outlier_layer(seed: int = 0, n: int = 64, k: int = 256) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A linear layer with heavy-tailed weights and correlated inputs (a low-rank mix plus noise, as
    hidden states are) in which a few channels carry most of the energy (as LayerNorm outputs of
    transformers do); calibration and evaluation inputs drawn apart."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(k, n))
    with torch.no_grad():
        model[0].weight.copy_(torch.distributions.StudentT(3.0).sample((n, k)) * 0.02)
    gain = torch.ones(k)
    gain[torch.randperm(k, generator=g)[:6]] = 12.0

    mix = torch.randn(32, k, generator=g)

    def inputs(rows: int) -> torch.Tensor:
        return (torch.randn(rows, 32, generator=g) @ mix + 0.3 * torch.randn(rows, k, generator=g)) * gain

    return model, inputs(512), inputs(256)


def _dequantized(m: nn.Module) -> torch.Tensor:
    q = quantized_modules(m)[0][1]
    return qexport.schemes.math_for(q.scheme).dequantize_weight(q.scheme, q.tensors(), q.weight_shape)


@pytest.mark.parametrize("name", ["int4_weight_only", "int8_dynamic_int4_weight"])
def test_hqq_lowers_the_weight_error_of_rtn(name):
    model, _, _ = _outlier_layer()
    w = model[0].weight.detach().clone()
    err = {}
    for a in ("rtn", "hqq"):
        q = qexport.quantize(copy.deepcopy(model), qexport.schemes.get(name, group_size=64), algorithm=a)
        err[a] = (_dequantized(q) - w).pow(2).sum().item()
    assert err["hqq"] < 0.97 * err["rtn"], err


@pytest.mark.parametrize("name", ["int4_weight_only", "int8_dynamic_int4_weight"])
def test_gptq_lowers_the_output_error_of_rtn_on_unseen_inputs(name):
    model, calib, held_out = _outlier_layer()
    ref = model(held_out)
    err = {}
    for a in ("rtn", "hqq", "gptq"):
        q = qexport.quantize(copy.deepcopy(model), qexport.schemes.get(name, group_size=64), algorithm=a,
                             calibration_data=[(calib,)] if a == "gptq" else None)
        err[a] = ((q(held_out) - ref).norm() / ref.norm()).item()
    assert err["gptq"] < 0.7 * min(err["rtn"], err["hqq"]), err


@pytest.mark.parametrize("algorithm", ["hqq", "gptq"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_every_algorithm_fills_the_uint4_grid(algorithm, symmetric):
    w = torch.randn(16, 128) * torch.linspace(0.1, 3, 128)
    qparams = lambda g: alg.hqq_qparams(g, symmetric)  # noqa: E731
    if algorithm == "gptq":
        x = torch.randn(300, 128)
        codes, scale, zero = alg.gptq(w, x.T @ x, 32, qparams)
    else:
        scale, zero = qparams(grouped(w, 32))
        codes = alg.grid_codes(grouped(w, 32), scale, zero).reshape(16, 128)
    assert codes.shape == (16, 128) and scale.shape == zero.shape == (16, 4)
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 15
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 15
    assert torch.equal(scale, scale.to(torch.bfloat16).float()) and (scale > 0).all()
    if symmetric:
        assert (zero == 8).all()


INT8_GRIDS = [("int8_dynamic", {}), ("int8_dynamic", {"reduce_range": True}),
              ("int8_weight_only", {"reduce_range": True, "granularity": "per_tensor"})]


def _int8_tensors(name, params, algorithm, w, hessian=None):
    s = qexport.schemes.get(name, algorithm=algorithm, **params)
    math = qexport.schemes.math_for(s)
    t = math.quantize_weight(s, w, hessian=hessian)
    return s, t, math.dequantize_weight(s, t, tuple(w.shape))


@pytest.mark.parametrize("name, params", INT8_GRIDS)
def test_int8_mse_fills_the_grid_and_lowers_the_weight_error_of_rtn(name, params):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((48, 256)) * 0.02
    err = {}
    for a in ("rtn", "mse"):
        s, t, deq = _int8_tensors(name, params, a, w)
        q = t["weight"]
        assert q.dtype == torch.int8 and q.shape == w.shape and s.qmin <= q.min() and q.max() <= s.qmax
        assert t["weight_scale"].shape == ((48,) if s.granularity == "per_channel" else (1,))
        assert torch.equal(deq, q.float() * t["weight_scale"].reshape(-1, 1))  # the rtn grid's dequantization
        err[a] = (deq - w).pow(2).sum(1)
    if s.granularity == "per_channel":  # rtn's scale is one of each row's candidates
        assert (err["mse"] <= err["rtn"]).all()
    assert err["mse"].sum() < err["rtn"].sum()


@pytest.mark.parametrize("name, params", INT8_GRIDS)
def test_int8_gptq_fills_the_grid_and_lowers_the_output_error_on_unseen_inputs(name, params):
    model, calib, held_out = _outlier_layer()
    w = model[0].weight.detach()
    err = {}
    for a in ("rtn", "mse", "gptq"):
        s, t, deq = _int8_tensors(name, params, a, w, hessian=calib.T @ calib if a == "gptq" else None)
        assert s.qmin <= t["weight"].min() and t["weight"].max() <= s.qmax
        err[a] = ((held_out @ (deq - w).T).norm() / (held_out @ w.T).norm()).item()
    assert err["gptq"] < 0.8 * min(err["rtn"], err["mse"]), err


def test_rtn_is_unchanged_by_the_algorithm_field():
    """The default (rtn) codes are exactly the ones int4 had before algorithms existed."""
    w = torch.randn(8, 64)
    t = qexport.schemes.math_for(qexport.schemes.get("int4_weight_only")).quantize_weight(
        qexport.schemes.get("int4_weight_only", group_size=32), w)
    g = grouped(w, 32)
    mn, mx = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((mx - mn) / 15).to(torch.bfloat16).float()
    zero = torch.clamp(torch.round(-mn / scale), 0, 15)
    codes = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15)
    assert torch.equal(unpack_uint4(t["weight"]).float(), codes.reshape(8, 64))
    assert torch.equal(t["weight_zero_point"].float(), zero)


@pytest.mark.parametrize("scheme, free, labels", [
    (qexport.schemes.get("int4_weight_only", group_size=32), "hqq",
     {"int4_weight_only(g32, asym, bf16, hqq)", "int4_weight_only(g32, asym, bf16, gptq)"}),
    (qexport.schemes.get("int8_weight_only", reduce_range=True), "mse",
     {"int8_weight_only(channel, sym, bf16, mse, codes -64..64)", "int8_weight_only(channel, sym, bf16, gptq, codes -64..64)"}),
])
def test_algorithm_is_recorded_per_region_and_survives_pt2(tmp_path, scheme, free, labels):
    """gptq fits linears to their inputs; an embedding has none to trade errors across, so it takes its
    family's calibration-free algorithm — each region says which, in the graph, the manifest and the
    summary, after a .pt2 round trip."""
    torch.manual_seed(0)
    idx = torch.randint(0, 100, (4, 16))
    model = qexport.quantize(EmbedNet().eval(), scheme, algorithm="gptq", calibration_data=[(idx,)])
    assert {n: m.scheme.algorithm for n, m in quantized_modules(model)} == {"emb": free, "fc": "gptq"}
    assert "gptq" in str(model.qexport_summary)
    expected = model(idx)
    ep = qexport.export(model, (idx,))
    path = tmp_path / "m.pt2"
    qexport.save(ep, path)
    manifest = qexport.inspect(path)
    assert {r.module_path: r.scheme.algorithm for r in manifest.regions} == {"emb": free, "fc": "gptq"}
    assert {r.scheme.describe() for r in manifest.regions} == labels
    loaded = qexport.load(path)
    assert {r.module_path: r.scheme.algorithm for r in qexport.regions(loaded)} == {"emb": free, "fc": "gptq"}
    torch.testing.assert_close(loaded.module()(idx), expected, rtol=0, atol=0)


def test_int8_convs_take_mse_under_gptq():
    """A conv's Hessian would need its inputs unfolded into patches: under gptq it takes mse; the linear
    after it is fitted to its calibration inputs."""
    from conftest import ConvNet

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = qexport.quantize(ConvNet().eval(), "int8_dynamic", algorithm="gptq", calibration_data=[(x,)])
    assert {n: m.scheme.algorithm for n, m in quantized_modules(model)} == {"conv1": "mse", "conv2": "mse", "fc": "gptq"}


def test_a_scheme_carries_its_algorithm_and_the_cli_can_set_it():
    from qexport.cli._common import parse_scheme_args

    s = qexport.schemes.get("int4_weight_only", **parse_scheme_args("int4_weight_only", ["algorithm=hqq", "group_size=32"]))
    assert s.algorithm == "hqq" and s.params() == {"algorithm": "hqq", "group_size": 32} and not s.needs_calibration
    assert qexport.schemes.get("int8_dynamic_int4_weight", algorithm="gptq").needs_calibration
    assert qexport.Scheme.from_dict(s.to_dict()) == s
    model = qexport.quantize(nn.Sequential(nn.Linear(64, 8)), s)
    assert quantized_modules(model)[0][1].scheme.algorithm == "hqq"


def test_algorithm_errors_come_before_any_work():
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(qexport.InvalidSchemeError, match=r"algorithm='hqq': no scheme of the recipe \(int8_dynamic\).*int4_weight_only"):
        qexport.quantize(model, "int8_dynamic", algorithm="hqq")
    with pytest.raises(qexport.InvalidSchemeError, match="algorithm='awq' is not one of"):
        qexport.quantize(model, "int4_weight_only", algorithm="awq")
    with pytest.raises(qexport.InvalidSchemeError, match="algorithm='mse': no scheme of the recipe \\(int4_weight_only\\).*int8_dynamic"):
        qexport.quantize(model, "int4_weight_only", algorithm="mse")
    with pytest.raises(qexport.InvalidSchemeError, match="not available for the int8 family"):
        qexport.schemes.get("int8_weight_only", algorithm="hqq")
    with pytest.raises(qexport.CalibrationError, match="GPTQ and needs calibration_data.*algorithm='hqq' needs none"):
        qexport.quantize(model, qexport.schemes.get("int4_weight_only", group_size=32), algorithm="gptq")
    with pytest.raises(qexport.CalibrationError, match="GPTQ and needs calibration_data.*algorithm='mse' needs none"):
        qexport.quantize(model, "int8_dynamic", algorithm="gptq")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not quantized_modules(model)


def test_algorithm_applies_to_the_schemes_of_a_recipe_that_offer_it():
    model = EmbedNet()
    recipe = {nn.Linear: qexport.schemes.get("int4_weight_only", group_size=32), nn.Embedding: "int8_weight_only"}
    qexport.quantize(model, recipe, algorithm="hqq")
    assert {n: (m.scheme.name, m.scheme.algorithm) for n, m in quantized_modules(model)} == {
        "emb": ("int8_weight_only", "rtn"), "fc": ("int4_weight_only", "hqq")}


def test_a_tied_embedding_and_head_under_gptq_store_the_weight_once():
    """GPT-2's wte (an embedding: hqq under gptq) and lm_head share one parameter: the head shares the
    table's tensors and records the algorithm of the codes it holds; the projections get gptq."""
    pytest.importorskip("transformers")
    import hf_models

    model = hf_models.gpt2()
    ids = torch.randint(0, hf_models.VOCAB, (2, 8))
    qexport.quantize(model, qexport.schemes.get("int4_weight_only", group_size=32), algorithm="gptq",
                     calibration_data=[(ids,)])
    mods = dict(quantized_modules(model))
    assert mods["lm_head"].tensors()["weight"] is mods["transformer.wte"].tensors()["weight"]
    assert mods["lm_head"].scheme.algorithm == mods["transformer.wte"].scheme.algorithm == "hqq"
    assert {m.scheme.algorithm for n, m in mods.items() if n.startswith("transformer.h.")} == {"gptq"}
