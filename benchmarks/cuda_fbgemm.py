"""fbgemm-gpu-genai's CUTLASS bf16 x int4 GEMMs vs cuBLAS bf16, one 4096x4096 layer, int4 g128 (issue 16).

On the lent GPU, the wheel carried in .whl/ (fbgemm-gpu-genai 1.6.0 is the release that loads on the
image's torch 2.11; 1.9.0 does not):
    python benchmarks/cuda_fbgemm.py      # $OUT/fbgemm.json (H200: benchmarks/results/cuda_fbgemm_h200.json)
Timing only: codes and scales are random, in fbgemm's own layout (signed codes, low element in the low
nibble, [K / group, N] bf16 scales and zeros; `preshuffle_i4` for the shuffled kernel). `bf16i4bf16_rowwise`'s
error column is meaningless here (its packing differs from this script's); the shuffled one is checked.
"""
import glob, importlib.util, json, os, sys
import torch
sys.path.insert(0, os.getcwd())
out = {"torch": torch.__version__, "card": torch.cuda.get_device_name()}
try:
    root = os.path.dirname(importlib.util.find_spec("fbgemm_gpu").origin)
    torch.ops.load_library(glob.glob(os.path.join(root, "experimental", "gen_ai", "fbgemm_gpu_experimental_gen_ai*.so"))[0])
    fb = torch.ops.fbgemm
    out["loaded"] = True
except Exception as e:
    out["loaded"] = f"{type(e).__name__}: {str(e)[:400]}"
    print(out); json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "fbgemm.json"), "w"), indent=1); sys.exit(0)
from qexport.lower.kernels import cuda_tune
n = k = 4096; G = 128
torch.manual_seed(0)
qs = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
packed = ((qs[:, 1::2] << 4) | (qs[:, ::2] & 0xF)).contiguous()
scale = (torch.rand(k // G, n, device="cuda") * 0.01 + 0.001).bfloat16()
zero = (torch.randn(k // G, n, device="cuda") * 0.01).bfloat16()
wdq = (qs.float().view(n, k // G, G) * scale.t().float()[..., None] + zero.t().float()[..., None]).view(n, k).bfloat16()
res = {}
try:
    wsh, ssh = fb.preshuffle_i4(packed, scale)
except Exception as e:
    wsh = None; out["preshuffle"] = f"{type(e).__name__}: {str(e)[:300]}"
for m in (1, 16, 256, 1024, 4096):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ wdq.float().t()
    row = {"cuBLAS bf16": cuda_tune.bench_us(lambda: x @ wdq.t())}
    for name, fn in (("bf16i4bf16_rowwise", lambda: fb.bf16i4bf16_rowwise(x, packed, scale, zero)),
                     ("bf16i4bf16_shuffled", (lambda: fb.bf16i4bf16_shuffled(x, wsh, ssh, zero)) if wsh is not None else None)):
        if fn is None:
            continue
        try:
            y = fn()
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            row[name] = cuda_tune.bench_us(fn)
            row[name + " err"] = err
        except Exception as e:
            row[name] = f"{type(e).__name__}: {str(e)[:300]}"
    res[m] = row
    print(m, row, flush=True)
out["res"] = res
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "fbgemm.json"), "w"), indent=1)
