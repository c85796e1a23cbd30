"""Lab on the lent GPU (issue 17, session 9): the greedy pick over one row of logits.

The decode-step profile (docs/llm.md) showed torch's argmax over 32000 bf16 logits at 10.4 µs on the
H200, a tenth of an int4 step: ATen reduces one long row in one block. Candidates, each timed as a
CUDA-graph replay (`cuda_tune.bench_us`) and checked against torch.argmax (first maximum on ties):
torch.argmax; two stages in torch (max over 256-wide chunks, then the chunk); one Triton program.

    python benchmarks/cuda_lab_argmax.py --out DIR     # argmax.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def two_stage(row: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    n = row.numel()
    pad = (-n) % chunk
    if pad:
        row = torch.cat([row, row.new_full((pad,), float("-inf"))])
    vals, idx = row.view(-1, chunk).max(dim=1)
    j = vals.argmax()
    return j * chunk + idx[j]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from qexport.lower.kernels import cuda as C
    from qexport.lower.kernels import cuda_tune

    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for n in (32000, 128256, 151936):
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator(device="cuda").manual_seed(n)
            x = torch.randn(1, n, device="cuda", dtype=dtype, generator=g)
            x[0, n // 3] = x[0, 2 * n // 3] = x.max() + 1  # a tie: the first one must win
            want = int(x.reshape(-1).argmax())
            row = {"n": n, "dtype": str(dtype)}
            for name, fn in (("torch.argmax", lambda: x.reshape(-1).argmax()), ("two stages", lambda: two_stage(x.reshape(-1))),
                             *((f"triton {w} warps {b}", (lambda w=w, b=b: C.greedy_token(x, num_warps=w, block=b)))
                               for w in (4, 8, 16, 32) for b in (1024, 2048, 4096, 8192))):
                try:
                    got = int(fn())
                    row[name] = round(cuda_tune.bench_us(fn), 2) if got == want else f"wrong: {got} != {want}"
                except Exception as e:  # noqa: BLE001 - a lab
                    row[name] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(row), flush=True)
            res["rows"].append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "argmax.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
