"""Scheme records, the registry, and each built-in family's reference math."""

from __future__ import annotations

import json

import pytest
import torch

import qexport
from qexport import InvalidSchemeError, Scheme, UnknownSchemeError, UnsupportedVersionError
from qexport.schemes import SchemeMath, math_for

BUILTINS = ["fp8_e4m3", "int4_weight_only", "int8_dynamic", "int8_dynamic_int4_weight", "int8_static", "int8_weight_only", "nf4"]


def test_builtin_names():
    assert set(BUILTINS) <= set(qexport.schemes.names())
    assert qexport.schemes.builtin_names() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_to_dict_is_json_and_round_trips(name):
    s = qexport.schemes.get(name)
    d = s.to_dict()
    assert list(d) == list(Scheme.FIELDS)  # keys are the field names
    again = Scheme.from_dict(json.loads(json.dumps(d)))
    assert again == s and hash(again) == hash(s)
    assert d["version"] == qexport.schemes.SCHEME_VERSION


def test_get_overrides_and_validates():
    s = qexport.schemes.get("int4_weight_only", group_size=64)
    assert s.group_size == 64 and s.name == "int4_weight_only"
    assert qexport.schemes.get(s) is s  # a Scheme is accepted wherever a name is
    assert s.params() == {"group_size": 64}


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("int4_weight_only", {"group_size": 48}, "group_size=48 is not supported; choose one of"),
        ("int4_weight_only", {"bits": 3}, "bits=3 is not supported; int4 schemes store weight_dtype='uint4', bits=4"),
        ("int8_weight_only", {"bits": 4}, "bits=4 is not supported"),
        # the dtype is what is wrong: the message names it (was "bits=8 (uint8) ...; int8 schemes use bits=8")
        ("int8_weight_only", {"weight_dtype": "uint8"}, r"weight_dtype='uint8', bits=8 is not supported; int8 schemes store weight_dtype='int8'"),
        # the version is the schema's, not a choice (version=2 made files this qexport's own load refused)
        ("int8_weight_only", {"version": 2}, "version is the scheme schema's"),
        # fields the shared activation math does not compute: the region's scheme would claim another computation
        ("int8_dynamic_int4_weight", {"act_symmetric": True}, r"act_symmetric=True is not supported; int8 activations are asymmetric"),
        ("fp8_e4m3", {"act_symmetric": False}, r"float8_e4m3fn activations are symmetric"),
        ("int4_weight_only", {"act_dtype": "int8"}, r"act_dtype='int8' describes quantized activations, but activation='none'"),
        ("fp8_e4m3", {"symmetric": False}, "fp8 weights are symmetric"),
        ("nf4", {"symmetric": False}, "nf4 codes are its codebook's"),
        ("int8_weight_only", {"qmin": -127.5}, "must be whole codes"),
        ("int8_weight_only", {"granularity": "per_block"}, "granularity='per_block' is not one of"),
        ("int8_weight_only", {"symmetric": False}, "int8 weights are symmetric"),
        ("int8_weight_only", {"qmin": 10, "qmax": 5}, "qmin=10 must be below qmax=5"),
        ("int8_weight_only", {"compute_dtype": "float64"}, "compute_dtype='float64' is not one of"),
        ("int8_weight_only", {"colour": "red"}, r"unknown parameter\(s\) \['colour'\]"),
        ("nf4", {"activation": "dynamic", "act_dtype": "int8", "act_granularity": "per_token"}, "weight-only"),
        ("fp8_e4m3", {"qmax": 1000.0}, "outside float8_e4m3fn range"),
        ("int8_dynamic", {"reduce_range": 1}, r"reduce_range is True or False \(True sets \{'qmin': -64, 'qmax': 64\}\)"),
        ("int8_static", {"reduce_range": True, "qmax": 100}, r"reduce_range=True sets \['qmax'\] itself"),
        ("int4_weight_only", {"reduce_range": True}, r"unknown parameter\(s\) \['reduce_range'\]"),
        ("int8_dynamic", {"act_symmetric": True}, r"act_symmetric=True is not supported; int8 activations are asymmetric \(drop"),
        ("int8_weight_only", {"algorithm": "hqq"}, r"algorithm='hqq' is not available for the int8 family; it offers \['rtn', 'mse', 'gptq'\]"),
        ("int4_weight_only", {"algorithm": "mse"}, r"algorithm='mse' is not available for the int4 family"),
        # a field of another type, from get() as from a file (was a TypeError in qmin < qmax)
        ("int8_dynamic", {"qmin": None}, r"field 'qmin' must be float, got 'None'"),
        ("int8_weight_only", {"granularity": "per_group", "group_size": "64"}, r"field 'group_size' must be int \| None"),
    ],
)
def test_invalid_parameters(name, params, match):
    with pytest.raises(InvalidSchemeError, match=match):
        qexport.schemes.get(name, **params)


def test_weight_only_form_drops_the_activation_fields():
    s = qexport.schemes.get("int8_dynamic", activation="none")
    assert s.is_weight_only and (s.act_dtype, s.act_granularity, s.act_symmetric) == (None, None, None)


def test_a_user_familys_activation_fields_are_those_the_region_computes():
    # the region function picks its activation math by (activation, act_dtype): other values ran int8
    base = dict(family="test_int6", weight_dtype="int8", bits=6, granularity="per_channel", qmin=-31, qmax=31)
    for acts, match in [(dict(act_dtype="uint8", act_granularity="per_token"), "act_dtype='uint8' are not computed by any region"),
                        (dict(act_dtype="int8", act_granularity="per_token", activation="static"), "static int8 activations are per_tensor")]:
        with pytest.raises(InvalidSchemeError, match=match):
            qexport.schemes.register(Scheme(name="test_int6_act", **{"activation": "dynamic", **acts, **base}), Int6Math())
        assert "test_int6_act" not in qexport.schemes.names()
    with pytest.raises(InvalidSchemeError, match="version=0 is not a scheme schema version"):
        qexport.schemes.register(Scheme(name="test_int6_v0", version=0, **base), Int6Math())


def test_unknown_scheme_suggests():
    with pytest.raises(UnknownSchemeError, match=r"unknown scheme 'int8_weightonly'.*Did you mean 'int8_weight_only'"):
        qexport.schemes.get("int8_weightonly")
    assert isinstance(UnknownSchemeError("x"), qexport.QExportError)


def test_from_dict_errors():
    d = qexport.schemes.get("nf4").to_dict()
    with pytest.raises(UnsupportedVersionError, match="schema version 99"):
        Scheme.from_dict({**d, "version": 99})
    with pytest.raises(InvalidSchemeError, match="unknown scheme field"):
        Scheme.from_dict({**d, "extra": 1})
    with pytest.raises(InvalidSchemeError, match="lacks required field"):
        Scheme.from_dict({"name": "x"})


# -- reference math: round-trip error bounds per scheme --------------------------------------------
# Relative max error |w - deq(q(w))| / max|w| for a Gaussian weight; bounds from the format's step.
BOUNDS = {
    "int8_weight_only": 1 / 127 / 2 + 1e-6,  # half a step of amax/127 per channel
    "int8_dynamic": 1 / 127 / 2 + 1e-6,
    "int8_static": 1 / 127 / 2 + 1e-6,
    "int4_weight_only": 1 / 15 / 2 * 2 + 1e-6,  # half a step of range/15 per group, range <= 2*amax
    "int8_dynamic_int4_weight": 1 / 7 / 2 + 2**-8,  # half a step of amax/7 (symmetric), + the bf16 scale's rounding
    "fp8_e4m3": 2**-4 + 1e-6,  # e4m3 has 3 mantissa bits: relative step 2^-3, half of it
    "nf4": 0.5 * max(b - a for a, b in zip(qexport.schemes.nf4.NF4_CODEBOOK, qexport.schemes.nf4.NF4_CODEBOOK[1:])) + 1e-6,  # widest gap between NF4 codes, halved
}


def _weight_cases():
    for name in BUILTINS:
        s = qexport.schemes.get(name)
        yield name, (32, 64)
        if math_for(s).supports(s, "conv2d"):
            yield name, (16, 8, 3, 3)


@pytest.mark.parametrize("name, shape", list(_weight_cases()))
def test_weight_round_trip_error(name, shape):
    s = qexport.schemes.get(name)
    if s.granularity == "per_group":
        s = qexport.schemes.get(name, group_size=32)
    torch.manual_seed(0)
    w = torch.randn(shape)
    math = math_for(s)
    q = math.quantize_weight(s, w)
    assert set(q) == set(math.weight_roles)
    deq = math.dequantize_weight(s, q, tuple(w.shape))
    assert deq.shape == w.shape
    # per-row (or per-group) error relative to that row's (group's) amax
    rows = w.reshape(w.shape[0], -1)
    err = (deq.reshape_as(rows) - rows).abs().amax(1) / rows.abs().amax(1)
    assert err.max().item() <= BOUNDS[name], err.max()


def test_storage_sizes():
    w = torch.randn(64, 256)
    for name, nbytes in [("int8_weight_only", 64 * 256), ("int4_weight_only", 64 * 128), ("nf4", 64 * 128), ("fp8_e4m3", 64 * 256)]:
        s = qexport.schemes.get(name)
        q = math_for(s).quantize_weight(s, w)
        assert q["weight"].nbytes == nbytes, name
    s = qexport.schemes.get("int4_weight_only", group_size=32)
    q = math_for(s).quantize_weight(s, w)
    assert q["weight"].dtype == torch.uint8 and q["weight_scale"].shape == (64, 8)
    assert q["weight_zero_point"].max() <= 15


def test_int4_symmetric_variant():
    s = qexport.schemes.get("int4_weight_only", symmetric=True, group_size=32)
    q = math_for(s).quantize_weight(s, torch.randn(8, 64))
    assert (q["weight_zero_point"] == 8).all()


def test_nf4_codes_are_codebook_nearest():
    s = qexport.schemes.get("nf4", group_size=32)
    w = torch.linspace(-1, 1, 64).reshape(2, 32)
    q = math_for(s).quantize_weight(s, w)
    deq = math_for(s).dequantize_weight(s, q, (2, 32))
    book = torch.tensor(qexport.schemes.nf4.NF4_CODEBOOK)
    assert torch.isin(deq / q["weight_scale"].repeat_interleave(32, 1), book).all()


class Int6Math(SchemeMath):
    family = "test_int6"
    weight_roles = ("weight", "weight_scale")
    supported_ops = frozenset({"linear"})
    tolerance = 5e-2

    def quantize_weight(self, s, w):
        scale = w.abs().amax(1) / 31
        return {"weight": torch.round(w / scale[:, None]).clamp(-31, 31).to(torch.int8), "weight_scale": scale}

    def dequantize_weight(self, s, t, shape):
        return t["weight"].float() * t["weight_scale"][:, None]


@pytest.fixture
def int6():
    s = Scheme(name="test_int6", family="test_int6", weight_dtype="int8", bits=6, granularity="per_channel", qmin=-31, qmax=31)
    qexport.schemes.register(s, Int6Math())
    yield s
    qexport.schemes.unregister("test_int6")


def test_user_scheme_registers_and_validates(int6):
    assert "test_int6" in qexport.schemes.names()
    assert qexport.schemes.get("test_int6") == int6
    with pytest.raises(InvalidSchemeError, match="already registered"):
        qexport.schemes.register(int6.replace(qmax=30))
    with pytest.raises(InvalidSchemeError, match="built-in scheme"):
        qexport.schemes.unregister("nf4")
    with pytest.raises(InvalidSchemeError, match="has no math registered"):
        qexport.schemes.register(Scheme(name="x", family="nowhere", weight_dtype="int8", bits=8, granularity="per_channel"))
    with pytest.raises(InvalidSchemeError, match="math is for family"):
        qexport.schemes.register(Scheme(name="y", family="other", weight_dtype="int8", bits=8, granularity="per_channel"), Int6Math())


def test_user_scheme_reusing_a_builtin_family():
    s = Scheme(name="test_int8_per_tensor", family="int8", weight_dtype="int8", bits=8, granularity="per_tensor")
    qexport.schemes.register(s)
    try:
        q = math_for(s).quantize_weight(s, torch.randn(4, 8))
        assert q["weight_scale"].shape == (1,)
    finally:
        qexport.schemes.unregister(s.name)


def test_describe():
    assert qexport.schemes.get("int4_weight_only").describe() == "int4_weight_only(g128, asym, bf16)"
    assert "act=dynamic:per_token" in qexport.schemes.get("int8_dynamic").describe()


@pytest.mark.parametrize("name", ["int8_weight_only", "int8_dynamic", "int8_static"])
def test_reduce_range_is_7bit_weights(name):
    """int8's `reduce_range=True` (onnxruntime's name) is qmin=-64, qmax=64 in the Scheme itself, so it
    travels wherever a scheme does; the codes it quantizes to stay within +-64."""
    s = qexport.schemes.get(name, reduce_range=True)
    assert (s.qmin, s.qmax) == (-64, 64) and s.params() == {"qmin": -64, "qmax": 64}
    assert Scheme.from_dict(s.to_dict()) == s and "codes -64..64" in s.describe()
    assert qexport.schemes.get(name, reduce_range=False) == qexport.schemes.get(name)
    codes = math_for(s).quantize_weight(s, torch.randn(16, 32))["weight"]
    assert codes.abs().max() == 64


def test_weight_only_embedding_region_decodes_only_the_rows_it_gathers():
    """The embedding reference gathers quantized rows before dequantizing (what keeps an int4 table's
    lookup from decoding the whole table): same numbers as decoding the table, and no full-size
    decoded table anywhere in the exported region."""
    table = torch.nn.Embedding(1000, 128)
    ids = torch.tensor([[3, 999, 0, 3]])
    for name in ("int8_weight_only", "int4_weight_only"):
        q = qexport.quantize(torch.nn.Sequential(table), name)
        region = q[0]
        full = qexport.schemes.math_for(region.scheme).dequantize_weight(
            region.scheme, region.tensors(), region.weight_shape)
        assert torch.equal(q(ids), full.to(region.scheme.torch_compute_dtype)[ids].float()), name
        ep = qexport.export(q, (ids,))
        sizes = [n.meta["val"].numel() for m in ep.graph_module.modules() if isinstance(m, torch.fx.GraphModule)
                 for n in m.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)]
        assert max(sizes) < 1000 * 128 // 2, name  # nothing table-sized beyond the packed codes themselves


@pytest.mark.parametrize("field, value", [
    ("name", ["x"]), ("granularity", None), ("compute_dtype", 1), ("qmin", "0"), ("qmax", None), ("bits", True),
    ("algorithm", {}), ("symmetric", 1), ("group_size", 1.5), ("version", "\x1b[2J"),
])
def test_from_dict_refuses_fields_of_another_type(field, value):
    """A scheme comes from a file (a manifest, a graph's region options): a field of another JSON type
    is refused here, not met later as a TypeError in a report or a backend."""
    with pytest.raises((InvalidSchemeError, UnsupportedVersionError), match=f"{field}|schema version") as e:
        Scheme.from_dict({**qexport.schemes.get("int4_weight_only").to_dict(), field: value})
    assert "\x1b" not in str(e.value)


def test_a_builtin_familys_math_is_never_replaced():
    """A user math claiming a built-in family would silently change the numerics of every built-in
    scheme of that family (and of every file naming one) while their scheme dicts stayed the same."""
    int8 = math_for(qexport.schemes.get("int8_weight_only"))

    class Impostor(SchemeMath):
        family = "int8"

    s = Scheme(name="test_int8_impostor", family="int8", weight_dtype="int8", bits=8, granularity="per_tensor")
    with pytest.raises(InvalidSchemeError, match="'int8' is built in .* family of their own"):
        qexport.schemes.register(s, Impostor())
    with pytest.raises(InvalidSchemeError, match="'int8' is built in"):
        qexport.schemes.register_family(Impostor())
    assert math_for(qexport.schemes.get("int8_weight_only")) is int8 and "test_int8_impostor" not in qexport.schemes.names()
    assert qexport.schemes.register_family(type(int8)()) is int8  # the same math again: a no-op


def test_a_user_familys_math_is_replaced_only_on_request(int6):
    """Another library's math for a family in use changed what its schemes computed, silently."""

    class OtherInt6(Int6Math):
        pass

    other = int6.replace(name="test_int6_other")
    with pytest.raises(InvalidSchemeError, match=r"family 'test_int6' already has its math, .*Int6Math \(schemes \['test_int6'\]\); .*OtherInt6 would change"):
        qexport.schemes.register(other, OtherInt6())
    assert type(math_for(int6)) is Int6Math and "test_int6_other" not in qexport.schemes.names()
    Redefined = type("Int6Math", (Int6Math,), {"__module__": Int6Math.__module__, "__qualname__": Int6Math.__qualname__})
    assert qexport.schemes.register(int6, Redefined()) == int6  # a re-run cell or reloaded module: the same math
    qexport.schemes.register(other, OtherInt6(), overwrite=True)
    assert type(math_for(int6)) is OtherInt6
    qexport.schemes.unregister("test_int6_other")
    qexport.schemes.unregister("test_int6")
    assert "test_int6" not in qexport.schemes.families()  # the last scheme of a user family takes its math along


def test_a_refused_registration_leaves_nothing_behind():
    class NewMath(Int6Math):
        family = "test_half_registered"

    bad = Scheme(name="test_half", family="test_half_registered", weight_dtype="int8", bits=6,
                 granularity="per_group", group_size=None, qmin=-31, qmax=31)
    with pytest.raises(InvalidSchemeError, match="group_size=None"):
        qexport.schemes.register(bad, NewMath())
    assert "test_half_registered" not in qexport.schemes.families() and "test_half" not in qexport.schemes.names()


@pytest.mark.parametrize("make, message", [
    (lambda: qexport.schemes.get("int8_weight_only", qmin="-8"), "field 'qmin' must be float"),
    (lambda: qexport.schemes.get("int4_weight_only", group_size=32.0), "field 'group_size' must be int"),
    (lambda: qexport.schemes.get("int8_dynamic", symmetric=1), "field 'symmetric' must be bool"),
    (lambda: qexport.schemes.register(Scheme(name="test_bits", family="int8", weight_dtype="int8", bits="8",
                                             granularity="per_channel")), "field 'bits' must be int"),
    (lambda: qexport.schemes.register(Scheme(name="", family="int8", weight_dtype="int8", bits=8,
                                             granularity="per_channel")), "name must be a non-empty string"),
])
def test_scheme_fields_of_the_wrong_type_are_refused_by_name(make, message):
    with pytest.raises(InvalidSchemeError, match=message):
        make()
