"""ExecuTorch lowering time: qexport.to_executorch of an int8_dynamic model vs the plain fp32 flow
(torch.export -> to_edge_transform_and_lower(XnnpackPartitioner()) -> to_executorch) on the same model.

Model: a ViT-tiny-sized transformers ViT (hidden 192, 3 heads, MLP 768, --layers 12) on 1x3x32x32.
Each measurement is a fresh process (no warm caches in either flow); the flows alternate, round after
round, so machine noise hits both alike. Reported: median seconds per flow and their ratio (target
<= 2x). Export time is not counted in either flow.

    .venv/bin/python benchmarks/bench_lowering_time.py [--layers 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

ONE = r"""
import sys, tempfile, time, torch, transformers
sys.path.insert(0, sys.argv[3])
import qexport
from executorch.exir import to_edge_transform_and_lower
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
import executorch.kernels.quantized  # noqa: F401
layers, flow = int(sys.argv[1]), sys.argv[2]
cfg = transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=192, intermediate_size=768,
                             num_hidden_layers=layers, num_attention_heads=3, num_labels=10)
torch.manual_seed(0)
model, x = transformers.ViTForImageClassification(cfg).eval(), torch.randn(1, 3, 32, 32)
if flow == "fp32":
    ep = torch.export.export(model, (x,), strict=False)
    t0 = time.perf_counter()
    to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
else:
    ep = qexport.export(qexport.quantize(model, "int8_dynamic"), (x,))
    t0 = time.perf_counter()
    qexport.to_executorch(ep, tempfile.mktemp(suffix=".pte"), progress=False)
print(time.perf_counter() - t0)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"fp32": [], "qexport": []}
    for r in range(args.rounds):
        for flow in times:
            run = subprocess.run([sys.executable, "-c", ONE, str(args.layers), flow, ROOT], capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{flow} failed:\n{run.stderr[-3000:]}")
            times[flow].append(float(run.stdout.split()[-1]))
            print(f"round {r + 1} {flow}: {times[flow][-1]:.1f} s", file=sys.stderr)
    import torch

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ViT hidden 192, {args.layers} layers, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.rounds} interleaved rounds (fresh process each)")
    print(f"fp32 to_edge_transform_and_lower + XNNPACK + to_executorch: median {med['fp32']:.1f} s {times['fp32']}")
    print(f"qexport.to_executorch (int8_dynamic):                       median {med['qexport']:.1f} s {times['qexport']}")
    print(f"ratio qexport / fp32: {med['qexport'] / med['fp32']:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
