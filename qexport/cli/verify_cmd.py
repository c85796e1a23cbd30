"""`qexport verify REFERENCE.pt2 ARTIFACT...`: run every artifact on the reference program's inputs
and check its outputs against the scheme's documented tolerance."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ._common import PIN_HELP, Progress, fmt_err, parse_pins
from ..table import format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check artifacts against the reference program, within the scheme's tolerance",
        description="Run each ARTIFACT (.pt2, AOTI package, .pte, .onnx) on the same inputs as REFERENCE "
        "(generated from its input shapes; token-id inputs stay within their embedding) and compare "
        "outputs. Passes when max|artifact - reference| / max|reference| is within the loosest tolerance "
        "of the reference's schemes (or, where they round activations, within twice the reference's own "
        "spread: its outputs with float64 GEMMs). Exits 1 if any artifact fails.",
        epilog="example: qexport verify model.pt2 model_aoti.pt2 model.pte model.onnx",
    )
    p.add_argument("reference", metavar="REFERENCE.pt2", help="the exported program (from qexport export)")
    p.add_argument("artifacts", metavar="ARTIFACT", nargs="+", help="artifacts to check")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated inputs")
    p.add_argument("--tolerance", type=float, default=None, metavar="REL",
                   help="relative bound to use instead of the schemes' and the reference's spread (theirs "
                   "bound one region; errors compound over deep models)")
    p.add_argument("--baseline", default=None, metavar="FP32.pt2",
                   help="the unquantized exported program: also report each artifact's error against it")
    p.add_argument("--regions", action="store_true",
                   help="also print region-by-region errors, where the artifact exposes its regions (.pt2, and "
                   ".onnx written with --keep-regions; AOTI and ExecuTorch fuse them away)")
    p.add_argument("--expected-sha256", action="append", default=None, metavar="FILE=SHA256", help=PIN_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime import verify

    if args.tolerance is not None and not args.tolerance > 0:
        raise UsageError(f"--tolerance must be positive, got {args.tolerance}")
    pins = parse_pins(args.expected_sha256, [args.reference, *args.artifacts, *([args.baseline] if args.baseline else [])])
    progress = Progress(total=len(args.artifacts))
    try:
        out = verify(args.reference, args.artifacts, seed=args.seed, tolerance=args.tolerance, baseline=args.baseline,
                     on_artifact=lambda p: progress.advance(f"running {p}"), expected_sha256=pins)
    except BaseException:
        progress.close(ok=False)
        raise
    progress.close()
    print(verify_table(out))
    if args.regions:
        for r in out:
            if r.regions:
                print(f"\n{r.path}: per region")
                print(format_table(["region", "module", "max abs", "rel"],
                                   [[e.name, e.module_path, fmt_err(e.max_abs), fmt_err(e.rel)] for e in r.regions]))
    failed = [r for r in out if not r.passed]
    tol = out[0].tolerance if out else None
    source = "--tolerance" if args.tolerance is not None else "the loosest of the reference's scheme families"
    print(f"{len(out) - len(failed)}/{len(out)} passed (tolerance {tol:g} from {source}, relative to the reference's max-abs output)")
    return 1 if failed else 0


def _note(r) -> str:
    from ..runtime.verify import SPREAD_FACTOR

    if r.within_spread:
        return f"within the reference's own spread ({fmt_err(r.spread)}: its float64-GEMM run)"
    if r.passed:
        return ""
    if r.spread is not None:
        return f"error above tolerance and above {SPREAD_FACTOR:g}x the reference's own spread ({fmt_err(r.spread)})"
    return "error above tolerance"


def verify_table(results) -> str:
    rows = []
    baseline = any(r.rel_vs_baseline is not None for r in results)
    for r in results:
        worst = max((e.rel for e in r.regions), default=None) if r.regions else None
        rows.append([
            str(r.path), r.kind, fmt_err(r.max_abs), fmt_err(r.rel), f"{r.tolerance:g}",
            "pass" if r.passed else "FAIL", fmt_err(worst) if worst is not None else "-",
            *([fmt_err(r.rel_vs_baseline) if r.rel_vs_baseline is not None else "-"] if baseline else []),
            r.error or _note(r),
        ])
    head = ["artifact", "kind", "max abs", "rel", "tolerance", "result", "worst region rel", *(["rel vs fp32"] if baseline else []), "note"]
    return format_table(head, rows)
