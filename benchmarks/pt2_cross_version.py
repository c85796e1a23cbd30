"""`.pt2` files saved under one torch, loaded under another (issues 15 and 16: torch 2.11 through the newest).

    python benchmarks/pt2_cross_version.py --save DIR     # here: three quantized MLPs + their inputs/outputs
    python benchmarks/pt2_cross_version.py --check DIR    # there: qexport.load + run, compile + run on the CPU
                                                           # (and on CUDA where a GPU is); writes DIR/check-<torch>.json

Run on 2026-11-29: saved by torch 2.13.0+cpu, checked on the lent H200's torch 2.11.0+cu130
(benchmarks/results/pt2_torch211_h200.json).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qexport  # noqa: E402

SCHEMES = {
    "int8_dynamic": ("int8_dynamic", {}),
    "int4": ("int4_weight_only", {"group_size": 32}),
    "int8wo": ("int8_weight_only", {}),
}


def save(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    for name, (scheme, params) in SCHEMES.items():
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
        qexport.quantize(model, qexport.schemes.get(scheme, **params))
        x = torch.randn(3, 64)
        ep = qexport.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        qexport.save(ep, os.path.join(folder, f"{name}.pt2"))
        torch.save({"x": x, "y": model(x).detach(), "torch": str(torch.__version__)}, os.path.join(folder, f"{name}.io"))


def check(folder: str) -> dict:
    res: dict = {"torch": torch.__version__}
    for path in sorted(glob.glob(os.path.join(folder, "*.pt2"))):
        name = os.path.basename(path)[:-4]
        if not os.path.exists(os.path.join(folder, f"{name}.io")):  # a package an earlier --check compiled
            continue
        io = torch.load(os.path.join(folder, f"{name}.io"))
        ref = io["y"]
        try:
            y = qexport.load(path).module()(io["x"])
            row = {"saved by": io["torch"], "load + run, CPU: rel err": float((y - ref).abs().max() / ref.abs().max())}
            # an AOTI package for the CPU everywhere, and for the GPU where there is one
            for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
                pkg = qexport.compile(path, os.path.join(folder, f"{name}_{device}_{torch.__version__}.pt2"), device=device)
                yc = qexport.load_compiled(pkg)(io["x"].to(device))
                yc = yc[0] if isinstance(yc, (list, tuple)) else yc
                row[f"{device.upper()} package: rel err"] = float((yc.float().cpu() - ref).abs().max() / ref.abs().max())
        except Exception as e:  # a version gap is the finding here, reported per file
            row = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        res[name] = row
        print(name, row, flush=True)
    with open(os.path.join(folder, f"check-{torch.__version__}.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="DIR")
    mode.add_argument("--check", metavar="DIR")
    args = ap.parse_args()
    save(args.save) if args.save else check(args.check)


if __name__ == "__main__":
    main()
