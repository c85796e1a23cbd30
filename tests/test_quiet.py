"""A clean CLI or Python API run prints no dependency noise (qexport/quiet.py), -v or QEXPORT_VERBOSE=1 brings it back; argument checks
come before heavy imports."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings


import qexport
from qexport import quiet

NOISE = ("Failed to load", "is an Enum subclass", "LeafSpec", "torchvision is not installed", "cpuinfo_utils")


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}


def test_filters_drop_only_the_known_messages(caplog, capfd, monkeypatch):
    quiet.install()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: nope")
        logging.getLogger("torchao").warning("something else")
        logging.getLogger("torch.onnx._internal.exporter._registration").warning("torchvision is not installed. Skipping x")
        logging.getLogger("onnxscript.optimizer._constant_folding").warning("Evaluation failed: %s", "cannot reshape array")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        monkeypatch.setattr(quiet, "_quiet", False)  # install again inside this catch_warnings scope
        quiet.install()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("a real FutureWarning", FutureWarning)
        warnings.warn("Detected pickle protocol 4 in the checkpoint, which was not the default ...", UserWarning)
        sources = ("While compiling, we found certain side effects happened in the model.forward. Here are the list of "
                   "potential sources you can double check: [{}]")
        warnings.warn(sources.format(  # what export_lm(strict=True) writes on purpose
            """"L['self']._modules['_export_root'].cache.layers[0]", "L['self']._modules['_export_root'].cache.layers[1]", """
            '"G[\'__import_transformers_dot_utils_dot_output_capturing\']._active_collector"'), UserWarning)
        mine = sources.format('"L[\'self\']._modules[\'_export_root\'].cache.layers[0]", "L[\'self\'].counter"')
        warnings.warn(mine, UserWarning)
    assert [str(w.message) for w in seen] == ["a real FutureWarning", mine]
    with quiet.native_stderr():
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\nreal native error\n")
    assert capfd.readouterr().err.strip() == "real native error"


def test_missing_file_answers_before_torch_is_imported(tmp_path):
    code = ("import sys; from qexport.cli import main; rc = main(['inspect', sys.argv[1]]); "
            "print(rc, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.pt2")], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert run.stdout.split() == ["1", "False"]
    assert "missing.pt2: no such file" in run.stderr


def test_cli_run_is_quiet_and_verbose_is_not(demo_run):
    code, _, out = demo_run
    assert code == 0
    argv = [sys.executable, "-m", "qexport", "verify", str(out / "model.pt2"), str(out / "model.pte"), str(out / "model.onnx")]
    clean = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert not [n for n in NOISE if n in clean.stderr], clean.stderr
    loud = subprocess.run(argv + ["-v"], capture_output=True, text=True, env=_env(), timeout=300)
    assert loud.returncode == 0 and any(n in loud.stderr for n in NOISE)


def test_python_api_opening_a_pte_is_quiet(demo_run, tmp_path):
    """ExecuTorch's runtime prints its cpuinfo lines to fd 2 from C++ whenever a program's XNNPACK delegate
    loads, in the child that probes a .pte and in the caller, and on the first run of a portable-target
    .pte (its threadpool starts then); `inspect` of a portable one logged every quantized operator as
    missing (the probe child had no quantized kernels). `qexport.inspect` and `runners.load` drop them."""
    _, _, out = demo_run
    portable = tmp_path / "portable.pte"
    qexport.to_executorch(out / "model.pt2", portable, backend="portable", progress=False)
    code = ("import sys, torch, qexport\n"
            "for f in sys.argv[1:]:\n"
            "    print(len(qexport.inspect(f).regions))\n"
            "    r = qexport.runners.load(f)\n"
            "    r(qexport.runners.make_inputs(r.inputs))\n")
    argv = [sys.executable, "-c", code, str(portable), str(out / "model.pte")]  # portable first: the
    # XNNPACK one would start the threadpool and register the quantized kernels for it
    clean = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=300)
    assert clean.returncode == 0 and clean.stdout.split() == ["3", "3"], clean.stderr
    assert not [n for n in (*NOISE, "operator_registry", "Missing operator") if n in clean.stderr], clean.stderr
    loud = subprocess.run(argv, capture_output=True, text=True, env={**_env(), "QEXPORT_VERBOSE": "1"}, timeout=300)
    assert loud.returncode == 0 and "cpuinfo_utils" in loud.stderr, loud.stderr


def test_python_api_is_quiet_unless_qexport_verbose():
    """`import qexport` installs the same filters as the CLI (README's Python snippet printed ~25 dependency
    lines); QEXPORT_VERBOSE=1 keeps every line, and other messages of those loggers always get through."""
    code = ("import logging, warnings, qexport\n"
            "logging.getLogger('torchao').warning('Failed to load /x/_C_mxfp8.so')\n"
            "logging.getLogger('torchao').warning('a message of its own')\n"
            "warnings.warn('`isinstance(treespec, LeafSpec)` is deprecated, use ...', FutureWarning)\n")
    clean = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert clean.returncode == 0 and "a message of its own" in clean.stderr
    assert not [n for n in NOISE if n in clean.stderr], clean.stderr
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**_env(), "QEXPORT_VERBOSE": "1"}, timeout=120)
    assert "Failed to load" in loud.stderr and "LeafSpec" in loud.stderr, loud.stderr


def test_uninstall_brings_the_lines_back():
    """What `qexport -v` calls (in a child: pytest's own filter hides every FutureWarning)."""
    code = ("import logging, warnings, qexport\n"
            "from qexport import quiet\n"
            "quiet.uninstall()\n"
            "logging.getLogger('torchao').warning('Failed to load /x/_C_mxfp8.so')\n"
            "warnings.warn('`isinstance(treespec, LeafSpec)` is deprecated, use ...', FutureWarning)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert "Failed to load" in run.stderr and "LeafSpec" in run.stderr, run.stderr
