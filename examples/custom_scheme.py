"""A user-defined scheme, registered from outside qexport: 6-bit symmetric per-channel weights with
round-half-away-from-zero, through quantize -> export -> save -> load -> compile (AOTInductor).

    .venv/bin/python examples/custom_scheme.py [--out DIR] [--no-compile]

The scheme is plain data (`qexport.Scheme`); its numerics live in one `SchemeMath` subclass. Nothing
in qexport changes: the region function, export, the .pt2 manifest and AOTInductor's fallback
(Inductor fuses the region's dequantize + matmul) all work from the registry. Another process can load
and run the .pt2 without this module (the region's computation is stored in the graph); anything that
needs the family's math (verify's tolerance, lowering) asks for the module that registers it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping

import torch

import qexport
from qexport import runners
from qexport.errors import InvalidSchemeError, QExportError


class Int6Math(qexport.SchemeMath):
    """int6 weights (codes in [-31, 31], stored one per int8), one fp32 scale per output channel."""

    family = "int6"
    weight_roles = ("weight", "weight_scale")
    supported_ops = frozenset({"linear", "conv2d"})
    # half a 6-bit step of the largest weight, relative: (1/31)/2 ~ 1.6 %, plus float rounding
    tolerance = 3e-2

    def validate(self, s: qexport.Scheme) -> None:
        super().validate(s)
        if s.bits != 6 or (s.qmin, s.qmax) != (-31, 31) or not s.symmetric:
            raise InvalidSchemeError(f"{s.name}: int6 is symmetric 6-bit: bits=6, qmin=-31, qmax=31")
        if s.activation != "none":
            raise InvalidSchemeError(f"{s.name}: int6 is weight-only")

    @staticmethod
    def _round_half_away(x: torch.Tensor) -> torch.Tensor:
        # torch.round rounds half to even; this scheme's reference rounds half away from zero
        return torch.sign(x) * torch.floor(x.abs() + 0.5)

    def quantize_weight(self, s: qexport.Scheme, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        w = weight.detach().float().reshape(weight.shape[0], -1)
        scale = (w.abs().amax(1) / s.qmax).clamp(min=torch.finfo(torch.float32).eps)
        q = self._round_half_away(w / scale[:, None]).clamp(s.qmin, s.qmax).to(torch.int8)
        return {"weight": q.reshape(weight.shape), "weight_scale": scale}

    def dequantize_weight(self, s: qexport.Scheme, t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        return t["weight"].float() * t["weight_scale"].reshape(-1, *([1] * (len(shape) - 1)))


INT6 = qexport.Scheme(name="int6_weight_only", family="int6", weight_dtype="int8", bits=6, granularity="per_channel",
                      symmetric=True, qmin=-31, qmax=31, compute_dtype="float32")


def register() -> qexport.Scheme:
    """Register the scheme (idempotent: registering the same scheme again is a no-op)."""
    return qexport.schemes.register(INT6, Int6Math())


def main(argv: list[str] | None = None) -> dict[str, float | bool]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="custom-scheme-artifacts", help="directory for the artifacts")
    ap.add_argument("--no-compile", action="store_true", help="skip the AOTInductor compile (~20 s)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    scheme = register()
    print(f"registered {scheme.describe()}; schemes now: {', '.join(qexport.schemes.names())}")

    from qexport.models import TinyNet

    fp32 = TinyNet().eval()
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    model = qexport.quantize(TinyNet().eval(), "int6_weight_only")
    with torch.no_grad():
        eager, ref32 = model(x), fp32(x)
    ep = qexport.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    print(f"exported: {[(r.module_path, r.scheme.name) for r in qexport.regions(ep)]}")

    pt2 = out / "tinynet_int6.pt2"
    qexport.save(ep, pt2)
    manifest = qexport.inspect(pt2)
    loaded = qexport.load(pt2)
    (r0, *_) = qexport.regions(loaded)
    assert r0.scheme == scheme, "the scheme comes back from the file with every parameter"
    y_loaded = loaded.module()(x)
    results = {
        "quantization_rel_err_vs_fp32": ((eager - ref32).abs().max() / ref32.abs().max()).item(),
        "loaded_rel_err": runners.compare([eager], [y_loaded])[1],
        "pt2_bytes": pt2.stat().st_size,
        "quantized_bytes": sum(r.weight_bytes for r in manifest.regions),
        "float_bytes": sum(r.float_bytes for r in manifest.regions),
    }
    print(f"saved {pt2} ({results['pt2_bytes']:,} bytes; quantized tensors {results['quantized_bytes']:,} B replace "
          f"{results['float_bytes']:,} B of fp32 weights); loaded back, max error vs eager {results['loaded_rel_err']:.1e}")
    if not args.no_compile:
        pkg = out / "tinynet_int6_aoti.pt2"
        qexport.compile(pt2, pkg, device="cpu")
        compiled = qexport.load_compiled(pkg)
        results["compiled_rel_err"] = runners.compare([eager], [compiled(x)])[1]
        print(f"compiled {pkg}: rel error vs eager {results['compiled_rel_err']:.1e} (tolerance {Int6Math.tolerance}); "
              f"inspect lists {len(qexport.inspect(pkg).regions)} int6 regions")
    written = [out / "tinynet_int6_aoti.pt2"] if not args.no_compile else []
    for name, fn, suffix in (("ExecuTorch", lambda p: qexport.to_executorch(pt2, p), ".pte"),
                             ("ONNX", lambda p: qexport.to_onnx(pt2, p), ".onnx")):
        # Backends lower a scheme they have no table entry for as its reference math, or refuse with
        # the reason; either way the user hears which.
        try:
            report = fn(out / f"tinynet_int6{suffix}")
            reasons = {r.reason for r in report.regions if r.reason}
            print(f"{name}: wrote {report.path}" + (f" ({'; '.join(sorted(reasons))})" if reasons else ""))
            written.append(Path(report.path))
        except QExportError as e:
            print(f"{name}: not lowered: {e}")
    from qexport.cli.verify_cmd import verify_table

    checks = runners.verify(pt2, written)
    print(verify_table(checks))
    results.update({f"verify_{c.kind}": c.rel for c in checks if c.rel is not None})
    results["all_verified"] = all(c.passed for c in checks)
    print(f"int6 costs {results['quantization_rel_err_vs_fp32']:.2%} of the output range vs fp32")
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["all_verified"] else 1)
