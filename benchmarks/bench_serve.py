"""Load, batching and fault runs of `qexport serve` on loopback (bounded in count and time).

One process starts the Ray Serve application (qexport.serve.run) on 127.0.0.1 and drives it with an
asyncio HTTP client (aiohttp, which Ray Serve installs). Every answer is checked against the local
runner's output for the same input (`wrong` counts mismatches beyond 1e-4); a request that gets no
answer within the client timeout counts as `lost`.

Runs, on a batch-friendly model (an MLP 1024-4096-4096-1024, int8_dynamic per token, ONNX: a batch of
32 rows costs little more than one row, so batching pays when calls queue up):
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
import json
import os
import platform
import signal
import statistics
import tempfile
import time

import numpy as np
import torch

import qexport
from qexport.models import TinyNet
from qexport.serve import ServeConfig, build_app


def make_artifact(tmp: str) -> str:
    torch.manual_seed(0)
    m = qexport.quantize(TinyNet((1024, 4096, 4096, 1024)).eval(), "int8_dynamic")
    x = torch.randn(2, 1024)
    ep = qexport.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=256)},))
    path = os.path.join(tmp, "mlp.onnx")
    qexport.to_onnx(ep, path)
    return path


async def load(url: str, bodies: list[bytes], refs: list[np.ndarray], clients: int, seconds: float,
               max_requests: int, timeout: float, on_tick=None) -> dict:
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
                    async with session.post(url + "/predict", data=bodies[k], headers={"Content-Type": "application/json"}) as r:
                        body = await r.read()
                        status[r.status] = status.get(r.status, 0) + 1
                        if r.status == 200:
                            lat.append(time.perf_counter() - t)
                            y = np.asarray(json.loads(body)["outputs"][0], np.float32)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs (a smoke test of the script)")
    ap.add_argument("--seconds", type=float, default=10.0, help="per throughput point")
    ap.add_argument("--soak-clients", type=int, default=1000)
    ap.add_argument("--soak-s", type=float, default=60.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.soak_clients, args.soak_s = 3.0, 100, 5.0
    import ray
    from ray import serve

    from qexport import runners

    tmp = tempfile.mkdtemp(prefix="bench_serve.")
    path = make_artifact(tmp)
    local = runners.load(path)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, 1024)).astype(np.float32) for _ in range(32)]
    refs = [local([torch.from_numpy(x)])[0].numpy() for x in xs]
    bodies = [json.dumps({"inputs": [x.tolist()]}).encode() for x in xs]
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2, _node_ip_address="127.0.0.1")
    port = 8431
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    machine = f"{platform.machine()} {os.cpu_count()} cores, torch capability {torch.backends.cpu.get_cpu_capability()}"
    print(f"qexport serve on loopback; {machine}; ray {ray.__version__}; model MLP 1024-4096-4096-1024 int8_dynamic .onnx")
    rows = []

    def deploy(replicas: int, max_batch: int) -> None:
        serve.run(build_app(ServeConfig(path, replicas=replicas, max_batch=max_batch, batch_wait_ms=2.0)), name="qexport", route_prefix="/")
        asyncio.run(load(url, bodies, refs, 4, 1.0, 200, 60))  # warm-up

    for replicas in (1, 2):
        for max_batch in (1, 32):
            deploy(replicas, max_batch)
            for clients in (1, 16, 64):
                r = asyncio.run(load(url, bodies, refs, clients, args.seconds, 10**6, 120))
                r.update(replicas=replicas, max_batch=max_batch, run="throughput")
                rows.append(r)
                print(f"replicas {replicas} max_batch {max_batch:2d} clients {clients:3d}: {r['rps']:7.1f} req/s  "
                      f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  ok {r['ok']} wrong {r['wrong']} lost {r['lost']} {r['status']}", flush=True)

    deploy(2, 32)
    r = asyncio.run(load(url, bodies, refs, args.soak_clients, args.soak_s, 10**7, 300))
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

    r = asyncio.run(load(url, bodies, refs, 64, max(args.seconds, 5.0), 10**6, 120, on_tick=tick))
    r.update(replicas=2, max_batch=32, run="fault", killed_pid=pid, killed_after=killed[0] if killed else None)
    rows.append(r)
    retryable = sum(v for k, v in r["status"].items() if k == 503)
    print(f"fault: replica pid {pid} killed after {killed} requests: ok {r['ok']}, 503 {retryable}, other "
          f"{sum(v for k, v in r['status'].items() if k not in (200, 503))}, wrong {r['wrong']}, lost {r['lost']}", flush=True)

    serve.shutdown()
    ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "ray": ray.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
