"""quantize(): module replacement, memory, calibration and every error path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qexport
from qexport import (
    CalibrationError, InvalidSchemeError, NothingToQuantizeError, QuantizedModule, UnknownSchemeError,
    UnsupportedModuleError,
)
from qexport.quantize import quantized_modules

from conftest import MLP, ConvNet, EmbedNet, TinyTransformer, quantized, scheme_for


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("model_cls, example, ops", [
    (MLP, lambda: (torch.randn(4, 64),), {"linear"}),
    (ConvNet, lambda: (torch.randn(2, 3, 16, 16),), {"conv2d", "linear"}),
    (EmbedNet, lambda: (torch.randint(0, 100, (2, 7)),), {"embedding", "linear"}),
])
def test_quantize_models_every_scheme(builtin_scheme, model_cls, example, ops):
    torch.manual_seed(0)
    model = model_cls().eval()
    args = example()
    ref = model(*args)
    n_candidates = sum(isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)) for m in model.modules())
    quantized(model, builtin_scheme, args)
    qs = quantized_modules(model)
    math = qexport.schemes.math_for(builtin_scheme)
    expected = {o for o in ops if math.supports(builtin_scheme, o)}
    assert {m.op for _, m in qs} == expected
    assert len(qs) == sum(
        isinstance(m, nn.Module) for m in model_cls().modules()
        if type(m) in (nn.Linear, nn.Conv2d, nn.Embedding)
        and math.supports(builtin_scheme, {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}[type(m)])
    ) <= n_candidates
    # float weights are gone; the quantized tensors are buffers
    for _, m in qs:
        assert not list(m.parameters())
        assert m.weight.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)
    out = model(*args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < 0.25  # quantization noise, not a broken model


def test_state_dict_shrinks():
    model = MLP((256, 512, 256)).eval()
    fp32 = sum(t.nbytes for t in model.state_dict().values())
    qexport.quantize(model, "int8_weight_only")
    q = sum(t.nbytes for t in model.state_dict().values())
    assert q < 0.27 * fp32
    model = MLP((256, 512, 256)).eval()
    qexport.quantize(model, scheme_for("int4_weight_only"))
    assert sum(t.nbytes for t in model.state_dict().values()) < 0.16 * fp32


def test_filter_fn_selects():
    model = MLP((64, 64, 64, 64)).eval()
    qexport.quantize(model, "int8_weight_only", filter_fn=lambda m, fqn: fqn != "layers.2")
    assert [n for n, _ in quantized_modules(model)] == ["layers.0", "layers.1"]
    assert isinstance(model.layers[2], nn.Linear)


def test_static_needs_calibration():
    with pytest.raises(CalibrationError, match="needs calibration_data"):
        qexport.quantize(MLP().eval(), "int8_static")
    with pytest.raises(CalibrationError, match="calibration_data is empty"):
        qexport.quantize(MLP().eval(), "int8_static", calibration_data=[])


def test_static_calibration_ranges():
    model = MLP().eval()
    x = torch.randn(16, 64) * 3
    qexport.quantize(model, "int8_static", calibration_data=[(x,), (x * 0.5,)])
    q = model.layers[0]
    lo, hi = x.min().item(), x.max().item()
    assert q.input_scale.item() == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert q.input_zero_point.dtype == torch.int32


def test_calibration_with_kwargs_batches():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, scale=1.0):
            return self.fc(x) * scale

    m = qexport.quantize(KW().eval(), "int8_static", calibration_data=[{"x": torch.randn(2, 8), "scale": 2.0}])
    assert isinstance(m.fc, QuantizedModule)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: qexport.quantize(MLP(), "int9"), UnknownSchemeError, "unknown scheme 'int9'"),
    (lambda: qexport.quantize(MLP((48, 16)), "int4_weight_only"), InvalidSchemeError,
     r"layers.0: int4_weight_only group_size=128 does not divide the linear reduction dimension 48"),
    (lambda: qexport.quantize(EmbedNet(), "int8_dynamic", filter_fn=lambda m, n: True), UnsupportedModuleError,
     r"emb: scheme int8_dynamic cannot quantize Embedding"),
    (lambda: qexport.quantize(nn.Sequential(nn.Conv3d(3, 3, 1)), "int8_weight_only", filter_fn=lambda m, n: True),
     UnsupportedModuleError, "0: Conv3d has no region op"),
    (lambda: qexport.quantize(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")), "int8_weight_only"),
     UnsupportedModuleError, "padding_mode='reflect'"),
    (lambda: qexport.quantize(nn.Sequential(nn.ReLU()), "int8_weight_only"), NothingToQuantizeError, "no module to quantize"),
    (lambda: qexport.quantize(nn.Linear(4, 4), "int8_weight_only"), UnsupportedModuleError, "wrap a bare"),
    (lambda: qexport.quantize("model", "int8_weight_only"), UnsupportedModuleError, "takes an nn.Module"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert isinstance(info.value, qexport.QExportError)


def test_errors_raised_before_any_work():
    model = MLP((64, 64, 48, 16)).eval()  # layers.2 has in_features 48: int4 g32 cannot take it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidSchemeError, match="layers.2"):
        qexport.quantize(model, scheme_for("int4_weight_only"))
    assert not quantized_modules(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_transformer_one_region_per_linear():
    model = TinyTransformer().eval()
    qexport.quantize(model, "int8_weight_only", filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    n_linear = sum(type(m) is nn.Linear for m in TinyTransformer().modules())
    assert len(quantized_modules(model)) == n_linear == 13
