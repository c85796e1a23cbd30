"""Real data through ExecuTorch: a CNN trained on scikit-learn's handwritten digits, quantized
int8_static (calibrated on training images), lowered to an XNNPACK .pte and evaluated by ExecuTorch's
runtime on the held-out test set. The int8 .pte's accuracy stays within 1 point of fp32.

    .venv/bin/python examples/digits_cnn.py [--out DIR] [--epochs 15]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import _digits  # noqa: E402
import qexport  # noqa: E402


@dataclass
class Result:
    fp32_accuracy: float
    int8_eager_accuracy: float
    pte_accuracy: float
    #: test images whose .pte prediction differs from the eager int8 model's
    pte_vs_eager_disagreements: int
    report: "qexport.lower.report.LoweringReport"
    pte: Path


def pte_predictor(path: Path):
    """Logits for a batch of images, one ExecuTorch call per image (the .pte takes batch 1, as on a phone).
    Through `qexport.runners`, which hands the file to ExecuTorch's runtime after checking it (and keeps
    the runtime's `cpuinfo` log lines off the terminal)."""
    runner = qexport.runners.load(path)
    return lambda x: torch.cat([runner([img.unsqueeze(0)])[0] for img in x])


def run(out_dir: Path, epochs: int = 15) -> Result:
    data = _digits.load()
    model = _digits.train(data, epochs=epochs)
    fp32 = _digits.accuracy(model, data.x_test, data.y_test)

    qexport.quantize(model, "int8_static", calibration_data=data.calibration_batches())
    int8 = _digits.accuracy(model, data.x_test, data.y_test)

    ep = qexport.export(model, (data.x_test[:1],))
    pte = out_dir / "digits_int8_static.pte"
    report = qexport.to_executorch(ep, pte, backend="xnnpack")
    predict = pte_predictor(pte)
    pte_acc = _digits.accuracy(predict, data.x_test, data.y_test)
    with torch.no_grad():
        disagree = int((predict(data.x_test).argmax(-1) != model(data.x_test).argmax(-1)).sum())
    return Result(fp32, int8, pte_acc, disagree, report, pte)


def main(argv: list[str] | None = None) -> Result:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first line stopped mid-sentence
    ap.add_argument("--out", default=None, help="directory for the .pte (default: a temporary one)")
    ap.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    args = ap.parse_args(argv)
    if args.epochs < 1:  # 0 evaluated an untrained model (9 % accuracy) as if the example had worked
        ap.error(f"--epochs must be >= 1, got {args.epochs}")
    out = Path(args.out or tempfile.mkdtemp(prefix="digits."))
    out.mkdir(parents=True, exist_ok=True)
    r = run(out, args.epochs)
    print(r.report.table())
    print(f"test accuracy: fp32 {r.fp32_accuracy:.2f}%  int8_static eager {r.int8_eager_accuracy:.2f}%  "
          f".pte (ExecuTorch, XNNPACK) {r.pte_accuracy:.2f}%  (.pte vs eager int8: {r.pte_vs_eager_disagreements} "
          f"different predictions)")
    print(f"inspect it: qexport inspect {r.pte}")
    return r


if __name__ == "__main__":
    main()
