"""quantize(): module replacement, memory, calibration and every error path."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import qexport
from qexport import (
    CalibrationError, InvalidSchemeError, NothingToQuantizeError, QuantizedModule, QuantizedWeightError,
    UnknownSchemeError, UnsupportedModuleError,
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
        assert m.tensors()["weight"].dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)
        assert m.weight.dtype == torch.float32  # what the float layer answered
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


class _ReadsAWeightItself(nn.Module):
    """Mamba's slow path at toy size: the model computes with `aux.weight` itself, never calling `aux`."""

    def __init__(self):
        super().__init__()
        self.fc, self.aux = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x) * self.aux.weight.detach().sum()


@pytest.mark.parametrize("recipe, kw, why", [
    ("int8_static", {}, "their activation ranges are unknown"),
    ("int8_dynamic", {"algorithm": "gptq"}, "GPTQ has no inputs to fit them to"),
])
def test_a_layer_calibration_never_reaches_is_named_with_the_fix(recipe, kw, why):
    model = _ReadsAWeightItself().eval()
    with pytest.raises(CalibrationError, match=rf"1 layer\(s\) never ran during calibration \(aux\); {why}.*Mamba's conv1d.*'aux': None"):
        qexport.quantize(model, recipe, calibration_data=[(torch.randn(2, 64),)], **kw)
    assert not quantized_modules(model)  # refused before any layer was swapped
    qexport.quantize(model, {nn.Linear: recipe, "aux": None}, calibration_data=[(torch.randn(2, 64),)], **kw)
    assert [n for n, _ in quantized_modules(model)] == ["fc"]


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
    (lambda: qexport.quantize(MLP((48, 16)), "int4_weight_only", filter_fn=lambda m, n: True), InvalidSchemeError,
     r"layers.0: int4_weight_only group_size=128 does not divide the linear reduction dimension 48"),
    # selected by default, a layer the scheme cannot take is skipped; none left is an error naming why
    (lambda: qexport.quantize(MLP((48, 16)), "int4_weight_only"), NothingToQuantizeError,
     r"Linear: int4_weight_only group_size=128 does not divide the linear reduction dimension 48"),
    (lambda: qexport.quantize(EmbedNet(), "int8_dynamic", filter_fn=lambda m, n: True), UnsupportedModuleError,
     r"emb: scheme int8_dynamic cannot quantize Embedding"),
    (lambda: qexport.quantize(nn.Sequential(nn.Conv3d(3, 3, 1)), "int8_weight_only", filter_fn=lambda m, n: True),
     UnsupportedModuleError, "0: Conv3d has no region op"),
    (lambda: qexport.quantize(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")), "int8_weight_only",
                              filter_fn=lambda m, n: True), UnsupportedModuleError, "0: Conv2d padding_mode='reflect'"),
    (lambda: qexport.quantize(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")), "int8_weight_only"),
     NothingToQuantizeError, "padding_mode='reflect'"),
    (lambda: qexport.quantize(nn.Sequential(nn.ReLU()), "int8_weight_only"), NothingToQuantizeError, "no module to quantize"),
    (lambda: qexport.quantize(qexport.quantize(MLP(), "int8_dynamic"), "int8_weight_only"), NothingToQuantizeError,
     "its 2 weight layers are already quantized .* quantize a fresh copy of the float model"),
    (lambda: qexport.quantize(nn.Linear(4, 4), "int8_weight_only"), UnsupportedModuleError, "wrap a bare"),
    (lambda: qexport.quantize("model", "int8_weight_only"), UnsupportedModuleError, "takes an nn.Module"),
    # a filter_fn that cannot answer is named, with the layer (was a bare TypeError / its own exception)
    (lambda: qexport.quantize(MLP(), "int8_weight_only", filter_fn=lambda m: True), qexport.UsageError,
     r"filter_fn raised on layers.0 \(Linear\): TypeError: .* called as filter_fn\(module, fqn\)"),
    (lambda: qexport.quantize(MLP(), "int8_weight_only", filter_fn="layers.0"), qexport.UsageError, "filter_fn must be a callable"),
    # PT2E's order (export, then quantize the graph) is told qexport's
    (lambda: qexport.quantize(torch.export.export(MLP(), (torch.randn(2, 64),)), "int8_weight_only"), UnsupportedModuleError,
     r"got ExportedProgram; quantize the eager model, then export it"),
    (lambda: qexport.quantize(torch.export.export(MLP(), (torch.randn(2, 64),)).module(), "int8_weight_only"),
     NothingToQuantizeError, r"traced or exported graph \(ep.module\(\)\?\).*quantize the eager model, then export it"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert isinstance(info.value, qexport.QExportError)


def test_errors_raised_before_any_work():
    model = MLP((64, 64, 48, 16)).eval()  # layers.2 has in_features 48: int4 g32 cannot take it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidSchemeError, match="layers.2"):
        qexport.quantize(model, scheme_for("int4_weight_only"), filter_fn=lambda m, fqn: True)
    assert not quantized_modules(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_transformer_one_region_per_linear():
    model = TinyTransformer().eval()
    qexport.quantize(model, "int8_weight_only", filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "own")
    n_linear = sum(type(m) is nn.Linear for m in TinyTransformer().modules())
    assert len(quantized_modules(model)) == n_linear == 13


# -- what models people bring are made of ----------------------------------------------------------

class ScaledLinear(nn.Linear):
    """A Linear subclass that keeps Linear.forward (as many libraries' wrappers do)."""


class LoraLikeLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class Experts(nn.Module):
    """transformers 5's mixture-of-experts block (MixtralExperts): the experts' weights stacked in one
    parameter that its forward indexes, no Linear layers."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 16, 16) * 0.1)

    def forward(self, x):
        return x @ self.gate_up_proj[1].T


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = ScaledLinear(16, 16)
        self.own = LoraLikeLinear(16, 16)
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.experts = Experts()

    def forward(self, x):
        y = self.conv(x.view(x.shape[0], 4, 4)).flatten(1)[:, :16]
        y = self.sub(x) + self.own(y) + self.experts(x)
        return self.attn(y[:, None], y[:, None], y[:, None])[0][:, 0]


def test_linear_subclasses_conv1d_and_what_is_skipped_with_reasons():
    model = Mixed().eval()
    x = torch.randn(3, 16)
    ref = model(x)
    qexport.quantize(model, "int8_dynamic")
    assert isinstance(model.sub, QuantizedModule) and model.sub.op == "linear"
    assert isinstance(model.conv, QuantizedModule) and model.conv.op == "conv1d"
    # conv activations have no token axis: the region records the per-tensor math it runs
    assert model.conv.scheme.act_granularity == "per_tensor" and "per_tensor" in model.conv.scheme.describe()
    assert model.sub.scheme.act_granularity == "per_token"
    assert type(model.own) is LoraLikeLinear and type(model.attn.out_proj) is not QuantizedModule
    summary = model.qexport_summary
    why = {d.module: d.reason for d in summary.skipped}
    assert "overrides nn.Linear.forward" in why["own"]
    assert "reads out_proj.weight directly" in why["attn.out_proj"]
    assert "in_proj" in why["attn"]
    # most of an MoE model's weights: named, not passed over in silence
    assert "stacked weight matrices (gate_up_proj [4, 16, 16]" in why["experts"]
    assert {d.module for d in summary.quantized} == {"sub", "conv"}
    text = str(summary)
    assert "quantized 2 of 6 weight layers" in text and "LoraLikeLinear" in text and "Conv1d" in text
    assert rel_err(model(x), ref) < 0.05


class MatmulLinear(nn.Linear):
    """Falcon's FalconLinear: a Linear subclass whose own forward computes x @ W.T + b."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class PaddedConv2d(nn.Conv2d):
    """timm's Conv2dSame: a Conv2d subclass with its own forward (padding computed per input)."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def test_multihead_attention_named_in_a_recipe_is_an_error_and_kept_by_filter_fn_a_skip():
    with pytest.raises(UnsupportedModuleError, match=r"attn.out_proj: nn.MultiheadAttention reads out_proj.weight directly"):
        qexport.quantize(Mixed().eval(), {"attn.out_proj": "int8_dynamic", "sub": "int8_dynamic"})
    with pytest.raises(UnsupportedModuleError, match=r"experts: its own forward reads stacked weight matrices"):
        qexport.quantize(Mixed().eval(), {"experts": "int8_dynamic"})
    model = qexport.quantize(Mixed().eval(), "int8_dynamic", filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "own")
    assert {d.module for d in model.qexport_summary.quantized} == {"sub"}
    assert type(model.attn.out_proj) is not QuantizedModule


def test_recipe_keys_that_match_no_layer_are_reported():
    """A typo, or a container's name (a name key selects that module only), would otherwise leave the
    layers the user meant to keep float quantized without a word."""
    model = nn.ModuleDict(dict(enc=nn.Sequential(nn.Linear(16, 16)), head=nn.Linear(16, 8)))
    qexport.quantize(model, {"enc": None, "haed": None, "head": "int8_dynamic", nn.Linear: "int8_dynamic"})
    assert model.qexport_summary.unmatched_keys == (
        "'enc' matched no weight layer (it is a container: select the layers under it with 'enc.*')",
        "'haed' matched no weight layer")
    assert str(model.qexport_summary).endswith("\nrecipe key 'haed' matched no weight layer")
    assert qexport.quantize(MLP().eval(), "int8_dynamic").qexport_summary.unmatched_keys == ()


def test_subclasses_by_their_forward():
    """A subclass keeping its base's forward is its base (weight_norm's parametrized conv: the region
    takes the computed weight); one overriding it is skipped, naming the fix, unless a recipe names its
    class; an odd layer under the default selection (reflect padding, max_norm, a group size that does
    not divide it) is a skip with the reason, not an error for the whole model."""
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(
        wn=nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1, groups=2)),
        mm=MatmulLinear(16, 16), pad=PaddedConv2d(1, 2, 3), reflect=nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
        renorm=nn.Embedding(10, 16, max_norm=1.0), odd=nn.Linear(24, 8), fc=nn.Linear(16, 8))).eval()
    x = torch.randn(2, 4, 4)

    def run(m):
        with torch.no_grad():
            return torch.cat([m.wn(x).flatten(1), m.mm(x.flatten(1)), m.pad(x[:, None]).flatten(1), m.fc(x.flatten(1))], 1)

    ref = run(model)
    qexport.quantize(model, {"od*": qexport.schemes.get("int4_weight_only", group_size=32), nn.Module: "int8_weight_only"})
    why = {d.module: d.reason for d in model.qexport_summary.skipped}
    assert isinstance(model.wn, QuantizedModule) and model.wn.op == "conv1d"
    assert "name its class in a recipe: {MatmulLinear: scheme}" in why["mm"]
    assert "overrides nn.Conv2d.forward" in why["pad"]
    assert "padding_mode='reflect'" in why["reflect"] and "max_norm" in why["renorm"]
    assert "group_size=32 does not divide the linear reduction dimension 24" in why["odd"]
    model2 = qexport.quantize(type(model)({k: v for k, v in model.items()}), {MatmulLinear: "int8_dynamic"})
    assert isinstance(model2.mm, QuantizedModule) and model2.mm.op == "linear"
    assert rel_err(run(model2), ref) < 0.05


def test_conv1d_region_matches_reference_math():
    conv = nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2).eval()
    x = torch.randn(2, 4, 9)
    model = nn.Sequential(conv)
    w = conv.weight.detach().clone()
    qexport.quantize(model, "int8_weight_only")
    q = model[0]
    wq = (q.tensors()["weight"].float() * q.weight_scale.float()[:, None, None]).bfloat16()
    expect = torch.nn.functional.conv1d(x.bfloat16(), wq, q.bias.bfloat16(), 2, 1, 1, 2).float()
    torch.testing.assert_close(model(x), expect, rtol=0, atol=0)
    assert rel_err(model(x), torch.nn.functional.conv1d(x, w, conv.bias, 2, 1, 1, 2)) < 0.02


@pytest.fixture
def hf():
    pytest.importorskip("transformers")
    import hf_models

    return hf_models


def test_gpt2_conv1d_projections_are_linear_regions_and_filter_fn_sees_them(hf):
    model = hf.gpt2()
    ids = hf.token_ids()
    ref = model(ids).logits
    seen = []
    qexport.quantize(model, "int8_weight_only", filter_fn=lambda m, fqn: seen.append(type(m).__name__) or "c_fc" in fqn)
    assert "Conv1D" in seen
    (name, q), = quantized_modules(model)
    assert name == "transformer.h.0.mlp.c_fc" and q.op == "linear" and q.weight_shape == (128, 32)  # [out, in]
    assert rel_err(model(ids).logits, ref) < 0.02

    model = hf.gpt2()
    qexport.quantize(model, "int8_dynamic")
    kinds = {d.layer_type for d in model.qexport_summary.quantized}
    assert kinds == {"Conv1D", "Linear", "Embedding"}, kinds
    assert len(quantized_modules(model)) == 6  # 4 Conv1D, lm_head and (tied, weight-only) wte
    assert rel_err(model(ids).logits, ref) < 0.05
    assert {d.module for d in model.qexport_summary.skipped} == {"transformer.wpe"}
    assert "indices" in model.qexport_summary.skipped[0].reason


def test_tied_weight_quantized_once_and_shared(hf):
    model = hf.gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    qexport.quantize(model, "int8_dynamic")
    wte, head = model.transformer.wte, model.lm_head
    assert wte.tensors()["weight"] is head.tensors()["weight"] and wte.weight_scale is head.weight_scale  # one tensor, two regions
    assert wte.scheme.activation == "none" and head.scheme.activation == "dynamic"
    tied = {d.module: d.tied_to for d in model.qexport_summary.decisions}
    assert tied["transformer.wte"] == "lm_head"

    def saved_bytes(m):
        import io
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        return buf.tell()

    recipe = {nn.Embedding: "int8_weight_only", nn.Linear: "int8_dynamic"}
    tied, untied = qexport.quantize(hf.gpt2(), recipe), qexport.quantize(hf.gpt2(tie=False), recipe)
    assert tied.transformer.wte.tensors()["weight"] is tied.lm_head.tensors()["weight"]
    assert untied.transformer.wte.tensors()["weight"] is not untied.lm_head.tensors()["weight"]
    assert saved_bytes(untied) - saved_bytes(tied) >= hf.VOCAB * 32  # the int8 table is stored once


def test_tied_weight_left_float_is_reported(hf):
    model = hf.gpt2()
    qexport.quantize(model, {"lm_head": "int8_weight_only"})
    (wte,) = [d for d in model.qexport_summary.skipped if d.module == "transformer.wte"]
    assert "no recipe entry" in wte.reason and "tied to lm_head, so it is stored twice" in wte.reason


class _Aliased(nn.Module):
    """One Linear under two names (`self.head = self.blocks[-1]`): named_modules() yields it once."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(32, 32), nn.Linear(32, 32)])
        self.head = self.blocks[-1]

    def forward(self, x):
        return self.head(self.blocks[0](x)) + self.blocks[1](x)


def test_a_layer_under_two_names_is_quantized_under_both():
    model = qexport.quantize(_Aliased().eval(), "int8_weight_only")
    assert isinstance(model.head, QuantizedModule) and model.head is model.blocks[1]  # the float one ran by its alias
    ep = qexport.export(model, (torch.randn(2, 32),))
    assert [r.name for r in qexport.regions(ep)] == ["blocks.0", "blocks.1", "blocks.1_1"]
    assert not any(p.dtype.is_floating_point and p.dim() == 2 for p in ep.state_dict.values())  # no float weight left


@pytest.mark.parametrize("key", ["head", "hea*"])
def test_a_recipe_key_naming_a_layers_second_name_decides_it(key):
    """It was reported as "matched no weight layer" and the layer took the type key's scheme."""
    model = qexport.quantize(_Aliased().eval(), {nn.Linear: "int8_weight_only", key: None})
    assert not isinstance(model.head, QuantizedModule) and model.head is model.blocks[1]
    assert isinstance(model.blocks[0], QuantizedModule)
    assert model.qexport_summary.unmatched_keys == ()


# -- recipes ---------------------------------------------------------------------------------------

def test_recipe_precedence():
    model = TinyTransformer().eval()  # emb, blocks.{0,1}.{q,k,v,o,up,down}, head
    qexport.quantize(model, {
        nn.Linear: "int8_dynamic",
        nn.Embedding: scheme_for("int4_weight_only"),
        "blocks.*.up": "int8_weight_only",  # a glob beats a type
        "blocks.1.*": None,  # None leaves the matches float
        "blocks.1.up": "int8_static",  # an exact name beats every glob, whatever the order
    }, calibration_data=[(torch.randint(0, 128, (2, 8)),)])
    got = {n: q.scheme.name for n, q in quantized_modules(model)}
    assert got["emb"] == "int4_weight_only" and got["head"] == "int8_dynamic"
    assert got["blocks.0.q"] == "int8_dynamic" and got["blocks.0.up"] == "int8_weight_only"
    assert got["blocks.1.up"] == "int8_static"
    assert "blocks.1.q" not in got and type(model.blocks[1].q) is nn.Linear
    why = {d.module: d.reason for d in model.qexport_summary.skipped}
    assert why["blocks.1.q"] == "recipe entry 'blocks.1.*' maps it to None"


def test_recipe_type_nearest_in_mro_and_no_entry():
    model = nn.Sequential(ScaledLinear(8, 8), nn.Linear(8, 8), nn.Embedding(4, 8)).eval()
    qexport.quantize(model, {nn.Linear: "int8_dynamic", ScaledLinear: "int8_weight_only"})
    assert model[0].scheme.name == "int8_weight_only" and model[1].scheme.name == "int8_dynamic"
    assert type(model[2]) is nn.Embedding
    assert model.qexport_summary.skipped[0].reason == "no recipe entry matches it"


@pytest.mark.parametrize("recipe, exc, match", [
    ({nn.Linear: "int8_static"}, CalibrationError, "int8_static quantizes activations statically"),
    ({nn.Linear: "int9"}, UnknownSchemeError, "unknown scheme 'int9'"),
    ({3: "int8_dynamic"}, UnsupportedModuleError, "recipe key 3: a key is an nn.Module subclass"),
    ({}, UnsupportedModuleError, "a recipe is a scheme"),
    ({"emb": "int8_dynamic"}, UnsupportedModuleError, "emb: scheme int8_dynamic cannot quantize Embedding"),
    ({"nothing.*": "int8_dynamic"}, NothingToQuantizeError, "no recipe entry matches it"),
])
def test_recipe_errors(recipe, exc, match):
    model = EmbedNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        qexport.quantize(model, recipe)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not quantized_modules(model)


def test_recipe_glob_skips_what_an_exact_name_would_refuse():
    model = EmbedNet().eval()
    qexport.quantize(model, {"*": "int8_dynamic"})  # a glob is a broad selection: the embedding is skipped
    assert type(model.emb) is nn.Embedding and isinstance(model.fc, QuantizedModule)
    assert "indices" in model.qexport_summary.skipped[0].reason


class ReadsWeights(nn.Module):
    """Model code that reads its layers' weights for metadata, as transformers does (ViT casts the pixels
    to `projection.weight.dtype`; others read `.shape`, `.device`, `in_features`, `padding_idx`)."""

    def __init__(self, reads: bool = True) -> None:
        super().__init__()
        self.reads = reads
        self.conv = nn.Conv2d(3, 32, 4, stride=4)
        self.proj = nn.Linear(32, 16, bias=False)
        self.emb = nn.Embedding(10, 16, padding_idx=0)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # the twin that does not read them uses the same values, written out
        dtype, device, proj_in = ((self.conv.weight.dtype, self.conv.weight.device, self.proj.weight.shape[1])
                                  if self.reads else (torch.float32, torch.device("cpu"), 32))
        h = self.conv(pixels.to(dtype).to(device)).flatten(2).transpose(1, 2).reshape(-1, proj_in)
        h = h.to(self.proj.weight.dtype if self.reads else torch.float32)
        h = h.reshape(pixels.shape[0], -1, self.proj.in_features if self.reads else 32)
        return self.proj(h) + self.emb(ids)[:, :1]


def _reads_weights(reads: bool = True) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ReadsWeights(reads).eval()
    return qexport.quantize(model, {nn.Conv2d: "int8_dynamic", nn.Linear: qexport.schemes.get("int4_weight_only", group_size=32), nn.Embedding: "int8_weight_only"})


READS_WEIGHTS_INPUTS = (torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2, 3)))


def test_quantized_weight_answers_like_the_float_weight():
    """`.weight` of a quantized layer has the float weight's dtype, shape and device (a Conv1D its
    [in, out] shape); the layer keeps its hyperparameters and `bias=None`; the codes are `tensors()`."""
    float_model = ReadsWeights().eval()
    model = _reads_weights()
    for name in ("conv", "proj", "emb"):
        f, q = float_model.get_submodule(name), model.get_submodule(name)
        assert isinstance(q, QuantizedModule) and isinstance(q.weight, qexport.FloatWeightStandIn)
        assert (q.weight.dtype, q.weight.shape, q.weight.device) == (f.weight.dtype, f.weight.shape, f.weight.device)
        assert q.weight.dim() == f.weight.dim() and q.weight.numel() == f.weight.numel() and q.weight.is_floating_point()
        for attr in type(f).__constants__:
            assert getattr(q, attr) == getattr(f, attr), (name, attr)
        assert q.tensors()["weight"].dtype in (torch.int8, torch.uint8) and q.tensors()["weight"] is q._buffers["weight"]
        assert name in repr(q.weight) and q.scheme.name in repr(q.weight)
    assert model.proj.bias is None and model.conv.bias is not None
    assert model.emb.padding_idx == 0 and model.conv.kernel_size == (4, 4) and model.proj.in_features == 32
    assert list(model.state_dict()) == [f"{n}.{r}" for n in ("conv", "proj", "emb") for r in model.get_submodule(n).roles]

    bf16 = qexport.quantize(nn.Sequential(nn.Linear(8, 4).to(torch.bfloat16)), "int8_weight_only")
    assert bf16[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["fp8_e4m3", "nf4"])
def test_casting_a_quantized_model_keeps_the_schemes_tensors(scheme):
    """model.to(bf16) after quantize() cast fp8 codes to bf16 and rounded nf4's codebook; an embedding kept
    answering in float32 while the rest of the model was bf16."""
    model = qexport.quantize(EmbedNet().eval(), scheme_for(scheme) if scheme == "nf4" else {nn.Linear: scheme})
    before = {f"{path}.{r}": v.clone() for path, q in quantized_modules(model) for r, v in q.tensors().items() if r != "bias"}
    model.to(torch.bfloat16)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert all(v.dtype == torch.bfloat16 for k, v in after.items() if k not in before)  # biases, float layers
    for layer in quantized_modules(model):
        assert layer[1].weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 100, (2, 7))).dtype == torch.bfloat16
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv1d = qexport.quantize(nn.Sequential(Conv1D(6, 4)), "int8_weight_only")[0]
    assert conv1d.weight.shape == (4, 6) and conv1d.weight_shape == (6, 4) and (conv1d.nf, conv1d.nx) == (6, 4)


@pytest.mark.parametrize("use", [
    lambda w: w.data,
    lambda w: w.detach(),
    lambda w: w @ torch.ones(4, 2),
    lambda w: w.float() + 1,
    lambda w: torch.nn.functional.conv2d(torch.ones(1, 3, 4, 4), w),
    lambda w: w.clone(),
    lambda w: w.sum().item(),
], ids=["data", "detach", "matmul", "add", "conv2d", "clone", "sum"])
def test_computing_with_a_quantized_weight_is_an_error_naming_the_layer_and_the_fix(use):
    model = _reads_weights()
    with pytest.raises(qexport.QuantizedWeightError, match=r"conv\.weight is quantized \(int8_dynamic.*holds no values.*"
                       r"quantize\(model, \{\.\.\., 'conv': None\}\).*get_submodule\('conv'\)\.tensors\(\)"):
        use(model.conv.weight)


class ComputesWithWeight(nn.Module):
    """DeBERTa-v2 reads `encoder.rel_embeddings.weight` as a tensor instead of calling the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.rel = nn.Embedding(8, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.rel.weight[:1]


def test_exporting_a_model_that_computes_with_a_quantized_weight_names_the_layer():
    """Under torch.export's fake and proxy modes an op on the stand-in never reaches its
    __torch_dispatch__ (torch said "Unable to cast NotImplemented to Tensor"): the error is the same
    QuantizedWeightError as in eager mode, and leaving the layer float, as it says, exports."""
    model = qexport.quantize(ComputesWithWeight().eval(), "int8_weight_only")
    with pytest.raises(qexport.QuantizedWeightError, match=r"rel\.weight is quantized .*\{\.\.\., 'rel': None\}"):
        qexport.export(model, (torch.randn(2, 16),))
    model = qexport.quantize(ComputesWithWeight().eval(), {nn.Module: "int8_weight_only", "rel": None})
    assert [r.module_path for r in qexport.regions(qexport.export(model, (torch.randn(2, 16),)))] == ["fc"]


def test_quantized_weight_survives_deepcopy_state_dict_and_keeps_ties():
    import copy

    model = _reads_weights()
    expected = model(*READS_WEIGHTS_INPUTS)
    twin = copy.deepcopy(model)
    assert twin.conv.weight.dtype == torch.float32 and twin.conv.tensors()["weight"].dtype == torch.int8
    torch.testing.assert_close(twin(*READS_WEIGHTS_INPUTS), expected, rtol=0, atol=0)
    other = _reads_weights()
    with torch.no_grad():
        for t in other.state_dict().values():
            t.zero_()
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(*READS_WEIGHTS_INPUTS), expected, rtol=0, atol=0)
    # torch.save(model) pickles the whole model (the region function is a closure: a PicklingError)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(*READS_WEIGHTS_INPUTS), expected, rtol=0, atol=0)
    # a float checkpoint loaded after quantize(): torch cast its weights into the codes (every code 0), silently
    # with strict=False
    float_state = {k: v for k, v in ReadsWeights().state_dict().items()}
    with pytest.raises(QuantizedWeightError, match=r"\w+\.weight: the state_dict holds torch.float32 .* is quantized .*before quantize\(\)"):
        other.load_state_dict(float_state, strict=False)
    # transformers' tie_weights() on a quantized model: an error, never the stand-in in place of the codes
    with pytest.raises(UnsupportedModuleError, match=r"proj.weight = emb.weight: both layers are quantized.*before quantize"):
        model.proj.weight = model.emb.weight
    # an integer activation (e.g. an integer example input) is refused, not computed on
    with pytest.raises(UnsupportedModuleError, match=r"proj: the quantized linear gets a torch.int64 activation"):
        model.proj(torch.ones(2, 32, dtype=torch.long))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_reading_weight_metadata_exports_to_nothing(strict):
    """The same graph, state and constants as the twin model that never reads its weights: no node, no
    constant, no buffer for the stand-in; the program runs like the eager quantized model."""
    from qexport.regions import regions

    programs = [qexport.export(_reads_weights(reads), READS_WEIGHTS_INPUTS, strict=strict) for reads in (True, False)]
    # (Dynamo orders the state's placeholders by first use, and reading `.weight` touches the codes)
    reads, plain = ((sorted(str(n.target) for n in ep.graph.nodes if n.op == "placeholder"),
                     [str(n.target) for n in ep.graph.nodes if n.op != "placeholder"]) for ep in programs)
    assert reads == plain
    assert list(programs[0].state_dict) == list(programs[1].state_dict) and not programs[0].constants
    assert [r.op for r in regions(programs[0])] == ["conv2d", "linear", "embedding"]
    torch.testing.assert_close(programs[0].module()(*READS_WEIGHTS_INPUTS), _reads_weights()(*READS_WEIGHTS_INPUTS))
