"""qexport serve: request checks (no Ray), batching, and one real Ray Serve application on loopback."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import qexport
from qexport.serve import NPY, NPZ, BadRequest, ServeConfig, check, decode, encode, run_batched, signature
from qexport.errors import UsageError

from conftest import ConvNet, MLP, quantized, scheme_for

BATCH = torch.export.Dim("batch", max=64)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    x = torch.randn(2, 64)
    m = quantized(MLP(), scheme_for("int8_dynamic"), x)
    ep = qexport.export(m, (x,), dynamic_shapes=({0: BATCH},))
    qexport.to_onnx(ep, d / "mlp.onnx")
    xc = torch.randn(2, 3, 8, 8)
    conv = qexport.export(quantized(ConvNet(), scheme_for("int8_dynamic"), xc), (xc,), dynamic_shapes=({0: BATCH},))
    qexport.save(conv, d / "conv.pt2")
    static = qexport.export(m, (x,))
    qexport.save(static, d / "static.pt2")
    xt, ids = torch.randn(2, 64), torch.randint(0, 100, (2, 5))
    two = qexport.export(quantized(TwoInputs(), scheme_for("int8_dynamic"), (xt, ids)), (xt, ids),
                         dynamic_shapes=({0: BATCH}, {0: BATCH}))
    qexport.save(two, d / "two.pt2")
    return {"dir": d, "model": m, "mlp": d / "mlp.onnx", "conv": d / "conv.pt2", "static": d / "static.pt2",
            "two": d / "two.pt2"}


class TwoInputs(torch.nn.Module):
    """Float features and token ids sharing the batch dim: the ids index a 100-row embedding."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(100, 64), torch.nn.Linear(64, 32)

    def forward(self, x, ids):
        return self.fc(x + self.emb(ids).mean(1)), ids.sum(1)


def _sig(path):
    return signature(qexport.inspect(path))


def test_signature_and_when_batching_is_safe(artifacts):
    sig = _sig(artifacts["mlp"])
    assert [s.name for s in sig.inputs] == ["x"] and sig.inputs[0].shape[1].size == 64
    assert sig.inputs[0].shape[0].dynamic and sig.max_rows == 64 and sig.batching
    conv = _sig(artifacts["conv"])  # per-tensor dynamic activations: a batch would share one scale
    assert not conv.batching and "per tensor" in conv.why_not_batched
    static = _sig(artifacts["static"])
    assert not static.batching and "dynamic dim 0" in static.why_not_batched


def test_decode_accepts_json_list_json_dict_npz_npy(artifacts):
    sig = _sig(artifacts["mlp"])
    x = np.random.randn(3, 64).astype(np.float32)
    for body, kind in ((json.dumps({"inputs": [x.tolist()]}).encode(), "application/json"),
                       (json.dumps({"inputs": {"x": x.tolist()}}).encode(), "application/json; charset=utf-8")):
        (got,) = decode(body, kind, sig)
        np.testing.assert_array_equal(got, x)
    for key in ("x", "arr_0"):
        buf = io.BytesIO()
        np.savez(buf, **{key: x})
        np.testing.assert_array_equal(decode(buf.getvalue(), NPZ, sig)[0], x)
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float64))  # float64 is cast to the model's float32
    assert decode(buf.getvalue(), NPY, sig)[0].dtype == np.float32


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("body, kind, status, message", [
    (b"{bad", "application/json", 400, "not JSON"),
    (b"[1, 2]", "application/json", 400, "expected a JSON object"),
    (json.dumps({"inputs": []}).encode(), "application/json", 400, "got 0 inputs"),
    (json.dumps({"inputs": [[[1.0] * 63]]}).encode(), "application/json", 400, r"shape \[1, 63\] does not fit x: float32\[.*64\]"),
    (json.dumps({"inputs": [[[1.0] * 64] * 65]}).encode(), "application/json", 400, r"shape \[65, 64\]"),
    (json.dumps({"inputs": [[[1.0] * 64, [1.0]]]}).encode(), "application/json", 400, "rectangular|numbers"),
    (json.dumps({"inputs": [[["a"] * 64]]}).encode(), "application/json", 400, "expected numbers"),
    (json.dumps({"inputs": {"y": [[1.0] * 64]}}).encode(), "application/json", 400, "expected \\['x'\\]"),
    (b"\x93NUMPY garbage", NPY, 400, "not a readable .npy"),
    (_npy(np.array([object()], dtype=object)), NPY, 400, "pickled data is never loaded"),
    (b"PK\x03\x04junk", NPZ, 400, "not a readable .npz"),
    (b"x", "text/plain", 415, "not served"),
    (b'{"inputs": [[[1e39' + b", 0" * 63 + b"]]]}", "application/json", 400, r"1e\+39 at \[0, 0\] is outside the range of float32"),
    (b'{"inputs": [[[NaN' + b", 0" * 63 + b"]]]}", "application/json", 400, r"not finite \(nan\) at \[0, 0\]"),
])
def test_bad_requests_are_refused_with_4xx(artifacts, body, kind, status, message):
    with pytest.raises(BadRequest, match=message) as e:
        decode(body, kind, _sig(artifacts["mlp"]))
    assert e.value.status == status


def _zip(**members) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _npy_header(shape, descr="<f4") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (118 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def test_the_manifest_bounds_token_ids_and_requests_outside_them_are_refused(artifacts):
    """Out-of-range ids abort an AOTI package's process (its bounds check throws inside OpenMP) and are
    counted from the end by onnxruntime; ids and features disagreeing on the batch make runtimes read past
    the shorter one; a uint64 cast to int64 wraps. All refused from the signature, before the model."""
    sig = _sig(artifacts["two"])
    assert [s.describe() for s in sig.inputs] == ["x: float32[batch[0..64], 64]", "ids: int64[batch[0..64], 5] in [0, 99]"]
    assert sig.batching
    x, ids = np.ones((2, 64), np.float32), np.arange(10).reshape(2, 5)
    for bad_ids, message in ((ids + 95, r"value 104 at \[1, 4\] is outside \[0, 99\] \(the rows of the table"),
                             (-ids, r"value -9 at \[1, 4\] is outside \[0, 99\]"),
                             (np.full((2, 5), 2 ** 63 + 5, np.uint64), "value 9223372036854775813"),
                             (ids[:1], r"dim 0 \(batch\) is 1 where input x's is 2")):
        with pytest.raises(BadRequest, match=message) as e:
            check([x, bad_ids], sig)
        assert e.value.status == 400
    np.testing.assert_array_equal(check([x, ids + 90], sig)[1], ids + 90)
    x[1, 3] = np.nan
    with pytest.raises(BadRequest, match=r"not finite \(nan\) at \[1, 3\]"):
        check([x, ids], sig)


@pytest.mark.parametrize("body, kind, status, message", [
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 400, "not JSON .RecursionError"),
    (_zip(**{"x.npy": _npy_header((10 ** 11, 64)) + bytes(64), "ids.npy": _npy_header((1, 5), "<i8") + bytes(40)}), NPZ,
     413, r"declares 25600000000000 bytes .*float32\[100000000000, 64\]"),
    (_zip(**{"x.npy": _npy_header((2 ** 20, 64)) + bytes(2 ** 28), "ids.npy": b""}), NPZ, 413, "declares 268435456 bytes"),
    (_zip(**{"x.npy": _npy(np.array([object()] * 64, dtype=object)), "ids.npy": b""}), NPZ, 400, "Python objects"),
    (_zip(**{"x.npy": _npy_header((2, 64)) + bytes(8), "ids.npy": b""}), NPZ, 400, "truncated"),
    (_zip(**{"x": b"", "ids.npy": b""}), NPZ, 400, "not a .npy array"),
    # numpy reads a header whole before refusing its length: 2**32 - 1 declared, inflated from 4 MB
    (_zip(**{"x.npy": b"\x93NUMPY\x02\x00" + (2 ** 32 - 1).to_bytes(4, "little") + b" " * 2 ** 22, "ids.npy": b""}), NPZ,
     400, "declares a .npy header of 4294967295 bytes"),
])
def test_bodies_that_would_blow_up_or_unpickle_are_refused(artifacts, body, kind, status, message):
    """np.load allocates what a header declares and inflates an .npz member whole; both are read here
    from the header first, so a 1 MB zip of 256 MB of zeros never inflates."""
    with pytest.raises(BadRequest, match=message) as e:
        decode(body, kind, _sig(artifacts["two"]), max_bytes=1 << 20)
    assert e.value.status == status


def test_npz_in_any_byte_order_and_layout_decodes_to_the_same_numbers(artifacts):
    x, ids = np.random.randn(3, 64).astype(np.float32), np.arange(15).reshape(3, 5)
    buf = io.BytesIO()
    np.savez(buf, x=np.asfortranarray(x.astype(">f4")), ids=ids.astype(">i8"))
    got = decode(buf.getvalue(), NPZ, _sig(artifacts["two"]))
    np.testing.assert_array_equal(got[0], x)
    np.testing.assert_array_equal(got[1], ids)
    assert got[0].dtype == np.float32 and got[0].flags.c_contiguous and got[1].dtype == np.int64


def test_bfloat16_inputs_reach_the_model_as_bfloat16():
    from qexport.serve import Signature, model_inputs
    from qexport.signature import DimSpec, InputSpec

    sig = Signature((InputSpec("x", "bfloat16", (DimSpec(size=2),)), InputSpec("n", "int64", (DimSpec(size=2),))), batching=False)
    arrays = check([np.array([0.5, 1.5]), np.array([1, 2])], sig)
    assert arrays[0].dtype == np.float32 and [t.dtype for t in model_inputs(arrays, sig)] == [torch.bfloat16, torch.int64]


def test_a_language_model_holding_its_kv_cache_is_not_served():
    from types import SimpleNamespace

    inputs = [{"name": "input_ids", "dtype": "int64", "shape": [1, {"name": "t", "min": 1, "max": 8}]}]
    lm = SimpleNamespace(extra={"inputs": inputs, "generation": {"layout": "static_cache"}}, regions=[])
    with pytest.raises(UsageError, match="KV cache inside the program.*qexport generate"):
        signature(lm)
    stateless = SimpleNamespace(extra={"inputs": inputs, "generation": {"layout": "static_cache_io"}}, regions=[])
    assert signature(stateless).inputs[0].name == "input_ids"


def test_an_input_no_request_can_carry_is_refused_before_serving():
    from types import SimpleNamespace

    fp8 = SimpleNamespace(extra={"inputs": [{"name": "x", "dtype": "float8_e4m3fn", "shape": [2]}]}, regions=[])
    with pytest.raises(UsageError, match="input x is float8_e4m3fn, which no request can carry"):
        signature(fp8)


def test_a_busy_port_or_an_unreachable_head_node_fails_before_ray_starts(artifacts, tmp_path):
    """In a fresh process (Ray not started): a clear UsageError in seconds, and no Ray process left."""
    import subprocess
    import sys

    script = f"""
import socket
from qexport.serve import ServeConfig, run
from qexport.errors import UsageError
busy = socket.socket(); busy.bind(("127.0.0.1", 0)); busy.listen(); port = busy.getsockname()[1]
closed = socket.socket(); closed.bind(("127.0.0.1", 0)); free = closed.getsockname()[1]; closed.close()
for kw in ({{"port": port}}, {{"port": free, "address": f"127.0.0.1:{{free}}"}}):
    try:
        run(ServeConfig({str(artifacts["mlp"])!r}), **kw)
    except UsageError as e:
        print("refused:", e)
import ray; print("ray started:", ray.is_initialized())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = out.stdout.splitlines()
    assert any("cannot listen on 127.0.0.1" in l and "Address already in use" in l for l in lines), out
    assert any("no Ray head node answers at 127.0.0.1:" in l and "ray start --head" in l for l in lines), out
    assert "ray started: False" in lines, out


def test_integer_inputs_take_integers_only():
    from qexport.serve import Signature, check
    from qexport.signature import DimSpec, InputSpec

    sig = Signature((InputSpec("ids", "int64", (DimSpec(name="b", min=1, max=8), DimSpec(size=4))),), batching=True)
    assert check([np.ones((2, 4), np.int32)], sig)[0].dtype == np.int64
    with pytest.raises(BadRequest, match="float64 values where the model takes int64"):
        check([np.ones((2, 4))], sig)


def test_run_batched_equals_one_call_per_request():
    # small integers: every product and sum is exact, whichever BLAS path a row count takes
    rng = np.random.default_rng(0)
    w = rng.integers(-3, 4, (8, 3)).astype(np.float32)
    calls = []

    def call(arrays):
        calls.append(arrays[0].shape[0])
        return [arrays[0] @ w]

    reqs = [[rng.integers(-3, 4, (n, 8)).astype(np.float32)] for n in (1, 3, 2, 5, 1)]
    reqs.append([rng.integers(-3, 4, (2, 9)).astype(np.float32)[:, :8].copy()])  # same shape: one group
    out = run_batched(call, reqs, max_rows=6)
    for r, o in zip(reqs, out):
        np.testing.assert_array_equal(o[0], r[0] @ w)
    assert max(calls) <= 6 and len(calls) < len(reqs)

    def total(arrays):  # an output that does not follow the batch dim: every request runs alone
        return [arrays[0].sum(keepdims=True).reshape(())]

    assert [float(o[0]) for o in run_batched(total, reqs[:3], None)] == pytest.approx([float(r[0].sum()) for r in reqs[:3]], rel=1e-5)


def test_encode_json_and_npz():
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, media = encode([y], "", "application/json")
    assert media == "application/json" and json.loads(body) == {"outputs": [y.tolist()], "shapes": [[2, 3]], "dtypes": ["float32"]}
    body, media = encode([y], NPZ, "application/json")
    with np.load(io.BytesIO(body)) as z:
        np.testing.assert_array_equal(z["arr_0"], y)


@pytest.mark.parametrize("kwargs, message", [
    ({"replicas": 0}, "replicas=0"), ({"max_batch": 0}, "max_batch=0"), ({"batch_wait_ms": -1}, "batch_wait_ms"),
    ({"max_body_bytes": True}, "max_body_bytes"),
])
def test_bad_config_refused(artifacts, kwargs, message):
    with pytest.raises(UsageError, match=message):
        ServeConfig(str(artifacts["mlp"]), **kwargs).check()


def test_an_artifact_a_loader_refuses_fails_before_ray_starts(artifacts, tmp_path, monkeypatch, capsys):
    """build_app read only the manifest: a .pt2 carrying a member that does not belong (with fresh digests)
    started a Ray cluster whose replicas then failed; now the artifact is loaded once first, and every
    replica pins the digest of what was checked."""
    import zipfile

    import qexport.serve as qs
    from qexport.cli import main
    from qexport.errors import UnsafeArtifactError
    from serializers._archive import reseal

    monkeypatch.setattr(qs, "_ray", lambda: pytest.fail("Ray was started"))
    src = artifacts["conv"]
    with zipfile.ZipFile(src) as z:
        members = [(n, z.read(n)) for n in z.namelist()]
    bad = reseal(members + [(members[0][0].split("/")[0] + "/data.pkl", b"\x80\x02N.")], tmp_path / "bad.pt2")
    with pytest.raises(UnsafeArtifactError, match="member 'data.pkl' does not belong"):
        qs.build_app(ServeConfig(str(bad)))
    assert main(["serve", str(bad)]) == 1 and "does not belong" in capsys.readouterr().err
    with pytest.raises(UnsafeArtifactError, match="not the file you pinned"):
        qs.build_app(ServeConfig(str(src), expected_sha256="0" * 64))
    with pytest.raises(UsageError, match="expected_sha256=.xyz. is not a SHA-256"):
        ServeConfig(str(src), expected_sha256="xyz").check()


# -- one real server ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, kind="application/json", accept=""):
    req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": kind, "Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


@pytest.fixture(scope="module")
def server(artifacts):
    pytest.importorskip("ray.serve", reason="needs qexport[serve] (scripts/setup.sh installs it)")
    import ray
    from ray import serve

    from qexport.serve import run

    port = _free_port()
    url = run(ServeConfig(str(artifacts["mlp"]), replicas=2, max_batch=16, batch_wait_ms=5), port=port, blocking=False)
    yield url
    serve.shutdown()
    ray.shutdown()


def _get(url, route):
    with urllib.request.urlopen(url + route, timeout=60) as r:
        return json.loads(r.read())


def test_served_outputs_equal_the_local_runner(server, artifacts):
    from qexport import runners

    local = runners.load(artifacts["mlp"])
    x = np.random.randn(5, 64).astype(np.float32)
    status, media, body = _post(server, json.dumps({"inputs": [x.tolist()]}).encode())
    assert status == 200 and media.startswith("application/json")
    np.testing.assert_allclose(np.array(json.loads(body)["outputs"][0], np.float32), local([torch.from_numpy(x)])[0].numpy(), rtol=1e-6, atol=1e-6)
    buf = io.BytesIO()
    np.savez(buf, x=x)
    status, media, body = _post(server, buf.getvalue(), NPZ)
    with np.load(io.BytesIO(body)) as z:
        np.testing.assert_array_equal(z["arr_0"], local([torch.from_numpy(x)])[0].numpy())
    assert _get(server, "/health") == {"status": "ok"}
    info = _get(server, "/info")
    assert info["artifact"] == "onnx" and info["batching"] and [r["scheme"] for r in info["regions"]] == ["int8_dynamic"] * 2


def test_concurrent_requests_are_batched_and_each_answer_is_its_own(server, artifacts):
    from qexport import runners

    local = runners.load(artifacts["mlp"])
    xs = [np.random.randn(1 + i % 3, 64).astype(np.float32) for i in range(64)]

    def one(x):
        status, _, body = _post(server, json.dumps({"inputs": [x.tolist()]}).encode())
        return status, np.array(json.loads(body)["outputs"][0], np.float32)

    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(one, xs))
    for x, (status, y) in zip(xs, results):
        assert status == 200
        np.testing.assert_allclose(y, local([torch.from_numpy(x)])[0].numpy(), rtol=1e-5, atol=1e-5)
    assert _get(server, "/stats")["largest_batch"] > 1


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server):
    bad = [(b"{bad", "application/json"), (json.dumps({"inputs": [[[1.0] * 3]]}).encode(), "application/json"),
           (b"junk", NPZ), (b"x", "text/plain"), (b"\x00" * 64, NPY)]
    codes = [_post(server, body, kind)[0] for body, kind in bad * 10]
    assert all(400 <= c < 500 for c in codes), codes
    assert _post(server, json.dumps({"inputs": [[[0.5] * 64]]}).encode())[0] == 200


def test_a_killed_replica_loses_no_request(server):
    """Kill one of the two model replicas while requests are in flight: each request is answered (retried
    on the other replica) or gets a 503 a client can retry; none is lost or wrong."""
    x = np.random.randn(2, 64).astype(np.float32)
    body = json.dumps({"inputs": [x.tolist()]}).encode()
    ref = json.loads(_post(server, body)[2])["outputs"]
    pid = _get(server, "/stats")["pid"]

    def one(i):
        if i == 20:
            os.kill(pid, signal.SIGKILL)
        status, _, out = _post(server, body)
        return status, (json.loads(out)["outputs"] if status == 200 else None)

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(80)))
    assert all(s in (200, 503) for s, _ in results), [s for s, _ in results]
    # batched with other requests a row may take another float path through the epilogue: close, not equal
    assert all(np.allclose(out, ref, rtol=1e-5, atol=1e-6) for s, out in results if s == 200)
    assert sum(s == 200 for s, _ in results) >= 60
    deadline = time.time() + 60
    while _post(server, body)[0] != 200 and time.time() < deadline:
        time.sleep(0.5)
    assert _post(server, body)[0] == 200


def test_an_aoti_package_is_served_like_any_artifact(server, demo_run):
    """The demo's AOTI package (AOTI first, per the docs) as a second application on the same cluster."""
    from ray import serve

    from qexport import runners
    from qexport.serve import build_app

    code, _, out = demo_run
    assert code == 0
    path = out / "model_aoti.pt2"
    serve.run(build_app(ServeConfig(str(path), max_batch=8)), name="aoti", route_prefix="/aoti")
    try:
        info = _get(server, "/aoti/info")
        # the demo exports a static batch of one: served unbatched, and /info says why
        assert info["artifact"] == "aoti" and not info["batching"] and "dynamic dim 0" in info["why_not_batched"]
        spec = info["inputs"][0]
        x = np.random.randn(*spec["shape"]).astype(np.float32)
        status, _, body = _post(server + "/aoti", json.dumps({"inputs": [x.tolist()]}).encode())
        assert status == 200
        want = runners.load(path)([torch.from_numpy(x)])[0].numpy()
        np.testing.assert_allclose(np.array(json.loads(body)["outputs"][0], np.float32), want, rtol=1e-5, atol=1e-5)
    finally:
        serve.delete("aoti")



def test_several_inputs_batched_with_mixed_sizes_answer_as_one_call_each(artifacts):
    """What a model replica does with a batch (model_inputs, then run_batched) for float features and
    int64 token ids sharing the batch dim, requests of 1-4 rows decoded from JSON and big-endian
    Fortran-order .npz: each answer equals the local runner's on that request alone."""
    from qexport import runners
    from qexport.serve import model_inputs

    sig, local = _sig(artifacts["two"]), runners.load(artifacts["two"])
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(12):
        x, ids = rng.standard_normal((1 + i % 4, 64)).astype(np.float32), rng.integers(0, 100, (1 + i % 4, 5))
        buf = io.BytesIO()
        np.savez(buf, x=np.asfortranarray(x.astype(">f4")), ids=ids.astype(">i8"))
        body, kind = (buf.getvalue(), NPZ) if i % 2 else (json.dumps({"inputs": {"ids": ids.tolist(), "x": x.tolist()}}).encode(), "application/json")
        reqs.append(decode(body, kind, sig))
    calls = []

    def call(arrays):
        calls.append(len(arrays[0]))
        return [o.numpy() for o in local(model_inputs(arrays, sig))]

    for arrays, got in zip(reqs, run_batched(call, reqs, max_rows=8)):
        want = local([torch.from_numpy(a) for a in arrays])
        np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got[1], want[1].numpy())
    assert calls == [6, 7, 8, 5, 4]  # 30 rows of 1, 2, 3, 4, 1, ... in chunks of at most 8


def test_a_replica_that_cannot_load_the_artifact_is_reported_by_its_own_error():
    """Serve says only "Failed to update the deployments ['Model']"; the replica's error (an artifact
    compiled for another CPU, say) ends the deployment's status message."""
    from types import SimpleNamespace

    from qexport.errors import ArtifactError
    from qexport.serve import _deploy_failure

    model = SimpleNamespace(message="Traceback ...\n  File x\nqexport.errors.IncompatibleCPUError: m.onnx: written for ONNX target 'arm64'\n")
    status = SimpleNamespace(applications={"qexport": SimpleNamespace(deployments={"Ingress": SimpleNamespace(message=""), "Model": model})})
    err = _deploy_failure(SimpleNamespace(status=lambda: status), RuntimeError("Failed to update the deployments ['Model']."))
    assert isinstance(err, ArtifactError) and str(err) == (
        "the model replicas could not start: qexport.errors.IncompatibleCPUError: m.onnx: written for ONNX target 'arm64'")


@pytest.mark.parametrize("own_cluster, expected", [(True, ["serve.shutdown", "ray.shutdown"]),
                                                   (False, ["serve.delete qexport", "ray.shutdown"])])
def test_stopping_leaves_a_joined_cluster_and_its_other_applications_running(own_cluster, expected):
    from types import SimpleNamespace

    from qexport.serve import _stop

    calls = []
    serve = SimpleNamespace(shutdown=lambda: calls.append("serve.shutdown"), delete=lambda name: calls.append(f"serve.delete {name}"))
    _stop(SimpleNamespace(shutdown=lambda: calls.append("ray.shutdown")), serve, connected=True, own_cluster=own_cluster)
    assert calls == expected
