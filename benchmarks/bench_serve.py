"""Load, batching and fault runs of `qexport serve` on loopback (bounded in count and time).

One process starts the Ray Serve application (qexport.serve.run) on 127.0.0.1 and drives it with an
asyncio HTTP client (aiohttp, which Ray Serve installs). Every answer is checked against the local
runner's output for the same input (`wrong` counts mismatches beyond 1e-4); a request that gets no
answer within the client timeout counts as `lost`.

Runs, on a batch-friendly model (an MLP 2048-8192-8192-8192-2048, int8_dynamic per token, ONNX for this host's
fastest exact target, 168 MB of int8 weights: one row reads every weight, 32 rows take not much longer,
so batching pays when calls queue up), requests and answers as .npz (`--wire json` for JSON):
- throughput and p50/p99 latency vs concurrency (1, 16, 64) and replicas (1, 2), with batching on
  (--max-batch 32) and off (--max-batch 1);
- soak: `--soak-clients` concurrent clients (default 1,000) for `--soak-s` seconds (default 60);
- fault: 2 replicas at 64 concurrent clients, one replica process killed (SIGKILL) mid-run: every
  request is answered or gets a retryable 503.

    .venv/bin/python benchmarks/bench_serve.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import time

import numpy as np
import torch

import qexport
from qexport.models import TinyNet
from qexport.serve import JSON, NPZ, ServeConfig, build_app
from _scratch import scratch_dir  # noqa: E402

DIMS = (2048, 8192, 8192, 8192, 2048)


def encode_request(x: np.ndarray, wire: str) -> bytes:
    if wire == "json":
        return json.dumps({"inputs": [x.tolist()]}).encode()
    buf = io.BytesIO()
    np.savez(buf, x)
    return buf.getvalue()


def decode_answer(body: bytes, wire: str) -> np.ndarray:
    if wire == "json":
        return np.asarray(json.loads(body)["outputs"][0], np.float32)
    with np.load(io.BytesIO(body), allow_pickle=False) as z:
        return z["arr_0"]


def make_artifact(tmp: str) -> str:
    torch.manual_seed(0)
    m = qexport.quantize(TinyNet(DIMS).eval(), "int8_dynamic")
    x = torch.randn(2, DIMS[0])
    ep = qexport.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=256)},))
    path = os.path.join(tmp, "mlp.onnx")
    qexport.to_onnx(ep, path, target="host")
    return path


async def load(url: str, bodies: list[bytes], refs: list[np.ndarray], clients: int, seconds: float,
               max_requests: int, timeout: float, on_tick=None, wire: str = "npz") -> dict:
    import aiohttp

    lat: list[float] = []
    status: dict[int, int] = {}
    wrong = lost = 0
    sent = 0
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def client(c: int) -> None:
            nonlocal wrong, lost, sent
            i = c
            while time.perf_counter() < stop and sent < max_requests:
                sent += 1
                k = i % len(bodies)
                i += clients
                t = time.perf_counter()
                try:
                    async with session.post(url + "/predict", data=bodies[k],
                                            headers={"Content-Type": JSON if wire == "json" else NPZ}) as r:
                        body = await r.read()
                        status[r.status] = status.get(r.status, 0) + 1
                        if r.status == 200:
                            lat.append(time.perf_counter() - t)
                            y = decode_answer(body, wire)
                            if y.shape != refs[k].shape or not np.allclose(y, refs[k], rtol=1e-4, atol=1e-4):
                                wrong += 1
                except (asyncio.TimeoutError, aiohttp.ClientError):
                    lost += 1
                if on_tick is not None:
                    on_tick(sent)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    ok = status.get(200, 0)
    lat.sort()
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else float("nan"))
    return {"clients": clients, "requests": sent, "ok": ok, "status": status, "wrong": wrong, "lost": lost,
            "rps": ok / wall, "p50_ms": pct(0.50), "p99_ms": pct(0.99), "wall_s": wall}


def _zipped_zeros(shape: tuple[int, ...]) -> bytes:
    """An .npz whose one member inflates to a float32 array of `shape` (zeros compress ~1000x)."""
    import zipfile

    buf, member = io.BytesIO(), io.BytesIO()
    np.save(member, np.zeros(shape, np.float32))
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("arr_0.npy", member.getvalue())
    return buf.getvalue()


async def malformed(url: str, good: bytes, wire: str, n: int = 200) -> dict:
    """`n` bad requests of fourteen kinds, 16 at a time, then one valid request: all 4xx, server still up."""
    import aiohttp

    x = np.zeros((1, DIMS[0]), np.float32)
    pickled = io.BytesIO()
    np.save(pickled, np.array([object()], dtype=object), allow_pickle=True)
    kinds = [
        (b"{bad json", JSON), (b"[1, 2, 3]", JSON), (json.dumps({"inputs": []}).encode(), JSON),
        (json.dumps({"inputs": [[[0.0] * (DIMS[0] - 1)]]}).encode(), JSON),  # wrong width
        (json.dumps({"inputs": [[["a"] * DIMS[0]]]}).encode(), JSON), (encode_request(x[:, :7], "npz"), NPZ),
        (encode_request(np.zeros((300, DIMS[0]), np.float32), "npz"), NPZ),  # over the batch dim's bound
        (b"PK\x03\x04 damaged", NPZ), (b"\x93NUMPY", "application/x-npy"), (b"x", "text/plain"),
        (b'{"inputs": [[[NaN' + b", 0" * (DIMS[0] - 1) + b"]]]}", JSON),  # not finite
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON),  # nested past the parser's depth
        (_zipped_zeros((4096, DIMS[0])), NPZ),  # ~33 KB inflating to 32 MiB
        (pickled.getvalue(), "application/x-npy"),  # a pickle
    ]
    status: dict[int, int] = {}
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one(i: int) -> None:
            body, kind = kinds[i % len(kinds)]
            async with sem, session.post(url + "/predict", data=body, headers={"Content-Type": kind}) as r:
                await r.read()
                status[r.status] = status.get(r.status, 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))
        async with session.post(url + "/predict", data=good, headers={"Content-Type": JSON if wire == "json" else NPZ}) as r:
            after = r.status
    return {"run": "malformed", "requests": n, "status": status, "after": after}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs (a smoke test of the script)")
    ap.add_argument("--seconds", type=float, default=10.0, help="per throughput point")
    ap.add_argument("--soak-clients", type=int, default=1000)
    ap.add_argument("--soak-s", type=float, default=60.0)
    ap.add_argument("--wire", choices=("npz", "json"), default="npz")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.soak_clients, args.soak_s = 3.0, 100, 5.0
    import ray
    from ray import serve

    from qexport import runners

    tmp = scratch_dir("bench_serve.")
    path = make_artifact(tmp)
    local = runners.load(path)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, DIMS[0])).astype(np.float32) for _ in range(32)]
    refs = [local([torch.from_numpy(x)])[0].numpy() for x in xs]
    bodies = [encode_request(x, args.wire) for x in xs]
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2, _node_ip_address="127.0.0.1")
    port = 8431
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch capability {torch.backends.cpu.get_cpu_capability()}"
    print(f"qexport serve on loopback; {machine}; ray {ray.__version__}; model MLP {'-'.join(map(str, DIMS))} "
          f"int8_dynamic .onnx; wire {args.wire}")
    rows = []

    def deploy(replicas: int, max_batch: int) -> None:
        serve.run(build_app(ServeConfig(path, replicas=replicas, max_batch=max_batch, batch_wait_ms=2.0)), name="qexport", route_prefix="/")
        asyncio.run(load(url, bodies, refs, 4, 1.0, 200, 60, wire=args.wire))  # warm-up

    for replicas in (1, 2):
        for max_batch in (1, 32):
            deploy(replicas, max_batch)
            for clients in (1, 16, 64):
                r = asyncio.run(load(url, bodies, refs, clients, args.seconds, 10**6, 120, wire=args.wire))
                r.update(replicas=replicas, max_batch=max_batch, run="throughput")
                rows.append(r)
                print(f"replicas {replicas} max_batch {max_batch:2d} clients {clients:3d}: {r['rps']:7.1f} req/s  "
                      f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  ok {r['ok']} wrong {r['wrong']} lost {r['lost']} {r['status']}", flush=True)

    deploy(2, 32)
    r = asyncio.run(load(url, bodies, refs, args.soak_clients, args.soak_s, 10**7, 300, wire=args.wire))
    r.update(replicas=2, max_batch=32, run="soak")
    rows.append(r)
    print(f"soak: {args.soak_clients} concurrent clients for {args.soak_s:.0f} s: {r['requests']} requests, ok {r['ok']}, "
          f"wrong {r['wrong']}, lost {r['lost']}, {r['status']}, {r['rps']:.1f} req/s, p99 {r['p99_ms']:.0f} ms", flush=True)

    deploy(2, 32)
    import urllib.request

    with urllib.request.urlopen(url + "/stats") as resp:
        pid = json.loads(resp.read())["pid"]
    killed = []

    def tick(sent: int) -> None:
        if not killed and sent >= 200:
            os.kill(pid, signal.SIGKILL)
            killed.append(sent)

    r = asyncio.run(load(url, bodies, refs, 64, max(args.seconds, 5.0), 10**6, 120, on_tick=tick, wire=args.wire))
    r.update(replicas=2, max_batch=32, run="fault", killed_pid=pid, killed_after=killed[0] if killed else None)
    rows.append(r)
    retryable = sum(v for k, v in r["status"].items() if k == 503)
    print(f"fault: replica pid {pid} killed after {killed} requests: ok {r['ok']}, 503 {retryable}, other "
          f"{sum(v for k, v in r['status'].items() if k not in (200, 503))}, wrong {r['wrong']}, lost {r['lost']}", flush=True)

    r = asyncio.run(malformed(url, bodies[0], args.wire))
    rows.append(r)
    print(f"malformed: {r['requests']} bad requests -> {r['status']}; a valid request afterwards: {r['after']}", flush=True)

    serve.shutdown()
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "ray": ray.__version__, "model": DIMS, "wire": args.wire, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
