"""`qexport compile IN.pt2 -o OUT.pt2 --device cpu|cuda` (one AOTI compile for the module)."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch

import qexport
from qexport.cli import main

from conftest import MLP, quantized, scheme_for


@pytest.fixture(scope="module")
def program_file(tmp_path_factory):
    x = torch.randn(4, 64)
    model = quantized(MLP(), scheme_for("int4_weight_only"), x)
    ep = qexport.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    path = tmp_path_factory.mktemp("cli_compile") / "mlp.pt2"
    qexport.save(ep, path)
    return model, path


@pytest.fixture(scope="module")
def compiled(program_file, tmp_path_factory):
    """Run the command once, capturing what it printed (capsys is function-scoped)."""
    model, src = program_file
    out = src.parent / "mlp_aoti.pt2"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["compile", str(src), "-o", str(out), "--device", "cpu"])
    return model, out, rc, stdout.getvalue(), stderr.getvalue()


def test_compile_writes_a_package_that_matches_eager(compiled):
    model, out, rc, stdout, stderr = compiled
    assert rc == 0, stderr
    runner = qexport.load_compiled(out)
    x = torch.randn(9, 64)
    ref = model(x)
    err = float((runner(x) - ref).abs().max() / ref.abs().max())
    assert err <= qexport.schemes.math_for(scheme_for("int4_weight_only")).tolerance


def test_compile_prints_kernels_and_progress(compiled):
    _, out, rc, stdout, stderr = compiled
    assert rc == 0
    assert sum("aten._weight_int4pack_mm_for_cpu" in ln for ln in stdout.splitlines()) == 2  # one line per region
    assert f"wrote {out}" in stdout
    # steps on stderr, the last one being Inductor's
    assert "[1/3] load" in stderr and "[3/3] AOTInductor compile for cpu" in stderr and "done in" in stderr
    manifest = qexport.inspect(out)
    assert manifest.artifact == "aoti" and len(manifest.regions) == 2


def test_quiet_prints_only_the_path(program_file, tmp_path, capsys, monkeypatch):
    # compile itself is covered above; here only the output contract
    _, src = program_file
    import qexport.lower.aoti as aoti

    monkeypatch.setattr(aoti, "compile", lambda ep, out, **kw: (open(out, "wb").close(), str(out))[1])
    assert main(["compile", str(src), "-o", str(tmp_path / "q.pt2"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "q.pt2") and err == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--option", "max_autotun=true"], "unknown Inductor option"),
        (["--option", "novalue"], "expected KEY=VALUE"),
        # the last value silently won
        (["--option", "max_autotune=true", "--option", "max_autotune=false"], "--option max_autotune is given twice"),
        (["--option", "qexport.kernels=fast"], "is not one of"),
        (["--option", "qexport.large_m=fast"], "qexport.large_m='fast' is not one of ('bf16_weights', 'dequant')"),
        # Inductor's config takes any value and reads it later ("maybe" is truthy): its annotation decides
        (["--option", "max_autotune=maybe"], "max_autotune='maybe': max_autotune takes true/false"),
        (["--option", "compile_threads=two"], "compile_threads='two': compile_threads takes int or none"),
        # the C++ compiler refused it at Inductor's build, after the kernels were chosen, with a page of output
        (["--option", "cpp.march=skylake-avx5l2"], "cpp.march='skylake-avx5l2': the C++ compiler refuses -march=skylake-avx5l2"),
    ],
)
def test_bad_options_fail_before_loading(program_file, tmp_path, capsys, argv, message):
    _, src = program_file
    rc = main(["compile", str(src), "-o", str(tmp_path / "o.pt2"), *argv])
    out, err = capsys.readouterr()
    assert rc == 1 and message in err and "load" not in err.split(":", 1)[0]
    assert os.listdir(tmp_path) == []


def test_missing_input_and_same_output(program_file, tmp_path, capsys):
    _, src = program_file
    assert main(["compile", str(tmp_path / "nope.pt2"), "-o", str(tmp_path / "o.pt2")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["compile", str(src), "-o", str(src)]) == 1
    assert "must differ" in capsys.readouterr().err
    assert main(["compile", str(src), "-o", str(tmp_path / "o.so")]) == 1
    assert "must end with .pt2" in capsys.readouterr().err


def test_inductor_only_option_reaches_compile(program_file, tmp_path, capsys, monkeypatch):
    _, src = program_file
    import qexport.lower.aoti as aoti

    seen = {}

    def fake_compile(ep, out, **kw):
        seen.update(kw)
        open(out, "wb").close()
        return str(out)

    monkeypatch.setattr(aoti, "compile", fake_compile)
    assert main(["compile", str(src), "-o", str(tmp_path / "o.pt2"), "--option", "qexport.kernels=inductor",
                 "--option", "max_autotune=false"]) == 0
    assert seen == {"device": "cpu", "options": {"qexport.kernels": "inductor", "max_autotune": False}}
    assert capsys.readouterr().out.count("inductor") >= 2
