"""qexport.regions: the versioned region payload and unique region names, through every backend that
keys its plans by name (AOTI, ONNX functions, ExecuTorch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import qexport
from qexport import runners
from qexport.errors import RegionFormatError, UnsupportedVersionError
from qexport.lower._graph import copy_program
from qexport.regions import REGION_FORMAT, RegionPayload, region_nodes, region_payload, set_region_payload
from qexport.schemes import math_for

from conftest import quantized, scheme_for

SCHEME = "int8_dynamic"


class Twice(nn.Module):
    """One Linear called twice (weights shared), then another."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.fc(x)))))


X = torch.randn(4, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def twice():
    torch.manual_seed(0)
    model = quantized(Twice(), scheme_for(SCHEME), (X,))
    with torch.no_grad():
        expected = model(X)
    return model, qexport.export(model, (X,)), expected


def _rel(got, expected) -> float:
    got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# -- the payload ------------------------------------------------------------------------------------

def test_payload_round_trips_and_records_the_unique_name(twice):
    _, ep, _ = twice
    payloads = [region_payload(n) for n, _ in region_nodes(ep)]
    assert [(p.module, p.name) for p in payloads] == [("fc", "fc"), ("fc", "fc_1"), ("head", "head")]
    for p in payloads:
        d = p.to_dict()
        assert (d["format"], d["format_minor"]) == REGION_FORMAT
        assert RegionPayload.from_dict(json.loads(json.dumps(d))) == p
    assert payloads[0].scheme == scheme_for(SCHEME) and payloads[0].roles[0] == "input"


def test_format_1_0_payloads_still_read():
    scheme = scheme_for("nf4")
    old = {"format": 1, "scheme": scheme.to_dict(), "op": "linear", "op_params": {}, "module": "a.b",
           "roles": ["input", "weight"], "weight_shape": [4, 8]}
    p = RegionPayload.from_dict(old)
    assert (p.scheme, p.module, p.roles, p.weight_shape, p.name) == (scheme, "a.b", ("input", "weight"), (4, 8), None)


def test_a_newer_minor_is_read_and_a_newer_major_refused():
    d = RegionPayload(scheme=scheme_for("nf4"), op="linear", module="m", roles=("input",), name="m").to_dict()
    newer_minor = {**d, "format_minor": REGION_FORMAT[1] + 1, "added_later": [1, 2]}
    assert RegionPayload.from_dict(newer_minor).name == "m"
    with pytest.raises(UnsupportedVersionError, match=rf"node x uses region format {REGION_FORMAT[0] + 1}\.0; this qexport reads format {REGION_FORMAT[0]}\.x: upgrade qexport"):
        RegionPayload.from_dict({**d, "format": REGION_FORMAT[0] + 1, "format_minor": 0}, "node x")


@pytest.mark.parametrize("bad", [None, [], {"scheme": {}}, {"format": "1", "scheme": {}}])
def test_malformed_payloads_are_refused(bad):
    with pytest.raises(RegionFormatError, match="node y: malformed qexport payload"):
        RegionPayload.from_dict(bad, "node y")


def test_a_weight_shape_that_is_not_ints_is_refused():
    d = RegionPayload(scheme=scheme_for("nf4"), roles=("input",)).to_dict()
    with pytest.raises(RegionFormatError, match="malformed qexport payload"):
        RegionPayload.from_dict({**d, "weight_shape": ["x"]})


def _format_1_0(ep):
    """`ep` as qexport wrote it before region names were recorded (payload format 1.0)."""
    old = copy_program(ep)
    for node, _ in region_nodes(old):
        opts = dict(node.kwargs["quant_options"])
        d = dict(opts["qexport"])
        del d["name"], d["format_minor"]
        node.kwargs = {**node.kwargs, "quant_options": {**opts, "qexport": d}}
    return old


def test_programs_without_recorded_names_get_the_same_names(twice, tmp_path):
    """A .pt2 of format 1.0 (written before names were recorded) reads with the same names."""
    _, ep, _ = twice
    old = _format_1_0(ep)
    assert [region_payload(n).name for n, _ in region_nodes(old)] == [None] * 3
    assert [r.name for r in qexport.regions(old)] == ["fc", "fc_1", "head"]
    qexport.save(old, tmp_path / "old.pt2")
    assert [r.name for r in qexport.regions(qexport.load(tmp_path / "old.pt2"))] == ["fc", "fc_1", "head"]


def test_suffixes_skip_names_a_module_already_has(twice):
    """A module whose path is already `fc_1` keeps it; the second call of `fc` takes the next free name."""
    _, ep, _ = twice
    ep = copy_program(ep)
    nodes = [n for n, _ in region_nodes(ep)]
    for node, name in zip(nodes, ["fc", "fc", "fc_1"]):
        set_region_payload(node, region_payload(node).replace(module=name, name=None))
    assert [r.name for r in qexport.regions(ep)] == ["fc", "fc_1", "fc_1_1"]


# -- a shared module through every backend ----------------------------------------------------------

def test_shared_module_through_aoti(twice, tmp_path):
    model, ep, expected = twice
    path = qexport.compile(ep, tmp_path / "twice.pt2", device="cpu")
    manifest = qexport.inspect(path)
    assert [(r.name, r.module_path) for r in manifest.regions] == [("fc", "fc"), ("fc_1", "fc"), ("head", "head")]
    assert all(r.lowering.taken and r.lowering.kernel != "inductor" for r in manifest.regions)
    got = torch._inductor.aoti_load_package(str(path))(X)
    got = got[0] if isinstance(got, (list, tuple)) else got
    assert _rel(got, expected) <= math_for(scheme_for(SCHEME)).tolerance


def test_shared_module_through_onnx_functions(twice, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    _, ep, expected = twice
    path = tmp_path / "twice.onnx"
    report = qexport.to_onnx(ep, path, keep_regions=True)
    assert [r.name for r in report.regions] == ["fc", "fc_1", "head"]
    fns = [f for f in onnx.load(str(path)).functions if f.domain == "qexport.region"]
    records = {f.name: json.loads({p.key: p.value for p in f.metadata_props}["qexport.region"]) for f in fns}
    assert {n: (r["name"], r["module_path"]) for n, r in records.items()} == {
        "fc": ("fc", "fc"), "fc_1": ("fc_1", "fc"), "head": ("head", "head")}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})
    assert _rel(got, expected) <= math_for(scheme_for(SCHEME)).tolerance
    # per region, the kept functions line up with the program's regions (keyed by name)
    res = runners.verify(ep, [path])[0]
    assert res.passed and sorted(e.module_path for e in res.regions) == ["fc", "fc_1", "head"]
    # the exporter's translation sees only a node's arguments: names come from the payload, which
    # to_onnx records on a copy when the program lacks them
    old = _format_1_0(ep)
    qexport.to_onnx(old, tmp_path / "old.onnx", keep_regions=True)
    assert sorted(f.name for f in onnx.load(str(tmp_path / "old.onnx")).functions) == ["fc", "fc_1", "head"]
    assert [region_payload(n).name for n, _ in region_nodes(old)] == [None] * 3


def test_shared_module_through_executorch(twice, tmp_path):
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    _, ep, expected = twice
    path = tmp_path / "twice.pte"
    report = qexport.to_executorch(ep, path)
    assert [(r.name, r.delegated) for r in report.regions] == [("fc", True), ("fc_1", True), ("head", True)]
    got = Runtime.get().load_program(str(path)).load_method("forward").execute([X])[0]
    assert _rel(got, expected) <= math_for(scheme_for(SCHEME)).tolerance
