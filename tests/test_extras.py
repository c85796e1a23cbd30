"""Core qexport needs torch and numpy only; a backend whose extra is missing says which pip command
installs it (qexport/extras.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

WITHOUT_EXTRAS = textwrap.dedent("""
    import sys
    for name in ("executorch", "onnx", "onnx_ir", "onnxscript", "onnxruntime"):
        sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
    import torch, qexport
    from qexport import BackendUnavailableError, runners
    from qexport.models import TinyNet

    model = qexport.quantize(TinyNet(), "int8_weight_only")
    ep = qexport.export(model, (torch.randn(2, 256),))
    qexport.save(ep, sys.argv[1] + "/m.pt2")
    torch.testing.assert_close(qexport.load(sys.argv[1] + "/m.pt2").module()(torch.ones(2, 256)), model(torch.ones(2, 256)))
    # files of the other kinds (their headers are all the kind table needs to hand them to their readers)
    open(sys.argv[1] + "/x.onnx", "wb").write(b"\x08\x07" + bytes(64))
    open(sys.argv[1] + "/x.pte", "wb").write(bytes(4) + b"ET12" + bytes(64))
    checks = [
        (lambda: qexport.to_onnx, "qexport[onnx]"),
        (lambda: qexport.to_executorch(ep, sys.argv[1] + "/m.pte"), "qexport[executorch]"),
        (lambda: runners.stage("to_onnx"), "qexport[onnx]"),
        # its module imports executorch only when called (planning works without it): checked all the same
        (lambda: runners.stage("to_executorch"), "qexport[executorch]"),
        (lambda: qexport.inspect(sys.argv[1] + "/x.onnx"), "qexport[onnx]"),
        (lambda: qexport.inspect(sys.argv[1] + "/x.pte"), "qexport[executorch]"),
        (lambda: runners.load(sys.argv[1] + "/x.onnx"), "qexport[onnx]"),
    ]
    for call, extra in checks:
        try:
            call()
        except BackendUnavailableError as e:
            assert f"pip install '{extra}'" in str(e), str(e)
        else:
            raise AssertionError(f"no error for {extra}")
    # artifacts that cannot be loaded here: each result names the extra (no input set is needed to say so)
    for r in runners.bench([sys.argv[1] + "/x.onnx", sys.argv[1] + "/x.pte"]):
        assert "pip install 'qexport[" in r.error, r.error
    print("ok")
""")


def test_core_without_extras_and_the_pip_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    assert not (tmp_path / "m.pte").exists()
