"""Hardware counters for one int4 layer's one-row kernels (issue 16/17, session 10), run under Nsight Compute:

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        --section WarpStateStats -k regex:'gemv|tinygemm|gemm|copy|elementwise' python3 benchmarks/cuda_ncu_layer.py --n 32000 --k 3072

Each kernel runs once after a warm-up (ncu flushes the caches before each profiled launch): the package's
CUDA-core GEMV, the tensor-core GEMV of benchmarks/cuda_lab_int4_mma.py, tinygemm, cuBLAS on the bf16
weights and a copy of the int4 bytes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qexport  # noqa: E402
from qexport.lower.kernels import cuda as qk  # noqa: E402
from qexport.schemes import math_for  # noqa: E402
from cuda_lab_int4_mma import int4_mma_gemv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32000)
    ap.add_argument("--k", type=int, default=3072)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--gemv", default="1,8,1024,2,3")
    ap.add_argument("--mma", default="16,128,1,4,4")
    args = ap.parse_args()
    n, k, group = args.n, args.k, args.group
    s = qexport.schemes.get("int4_weight_only", group_size=group)
    torch.manual_seed(0)
    t = {r: v.cuda() for r, v in math_for(s).quantize_weight(s, torch.randn(n, k) * 0.02).items()}
    wb = math_for(s).dequantize_weight(s, t, (n, k)).bfloat16().cuda()
    inner = next(i for i in (8, 4, 2) if k % (16 * i) == 0)
    packed, sz = qk.tinygemm_operands(t["weight"], t["weight_scale"], t["weight_zero_point"], inner)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    src = t["weight"]
    dst = torch.empty_like(src)
    gemv = [int(v) for v in args.gemv.split(",")]
    mma = [int(v) for v in args.mma.split(",")]
    fns = [lambda: qk.triton_gemv(x, t, gemv, group), lambda: int4_mma_gemv(x, t, mma, group),
           lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz), lambda: x @ wb.t(), lambda: dst.copy_(src)]
    for fn in fns:  # compile and warm up
        fn()
    torch.cuda.synchronize()
    for fn in fns:
        fn()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
