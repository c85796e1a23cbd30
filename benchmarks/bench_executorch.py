"""ExecuTorch + XNNPACK: qexport's region flow vs the PT2E flow (XNNPACKQuantizer -> convert_pt2e), in ONE run.

Models: the MLP 1024-2048-2048-256 of issue 5 (ReLU between layers) and a small ConvNet
(3->32->64 3x3 convs, ReLU, global mean, Linear 64->10) on 1x3x32x32. For int8_static and int8_dynamic,
both flows produce a .pte through to_edge_transform_and_lower(XnnpackPartitioner()) and are timed in
the ExecuTorch runtime (method.execute, median over interleaved rounds so machine noise hits both
alike); fp32 XNNPACK is the reference. Reported: median latency, qexport / PT2E ratio (target <= 1.05),
regions delegated, nodes delegated, .pte bytes, output error of the qexport .pte vs eager.

    .venv/bin/python benchmarks/bench_executorch.py [--batch 1] [--rounds 15] [--iters 200] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qexport  # noqa: E402
from _scratch import scratch_dir  # noqa: E402


def MLP() -> nn.Module:
    """The MLP 1024-2048-2048-256 with ReLU between layers (qexport's built-in TinyNet, resized)."""
    from qexport.models import TinyNet

    return TinyNet((1024, 2048, 2048, 256))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def fresh(cls: type, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def lower_to_pte(ep: torch.export.ExportedProgram, path: str) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    et = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    with open(path, "wb") as f:
        et.write_to_file(f)


def pt2e_pte(cls: type, example: torch.Tensor, calib: list[torch.Tensor], dynamic: bool, path: str) -> None:
    """The upstream flow ExecuTorch documents for XNNPACK int8."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = fresh(cls)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))
    prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
    for x in calib:
        prepared(x)
    converted = convert_pt2e(prepared)
    lower_to_pte(torch.export.export(converted, (example,)), path)


def qexport_pte(cls: type, example: torch.Tensor, calib: list[torch.Tensor], scheme: str, path: str):
    model = fresh(cls)
    kwargs = {"calibration_data": [(x,) for x in calib]} if scheme == "int8_static" else {}
    qexport.quantize(model, scheme, **kwargs)
    report = qexport.to_executorch(qexport.export(model, (example,)), path)
    return model, report


def fp32_pte(cls: type, example: torch.Tensor, path: str) -> None:
    lower_to_pte(torch.export.export(fresh(cls), (example,)), path)


def load(path: str):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(path).load_method("forward")


def time_methods(methods: dict[str, object], x: torch.Tensor, rounds: int, iters: int) -> dict[str, float]:
    """Median µs per call; rounds interleave the variants so drifts in machine load hit all of them."""
    samples: dict[str, list[float]] = {k: [] for k in methods}
    for m in methods.values():
        for _ in range(20):
            m.execute([x])
    for _ in range(rounds):
        for name, m in methods.items():
            t = time.perf_counter()
            for _ in range(iters):
                m.execute([x])
            samples[name].append((time.perf_counter() - t) / iters * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("--models", default="mlp,conv")
    ap.add_argument("--threads", type=int, default=1,
                    help="XNNPACK threadpool size (default 1: on a shared machine more threads mostly add noise)")
    args = ap.parse_args()
    # The runtime's pybindings expose no public knob for the threadpool; this is what its own tests use.
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(args.threads)
    tmp = scratch_dir("bench_et.")
    gen = torch.Generator().manual_seed(0)
    cases = {
        "mlp": (MLP, lambda b: torch.randn(b, 1024, generator=gen)),
        "conv": (ConvNet, lambda b: torch.randn(b, 3, 32, 32, generator=gen)),
    }
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "xnnpack_threads": args.threads, "batch": args.batch, "cases": []}
    for case in args.models.split(","):
        cls, make = cases[case]
        example = make(args.batch)
        calib = [make(args.batch) for _ in range(8)]
        fp32 = f"{tmp}/{case}_fp32.pte"
        fp32_pte(cls, example, fp32)
        for scheme in ("int8_static", "int8_dynamic"):
            ours, theirs = f"{tmp}/{case}_{scheme}_qexport.pte", f"{tmp}/{case}_{scheme}_pt2e.pte"
            t = time.perf_counter()
            model, report = qexport_pte(cls, example, calib, scheme, ours)
            lower_s = time.perf_counter() - t
            pt2e_pte(cls, example, calib, scheme == "int8_dynamic", theirs)
            methods = {"fp32": load(fp32), "pt2e": load(theirs), "qexport": load(ours)}
            x = make(args.batch)
            with torch.no_grad():
                err = float((methods["qexport"].execute([x])[0] - model(x)).abs().max() / model(x).abs().max())
            us = time_methods(methods, x, args.rounds, args.iters)
            row = {
                "model": case, "scheme": scheme, "fp32_us": us["fp32"], "pt2e_us": us["pt2e"], "qexport_us": us["qexport"],
                "ratio_qexport_over_pt2e": us["qexport"] / us["pt2e"],
                "regions_delegated": f"{sum(r.delegated for r in report.regions)}/{len(report.regions)}",
                "nodes_delegated": f"{report.delegated_nodes}/{report.total_nodes}",
                "qexport_pte_bytes": report.bytes, "pt2e_pte_bytes": os.path.getsize(theirs),
                "fp32_pte_bytes": os.path.getsize(fp32), "rel_err_vs_eager": err, "lower_s": lower_s,
            }
            results["cases"].append(row)
            print(
                f"{case:5s} {scheme:13s} fp32 {us['fp32']:8.1f} us  pt2e {us['pt2e']:8.1f} us  qexport {us['qexport']:8.1f} us"
                f"  ratio {row['ratio_qexport_over_pt2e']:.3f}  regions {row['regions_delegated']}  nodes "
                f"{row['nodes_delegated']}  bytes {report.bytes:,} (pt2e {row['pt2e_pte_bytes']:,})  err {err:.4f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
