"""ONNX targets: int8 regions are exact under onnxruntime's default session on every CPU class.

onnxruntime's x86 u8 x s8 kernels saturate 16-bit pair sums on CPUs without VNNI; the default target
("portable") stores int8 weights as uint8 + 128 so its u8 x u8 kernels run instead, unless every code
of the region is within +-64 (7-bit weights: reduce_range=True), where signed weights cannot saturate
and keep the faster u8 x s8 kernels on every target. The AVX2 case is
checked for real by running onnxruntime under `qemu-x86_64 -cpu Haswell` (an AVX2 CPU without
AVX-512/VNNI, whose cpuid onnxruntime dispatches on), whatever CPU runs the suite.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

import qexport
from qexport.errors import IncompatibleCPUError, LoweringError
from qexport.lower import cpu_target
from qexport.lower.onnx import host_target
from qexport.schemes import math_for

from conftest import MLP, ConvNet, TinyTransformer, quantized, scheme_for

INT8_ACT = ("int8_static", "int8_dynamic", "int8_dynamic_per_tensor")
#: int8 weights with float activations: onnxruntime's MatMulNBits (8-bit) requantizes the activations
#: per block at its default accuracy level, so MLAS's integer kernels run these too; the same file for every target
WEIGHT_ONLY = ("int8_weight_only",)


class Conv1dNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(2))


class OddNet(torch.nn.Module):
    """Shapes the other models keep regular: dilated, grouped (bias-free) and depthwise convs, then
    bias-free and biased linears on 3-D activations with K and N that are not multiples of 8."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 12, 3, padding=2, dilation=2)
        self.conv2 = torch.nn.Conv2d(12, 18, 3, padding=1, groups=3, bias=False)
        self.conv3 = torch.nn.Conv2d(18, 18, 3, padding=1, groups=18)
        self.fc1 = torch.nn.Linear(18, 37, bias=False)
        self.fc2 = torch.nn.Linear(37, 19)

    def forward(self, x):
        y = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.fc2(torch.relu(self.fc1(y.flatten(2).transpose(1, 2))))


MODELS = {"mlp": (lambda: MLP((256, 512, 64)), lambda: torch.randn(16, 256) * 3),
          "conv": (ConvNet, lambda: torch.randn(2, 3, 16, 16) * 3),
          "conv1d": (Conv1dNet, lambda: torch.randn(2, 8, 32) * 3),
          "transformer": (TinyTransformer, lambda: torch.randint(0, 128, (2, 16))),
          "odd": (OddNet, lambda: torch.randn(1, 3, 10, 10) * 3)}


#: 7-bit weights (reduce_range=True): signed in every target's file, so portable only
SEVEN_BIT = {"mlp": ("int8_dynamic_7bit", "int8_dynamic_per_tensor_7bit", "int8_static_7bit"), "conv": ("int8_static_7bit",)}
#: model -> the schemes its files are written with; conv regions quantize activations per tensor under
#: int8_dynamic already, so the per-tensor variant only adds linear models
SCHEMES_FOR = {m: tuple(s for s in INT8_ACT + WEIGHT_ONLY if not (s == "int8_dynamic_per_tensor" and m.startswith("conv")))
               + SEVEN_BIT.get(m, ()) for m in MODELS}


def _scheme(name: str):
    """int8_dynamic_per_tensor: int8_dynamic with per-tensor activations (DynamicQuantizeMatMul's form);
    a `_7bit` suffix: the same with reduce_range=True."""
    if name.endswith("_7bit"):
        return qexport.schemes.get(_scheme(name.removesuffix("_7bit")), reduce_range=True)
    if name == "int8_dynamic_per_tensor":
        return scheme_for("int8_dynamic").replace(act_granularity="per_tensor")
    return scheme_for(name)


def _weights(path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(model, scheme, target) -> (path, input, eager quantized output), one export per model and scheme."""
    d = tmp_path_factory.mktemp("targets")
    out = {}
    for mname, (make, example) in MODELS.items():
        for scheme in SCHEMES_FOR[mname]:
            torch.manual_seed(0)
            x = example()
            m = quantized(make(), _scheme(scheme), x)
            ep = qexport.export(m, (x,))
            ref = m(x).detach().numpy()
            for target in ("portable", "x86_vnni") if scheme in INT8_ACT else ("portable",):
                path = d / f"{mname}_{scheme}_{target}.onnx"
                qexport.to_onnx(ep, path, target=target)
                out[mname, scheme, target] = (path, x.numpy(), ref)
    return out


@pytest.mark.parametrize("scheme", INT8_ACT)
def test_portable_stores_int8_weights_as_uint8_plus_128(files, scheme):
    portable = _weights(files["mlp", scheme, "portable"][0])
    signed = _weights(files["mlp", scheme, "x86_vnni"][0])
    u8, s8 = onnx.numpy_helper.to_array(portable["layers.0.weight"]), onnx.numpy_helper.to_array(signed["layers.0.weight"])
    assert u8.dtype == np.uint8 and s8.dtype == np.int8
    np.testing.assert_array_equal(u8.astype(np.int16) - 128, s8)  # same codes, same grid
    zp = onnx.numpy_helper.to_array(portable["layers.0.weight_zero_point"])
    assert zp.dtype == np.uint8 and (zp == 128).all()
    if scheme.startswith("int8_dynamic"):  # MatMulInteger takes B's zero point; signed weights need none
        assert "layers.0.weight_zero_point" not in signed
    for model, name in (("conv", "conv1.weight"), ("conv1d", "conv.weight")):  # every conv op, not only 2-D
        if scheme in SCHEMES_FOR[model]:
            assert _weights(files[model, scheme, "portable"][0])[name].data_type == onnx.TensorProto.UINT8, (model, name)


@pytest.mark.parametrize("model, scheme", [(m, s) for m, names in SEVEN_BIT.items() for s in names])
def test_portable_keeps_7bit_weights_signed_and_records_why(files, model, scheme):
    path = files[model, scheme, "portable"][0]
    name = {"mlp": "layers.0", "conv": "conv1"}[model]
    codes = onnx.numpy_helper.to_array(_weights(path)[f"{name}.weight"])
    assert codes.dtype == np.int8 and np.abs(codes).max() == 64  # u8 x s8 kernels, and they cannot saturate
    region = qexport.inspect(path).region(name)
    assert (region.scheme.qmin, region.scheme.qmax) == (-64, 64)  # reduce_range=True, as the scheme's fields
    assert region.lowering.details == {"target": "portable", "weight_codes_max_abs": 64, "int8_weights_stored_as": "int8"}
    assert "kept signed" in region.lowering.kernel and "cannot saturate" in region.lowering.reason


def test_planner_reads_the_codes_not_the_scheme(tmp_path):
    """Signed exactly when every code of the region is within +-64: a scheme's range is only what its
    quantizer promises, the codes are what the kernel multiplies."""
    from qexport.lower import plan_regions
    from serializers.onnx import region_functions

    torch.manual_seed(0)
    x = torch.randn(4, 64)

    def program(**params):
        return qexport.export(quantized(MLP(), qexport.schemes.get("int8_dynamic", **params), x), (x,))

    def stored(ep, target="portable"):
        return {p.region.name: p.details["int8_weights_stored_as"] for p in plan_regions(ep, "onnx", {"target": target})}

    assert set(stored(program(reduce_range=True)).values()) == {"int8"}
    assert set(stored(program(qmin=-65, qmax=65)).values()) == {"uint8+128"}  # codes reach 65
    eight_bit = program()
    assert set(stored(eight_bit).values()) == {"uint8+128"}
    assert set(stored(eight_bit, "x86_vnni").values()) == {"int8"}  # the target's kernels are exact anyway
    for t in eight_bit.state_dict.values():  # 8-bit codes that happen to fit
        if t.dtype == torch.int8:
            t.copy_(t // 2)
    assert set(stored(eight_bit).values()) == {"int8"}
    edited = program(reduce_range=True)
    edited.state_dict["layers.0.weight"][0, 0] = -65  # a 7-bit scheme whose codes do not keep to it
    assert stored(edited) == {"layers.0": "uint8+128", "layers.1": "int8"}
    qexport.to_onnx(edited, tmp_path / "e.onnx", keep_regions=True)  # the region functions carry the same record
    records = {rec["name"]: (scheme, rec["lowering"]["details"]) for scheme, rec in region_functions(tmp_path / "e.onnx").values()}
    assert {n: (s.qmin, d["int8_weights_stored_as"], d["weight_codes_max_abs"]) for n, (s, d) in records.items()} == {
        "layers.0": (-64, "uint8+128", 65), "layers.1": (-64, "int8", 64)}


def test_cli_reduce_range_reaches_the_onnx_file(tmp_path, capsys):
    """`--scheme-arg reduce_range=true`, end to end: the program's scheme, the ONNX weights and numerics."""
    import onnxruntime as ort
    from qexport.cli import main

    pt2, path = tmp_path / "t.pt2", tmp_path / "t.onnx"
    assert main(["export", "qexport.models:TinyNet", "--scheme", "int8_dynamic", "--scheme-arg", "reduce_range=true",
                 "--scheme-arg", "act_granularity=per_tensor", "--input", "2x256", "-o", str(pt2)]) == 0
    assert "codes -64..64" in capsys.readouterr().out
    assert main(["partition", str(pt2), "--target", "onnx", "-o", str(path)]) == 0
    assert all(r.scheme.qmax == 64 and r.lowering.details["int8_weights_stored_as"] == "int8" for r in qexport.inspect(path).regions)
    x = torch.randn(2, 256)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = qexport.load(pt2).module()(x).detach().numpy()
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


def test_manifest_and_report_record_the_target(files, tmp_path):
    for target in ("portable", "x86_vnni"):
        manifest = qexport.inspect(files["mlp", "int8_static", target][0])
        assert manifest.extra["target"] == target
        kernel = manifest.region("layers.0").lowering.kernel
        assert ("uint8 (+128" in kernel) is (target == "portable")
    torch.manual_seed(0)
    x = torch.randn(2, 64)
    ep = qexport.export(quantized(MLP(), scheme_for("int8_dynamic"), x), (x,))
    report = qexport.to_onnx(ep, tmp_path / "h.onnx", target="host")
    assert report.extra["target"] == host_target() == qexport.inspect(tmp_path / "h.onnx").extra["target"]


@pytest.mark.parametrize("key", [(m, s) for m in MODELS for s in SCHEMES_FOR[m]], ids=lambda k: f"{k[0]}-{k[1]}")
def test_portable_is_exact_here_under_default_session_options(files, key):
    import onnxruntime as ort

    path, x, ref = files[(*key, "portable")]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.abs(y - ref).max() / np.abs(ref).max() <= math_for(_scheme(key[1])).tolerance


def test_runner_refuses_a_file_written_for_other_cpus(files, monkeypatch):
    from qexport import runners

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_target, "has_int8_dot", lambda: False)
    with pytest.raises(IncompatibleCPUError, match=r"target 'x86_vnni'.*without VNNI.*target='portable'"):
        runners.load(files["mlp", "int8_static", "x86_vnni"][0])
    assert runners.load(files["mlp", "int8_static", "portable"][0]).kind == "onnx"
    monkeypatch.setattr(cpu_target, "has_int8_dot", lambda: True)
    assert runners.load(files["mlp", "int8_static", "x86_vnni"][0]).kind == "onnx"


@pytest.mark.parametrize("target", ["avx2", "", None, 3])
def test_unknown_target_refused_before_work(tmp_path, target):
    ep = qexport.export(quantized(MLP(), scheme_for("int8_dynamic"), torch.randn(2, 64)), (torch.randn(2, 64),))
    with pytest.raises(LoweringError, match="not an ONNX target: choose one of"):
        qexport.to_onnx(ep, tmp_path / "t.onnx", target=target)
    assert list(tmp_path.iterdir()) == []


_QEMU = shutil.which("qemu-x86_64")
_PROBE = textwrap.dedent("""
    import json, sys, numpy as np, onnxruntime as ort
    out = {}
    for key, path, x, ref in json.load(open(sys.argv[1])):
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        y = s.run(None, {s.get_inputs()[0].name: np.load(x)})[0]
        r = np.load(ref)
        out[key] = float(np.abs(y - r).max() / np.abs(r).max())
    print(json.dumps(out))
""")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="emulates an x86-64 AVX2 CPU: needs an x86-64 host")
@pytest.mark.skipif(_QEMU is None, reason="needs qemu-x86_64 (Debian's qemu-user; scripts/setup.sh installs it)")
def test_avx2_cpu_without_vnni_portable_exact_signed_saturates(files, tmp_path):
    """Under an emulated Haswell (AVX2, no AVX-512, no VNNI) onnxruntime computes every portable file
    within tolerance (int8_dynamic through MatMulIntegerToFloat, int8_weight_only through 8-bit
    MatMulNBits with int8 compute; 7-bit weights through the signed u8 x s8 kernels, as exactly as on
    the host), while the same regions with 8-bit signed weights saturate: the emulation reproduces the
    bug, so the first half is a real check."""
    jobs = []
    for (mname, scheme, target), (path, x, ref) in files.items():
        np.save(tmp_path / f"{mname}_{scheme}_x.npy", x)
        np.save(tmp_path / f"{mname}_{scheme}_ref.npy", ref)
        jobs.append([f"{mname}/{scheme}/{target}", str(path), str(tmp_path / f"{mname}_{scheme}_x.npy"),
                     str(tmp_path / f"{mname}_{scheme}_ref.npy")])
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "probe.py").write_text(_PROBE)
    cap = subprocess.run([_QEMU, "-cpu", "Haswell", sys.executable, "-c",
                          "import torch; print(torch.backends.cpu.get_cpu_capability())"], capture_output=True, text=True)
    assert cap.stdout.strip() == "AVX2", cap.stderr[-2000:]
    run = subprocess.run([_QEMU, "-cpu", "Haswell", sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "jobs.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    for key, err in errors.items():
        mname, scheme, target = key.split("/")
        if target == "portable":
            assert err <= math_for(_scheme(scheme)).tolerance, (key, err)
        if scheme.startswith("int8_dynamic") and scheme.endswith("_7bit"):  # u8 x s8, and exact: float rounding only
            assert err <= 1e-5, (key, err)
    saturated = [k for k, err in errors.items() if k.endswith("x86_vnni") and err > math_for(scheme_for("int8_static")).tolerance]
    assert len(saturated) >= 3, errors
