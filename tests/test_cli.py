"""The `qexport` command line: export / verify / bench / demo, their help, tables, exit codes and
one-line errors (no traceback, no file left behind)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import qexport
from qexport.cli import build_parser, main
from qexport.cli._common import InputSpec, import_target, parse_input_spec, parse_scheme_args
from qexport.runners import stage
from qexport.errors import BackendUnavailableError, UsageError

MINE = ("export", "verify", "bench", "demo")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, command: str, *needles: str) -> str:
    assert code == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"qexport {command}: error: "), err
    for n in needles:
        assert n in last, (n, last)
    return last


# -- parsing helpers ------------------------------------------------------------------------------

def test_parse_input_spec():
    assert parse_input_spec("1x256") == InputSpec((1, 256), torch.float32)
    assert parse_input_spec("4,3,32,32:bf16") == InputSpec((4, 3, 32, 32), torch.bfloat16)
    assert parse_input_spec("1x16:int64:256") == InputSpec((1, 16), torch.int64, 256)
    for bad, msg in (("", "SHAPE"), ("1xa", "not dimensions"), ("0x4", "positive"), ("2x4:float99", "unknown dtype"),
                     ("2x4:float32:9", "integer inputs"), ("2x4:int64:-1", "positive integer"), ("1:2:3:4", "SHAPE"),
                     ("2x4:uint8:257", "past uint8's largest value, 255"), ("2x4:int64:" + "9" * 20, "past int64's")):
        with pytest.raises(UsageError, match=msg):
            parse_input_spec(bad)


def test_make_input_respects_dtype_and_high():
    g = torch.Generator().manual_seed(0)
    x = parse_input_spec("3x50:int64:7").make(g, default_high=1000)
    assert x.dtype == torch.int64 and x.max() < 7
    assert parse_input_spec("2x5:int32").make(g, default_high=3).max() < 3
    assert parse_input_spec("2x5").make(g, batch=4).shape == (4, 5)
    # torch's own refusal of a shape ("Storage size calculation overflowed") is the user's --input, not a crash
    with pytest.raises(UsageError, match=r"--input 99999999999x99999999999:float32: cannot make this example input"):
        parse_input_spec("99999999999x99999999999").make(g)


def test_parse_scheme_args_coerces_to_field_types():
    assert parse_scheme_args("int4_weight_only", ["group_size=64"]) == {"group_size": 64}
    assert parse_scheme_args("int8_dynamic", ["act_symmetric=true", "compute-dtype=bfloat16"]) == {
        "act_symmetric": True, "compute_dtype": "bfloat16"}
    assert parse_scheme_args("int8_weight_only", ["qmax=100", "group_size=none"]) == {"qmax": 100, "group_size": None}
    assert parse_scheme_args("int8_dynamic", ["reduce-range=true"]) == {"reduce_range": True}  # a family's shorthand
    # "none" is None only where a field can be None: activation=none is the text, weight-only int8
    assert parse_scheme_args("int8_dynamic", ["activation=none", "act_dtype=none"]) == {"activation": "none", "act_dtype": None}
    assert qexport.schemes.get("int8_dynamic", **parse_scheme_args("int8_dynamic", ["activation=none"])).is_weight_only
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_scheme_args("int8_weight_only", ["group_size"])
    with pytest.raises(UsageError, match="no parameter 'groupsize'"):
        parse_scheme_args("int4_weight_only", ["groupsize=64"])
    with pytest.raises(UsageError, match="is a boolean"):
        parse_scheme_args("int8_weight_only", ["symmetric=maybe"])
    with pytest.raises(UsageError, match="is an integer"):
        parse_scheme_args("int8_weight_only", ["bits=eight"])
    with pytest.raises(qexport.UnknownSchemeError, match="int9"):
        parse_scheme_args("int9", [])


def test_import_target(tmp_path):
    from qexport.models import TinyNet

    assert import_target("qexport.models:TinyNet") is TinyNet
    f = tmp_path / "mymodel.py"
    f.write_text("import torch\nclass Net(torch.nn.Sequential):\n    def __init__(self):\n        super().__init__(torch.nn.Linear(8, 4))\n")
    assert import_target(f"{f}:Net").__name__ == "Net"
    for bad, msg in (("qexport.models", "expected package.module:callable"), ("nosuch_pkg.mod:X", "no module named 'nosuch_pkg'"),
                     ("qexport.models:Nope", "has no attribute 'Nope'"), (f"{tmp_path}/none.py:X", "does not exist")):
        with pytest.raises(UsageError, match=msg):
            import_target(bad)


def test_stage_names_a_missing_backend(monkeypatch):
    from qexport import runners

    monkeypatch.setitem(runners.STAGES, "to_onnx", ("qexport.lower.not_written_yet", "ONNX backend"))
    with pytest.raises(BackendUnavailableError, match="ONNX backend .* not available"):
        stage("to_onnx")
    assert callable(stage("save"))


# -- help -----------------------------------------------------------------------------------------

def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    listed = parser._subparsers._group_actions[0].choices
    assert set(MINE) <= set(listed)
    for name in listed:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: qexport {name}"), name


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "qexport", "export", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--scheme-arg" in r.stdout


# -- export ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`qexport export` of TinyTransformer (token ids, dynamic batch) with int4 g32."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("cli") / "tt.pt2"
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        code = main(["export", "qexport.models:TinyTransformer", "--scheme", "int4_weight_only", "--scheme-arg",
                     "group_size=32", "--input", "1x16:int64", "--dynamic-batch", "-o", str(out)])
    return code, buf.getvalue(), err.getvalue(), out


def test_export_writes_a_program_and_prints_its_regions(exported):
    code, out, err, path = exported
    assert code == 0, err
    assert path.is_file()
    ep = qexport.load(path)
    regs = qexport.regions(ep)
    assert len(regs) == 10 and {r.scheme.group_size for r in regs} == {32}
    assert "int4_weight_only(g32" in out and "blocks.1.down" in out and f"wrote {path}" in out
    assert "[5/5] saving" in err  # progress
    # the program runs at another batch size and equals the eager quantized model
    model = qexport.quantize(qexport.models.TinyTransformer(), qexport.schemes.get("int4_weight_only", group_size=32))
    x = torch.randint(0, 256, (3, 16))
    torch.testing.assert_close(ep.module()(x), model(x))


def test_export_static_scheme_with_calibration_file(capsys, tmp_path):
    calib = tmp_path / "calib.pt"
    torch.save([torch.randn(4, 256) for _ in range(3)], calib)
    out = tmp_path / "static.pt2"
    code, stdout, err = run_cli(capsys, "export", "qexport.models:TinyNet", "--scheme", "int8_static", "--input", "1x256",
                                "--calibrate", str(calib), "-o", str(out))
    assert code == 0, err
    (r0, *_) = qexport.regions(qexport.load(out))
    assert r0.scheme.name == "int8_static" and "input_scale" in r0.roles
    out2 = tmp_path / "static_random.pt2"
    code, _, err = run_cli(capsys, "export", "qexport.models:TinyNet", "--scheme", "int8_static", "--input", "1x256",
                           "--calibrate", "-o", str(out2))
    assert code == 0 and out2.is_file(), err


def test_export_with_a_recipe(capsys, tmp_path):
    """--recipe KEY=SCHEME: a class name is a type key (the nearest class wins), anything else a glob;
    --scheme takes the rest."""
    out = tmp_path / "tt.pt2"
    code, stdout, err = run_cli(capsys, "export", "qexport.models:TinyTransformer", "--scheme", "int8_dynamic",
                                "--recipe", "Embedding=int8_weight_only", "--recipe", "blocks.0.*=none",
                                "--input", "1x16:int64", "-o", str(out))
    assert code == 0, err
    schemes = {r.module_path: r.scheme.name for r in qexport.regions(qexport.load(out))}
    assert schemes.pop("emb") == "int8_weight_only" and not [m for m in schemes if m.startswith("blocks.0.")]
    assert set(schemes.values()) == {"int8_dynamic"} and len(schemes) == 5
    assert "recipe entry 'blocks.0.*' maps it to None" in stdout


def test_export_with_a_scheme_the_target_module_registers(capsys, tmp_path):
    """A user scheme registered beside the model (the documented way) is known once TARGET's module is
    imported, which happens before the scheme is looked up; the region table names each region once."""
    (tmp_path / "user_models.py").write_text(textwrap.dedent("""
        import torch, qexport
        qexport.schemes.register(qexport.schemes.get("int8_weight_only").replace(name="test_cli_int8_pt", granularity="per_tensor"))

        class Twice(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc, self.out = torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)

            def forward(self, x):
                return self.out(self.fc(self.fc(x)))
    """))
    out = tmp_path / "user.pt2"
    try:
        code, stdout, err = run_cli(capsys, "export", f"{tmp_path}/user_models.py:Twice", "--scheme", "test_cli_int8_pt",
                                    "--recipe", "out=int8_weight_only", "--input", "2x64", "-o", str(out))
        assert code == 0, err
        assert {r.name: r.scheme.name for r in qexport.regions(qexport.load(out))} == {
            "fc": "test_cli_int8_pt", "fc_1": "test_cli_int8_pt", "out": "int8_weight_only"}
        table = stdout[stdout.index("region "):]
        assert [line.split()[0] for line in table.splitlines()[2:5]] == ["fc", "fc_1", "out"]
    finally:
        qexport.schemes.unregister("test_cli_int8_pt")


@pytest.mark.parametrize("argv, needles", [
    (["nosuch_pkg.models:Net", "--scheme", "int8_weight_only", "--input", "1x256"], ["no module named 'nosuch_pkg'"]),
    (["qexport.models:Nope", "--scheme", "int8_weight_only", "--input", "1x256"], ["no attribute 'Nope'", "TinyNet"]),
    (["qexport.models", "--scheme", "int8_weight_only", "--input", "1x256"], ["package.module:callable"]),
    (["qexport.models:TinyNet", "--scheme", "int9", "--input", "1x256"], ["unknown scheme 'int9'"]),
    (["qexport.models:TinyNet", "--scheme", "int8_weight_onyl", "--input", "1x256"], ["Did you mean 'int8_weight_only'"]),
    (["qexport.models:TinyNet", "--scheme", "int8_weight_only", "--input", "1xq"], ["--input '1xq'"]),
    (["qexport.models:TinyNet", "--scheme", "int8_weight_only", "--input", "1x255"], ["fails on the example inputs 1x255"]),
    (["qexport.models:TinyNet", "--scheme", "int4_weight_only", "--scheme-arg", "group_size=48", "--input", "1x256"],
     ["group_size=48"]),
    (["qexport.models:TinyNet", "--scheme", "int8_static", "--input", "1x256"], ["add --calibrate"]),
    (["qexport.models:TinyNet", "--scheme", "int4_weight_only", "--scheme-arg", "algorithm=gptq", "--input", "1x256"],
     ["fits its weights with GPTQ", "add --calibrate"]),
    (["qexport.models:TinyNet", "--scheme", "int8_dynamic", "--scheme-arg", "algorithm=hqq", "--input", "1x256"],
     ["algorithm='hqq' is not available for the int8 family"]),
    (["qexport.models:TinyNet", "--scheme", "int8_weight_only", "--input", "1x256", "--calibrate", "/nonexistent.pt"],
     ["/nonexistent.pt", "no such file"]),
    (["qexport.models:TinyNet", "--scheme", "int8_dynamic", "--recipe", "Linear", "--input", "1x256"], ["--recipe 'Linear'", "KEY=SCHEME"]),
    (["qexport.models:TinyNet", "--scheme", "int8_dynamic", "--recipe", "Linear=int9", "--input", "1x256"], ["unknown scheme 'int9'"]),
    (["qexport.models:TinyNet", "--scheme", "int8_dynamic", "--recipe", "layers.0=int8_static", "--input", "1x256"],
     ["int8_static", "add --calibrate"]),
    (["qexport.models:TinyNet", "--scheme", "int8_dynamic", "--scheme-arg", "qmin=none", "--input", "1x256"],
     ["--scheme-arg qmin=none: qmin is an integer"]),
    (["qexport.models:TinyNet", "--scheme", "int8_weight_only", "--scheme-arg", "granularity=per_group", "--scheme-arg",
      "group_size=1e3", "--input", "1x256"], ["field 'group_size' must be int | None, got '1e3'"]),
    (["qexport.models:TinyNet", "--scheme", "int8_dynamic", "--input", "99999999999x99999999999"],
     ["--input 99999999999x99999999999:float32: cannot make this example input"]),
])
def test_export_user_mistakes_are_one_line_and_leave_no_file(capsys, tmp_path, argv, needles):
    out = tmp_path / "out.pt2"
    code, _, err = run_cli(capsys, "export", *argv, "-o", str(out))
    assert_one_line_error(code, err, "export", *needles)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_bad_output_and_calibration_files(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "qexport.models:TinyNet", "--scheme", "int8_weight_only", "--input", "1x256",
                           "-o", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, "export", "must end with .pt2")
    code, _, err = run_cli(capsys, "export", "qexport.models:TinyNet", "--scheme", "int8_weight_only", "--input", "1x256",
                           "-o", str(tmp_path / "no" / "x.pt2"))
    assert_one_line_error(code, err, "export", "does not exist")
    junk = tmp_path / "calib.pt"
    junk.write_text("not a tensor file")
    code, _, err = run_cli(capsys, "export", "qexport.models:TinyNet", "--scheme", "int8_static", "--input", "1x256",
                           "--calibrate", str(junk), "-o", str(tmp_path / "x.pt2"))
    assert_one_line_error(code, err, "export", "torch.load can read safely")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.pt"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # pytest's own filters replace quiet.install's
def test_export_refuses_a_pickled_calibration_file_quietly(capsys, tmp_path):
    """A plain pickle (not torch.save's zip) that would run code: refused in one line, nothing run (torch's
    "Detected pickle protocol" warning on such a file is in quiet.WARNINGS: tests/test_quiet.py)."""
    import os
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    calib = tmp_path / "calib.pt"
    calib.write_bytes(pickle.dumps([Payload()], protocol=4))
    code, _, err = run_cli(capsys, "export", "qexport.models:TinyNet", "--scheme", "int8_static", "--input", "1x256",
                           "--calibrate", str(calib), "-o", str(tmp_path / "x.pt2"))
    assert_one_line_error(code, err, "export", "torch.load can read safely")
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.pt"]


def test_ctrl_c_anywhere_is_one_line_and_exit_130(capsys, monkeypatch):
    """Ctrl-C in the seconds the command's imports take (torch, the backends), not only in its work."""
    import qexport.cli as cli

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, out, err = run_cli(capsys, "compile", "model.pt2", "-o", "model_aoti.pt2")
    assert (code, out, err) == (130, "", "qexport compile: interrupted\n")


def test_missing_required_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "qexport.models:TinyNet", "--input", "1x256", "-o", "x.pt2"])
    assert e.value.code == 2 and "--scheme" in capsys.readouterr().err


# -- verify / bench -------------------------------------------------------------------------------

def test_verify_and_bench_an_exported_program(capsys, exported):
    path = exported[3]
    code, out, _ = run_cli(capsys, "verify", str(path), str(path), "--regions")
    assert code == 0
    assert "pass" in out and "1/1 passed (tolerance 0.05" in out and "blocks.0.qkv" in out
    code, out, _ = run_cli(capsys, "bench", str(path), "--min-time", "0", "--min-iters", "2", "--warmup", "0")
    assert code == 0 and "median" in out and str(path) in out


def test_verify_all_demo_artifacts_and_a_failing_one(capsys, demo_run, tmp_path):
    _, _, d = demo_run
    arts = [str(d / n) for n in ("model_aoti.pt2", "model.pte", "model.onnx")]
    code, out, _ = run_cli(capsys, "verify", str(d / "model.pt2"), *arts)
    assert code == 0 and "3/3 passed" in out
    other = tmp_path / "other.pt2"
    qexport.save(qexport.export(qexport.models.TinyNet(seed=7), (torch.randn(1, 256),)), other)
    code, out, _ = run_cli(capsys, "verify", str(d / "model.pt2"), arts[1], str(other))
    assert code == 1 and "FAIL" in out and "1/2 passed" in out
    # an explicit model-level bound replaces the family's
    code, out, _ = run_cli(capsys, "verify", str(d / "model.pt2"), str(d / "model_fp32.pt2"), "--tolerance", "1e-4")
    assert code == 1 and "FAIL" in out and "tolerance 0.0001 from --tolerance" in out
    # --baseline adds each artifact's error against the unquantized model
    code, out, _ = run_cli(capsys, "verify", str(d / "model.pt2"), arts[0], str(d / "model_fp32_aoti.pt2"), "--baseline", str(d / "model_fp32.pt2"))
    assert code == 0 and "rel vs fp32" in out.splitlines()[0]
    vs_fp32 = {ln.split()[0]: float(ln.split()[7]) for ln in out.splitlines()[2:4]}
    assert vs_fp32[str(d / "model_fp32_aoti.pt2")] < 1e-3 < vs_fp32[arts[0]]
    code, _, err = run_cli(capsys, "verify", str(d / "model.pt2"), arts[1], "--tolerance", "0")
    assert_one_line_error(code, err, "verify", "--tolerance must be positive")


def test_verify_and_bench_user_mistakes(capsys, demo_run, tmp_path):
    _, _, d = demo_run
    code, _, err = run_cli(capsys, "verify", str(d / "model.pt2"), str(tmp_path / "missing.pte"))
    assert_one_line_error(code, err, "verify", "missing.pte", "no such file")
    code, _, err = run_cli(capsys, "verify", str(d / "model.onnx"), str(d / "model.pt2"))
    assert_one_line_error(code, err, "verify", "reference must be an exported program")
    junk = tmp_path / "junk.txt"
    junk.write_text("x")
    code, _, err = run_cli(capsys, "verify", str(junk), str(d / "model.pt2"))
    assert_one_line_error(code, err, "verify", "not a qexport artifact")
    code, _, err = run_cli(capsys, "bench", str(tmp_path / "missing.onnx"))
    assert_one_line_error(code, err, "bench", "missing.onnx")
    code, out, _ = run_cli(capsys, "bench", str(d / "model_aoti.pt2"))  # its manifest describes its inputs
    assert code == 0 and "aoti" in out
    code, _, err = run_cli(capsys, "bench", str(d / "model.pte"), "--input", "1x256:float77")
    assert_one_line_error(code, err, "bench", "unknown dtype")


def test_verify_and_bench_name_an_artifact_of_another_model(capsys, demo_run, tmp_path):
    """An artifact whose inputs cannot be the reference's (another count or rank) fails as a row that says
    so, instead of its runtime's words ("Guard failed: x.size()[1] == 3", "Invalid rank for input: x")."""
    _, _, d = demo_run
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
    other = tmp_path / "conv.pt2"
    qexport.save(qexport.export(conv, (torch.randn(1, 3, 4, 4),)), other)
    code, out, _ = run_cli(capsys, "verify", str(d / "model.pt2"), str(other), str(d / "model.onnx"))
    assert code == 1 and "1/2 passed" in out
    row = next(ln for ln in out.splitlines() if ln.startswith(str(other)))
    assert "FAIL" in row and "its input 'input' has 4 dims (1x3x4x4), not 2; the reference takes 1x256 float32" in row
    assert "made from another model?" in row
    code, out, _ = run_cli(capsys, "bench", str(d / "model.pt2"), str(other), "--min-time", "0", "--min-iters", "1",
                           "--warmup", "0")
    row = next(ln for ln in out.splitlines() if ln.startswith(str(other)))
    assert code == 1 and f"the inputs made for {d / 'model.pt2'} are 1x256 float32" in row
    code, out, _ = run_cli(capsys, "bench", str(other), "--input", "1x3x4x4", "--input", "1x3x4x4", "--min-time", "0",
                           "--min-iters", "1", "--warmup", "0")
    assert code == 1 and "it takes 1 input, not 2; the inputs given are 1x3x4x4 float32, 1x3x4x4 float32: give inputs it takes" in out
    # same count and rank, another size: each kind's recorded specs say so (a .pte failed with "error 0x10" and
    # native log lines, a .pt2 on a torch guard), and a --baseline of another model is one line, not a traceback
    narrow = tmp_path / "narrow.pt2"
    qexport.save(qexport.export(torch.nn.Linear(64, 2).eval(), (torch.randn(1, 64),)), narrow)
    arts = [str(d / n) for n in ("model.pt2", "model_aoti.pt2", "model.pte", "model.onnx")]
    code, out, _ = run_cli(capsys, "verify", str(narrow), *arts)
    assert code == 1 and out.count("it takes x: float32[1, 256], not 1x64 float32; the reference takes 1x64 float32") == 4
    code, _, err = run_cli(capsys, "verify", str(narrow), str(narrow), "--baseline", str(d / "model_fp32.pt2"))
    assert_one_line_error(code, err, "verify", "baseline", "it takes x: float32[1, 256], not 1x64 float32")


def test_bench_side_by_side_table(capsys, demo_run):
    _, _, d = demo_run
    arts = [str(d / n) for n in ("model.pt2", "model_aoti.pt2", "model.pte", "model.onnx")]
    code, out, err = run_cli(capsys, "bench", *arts, "--min-time", "0.05", "--min-iters", "3", "--threads", "1")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["artifact", "kind", "size", "median"]
    assert [ln.split()[1] for ln in lines[2:]] == ["pt2", "aoti", "pte", "onnx"]
    assert "[4/4] timing" in err


# -- demo -----------------------------------------------------------------------------------------

def test_demo_prints_one_table_and_leaves_every_artifact(demo_run):
    code, out, d = demo_run
    assert code == 0, out
    names = {p.name for p in d.iterdir()}
    assert {"model.pt2", "model_aoti.pt2", "model.pte", "model.onnx", "model_fp32.pt2", "model_fp32_aoti.pt2"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary files left
    table = out.strip().splitlines()
    assert table[0].split()[:3] == ["artifact", "kind", "size"]
    assert "vs fp32 AOTI" in table[0] and "rel err vs fp32" in table[0]
    rows = {ln.split()[0]: ln for ln in table[2:] if ln.startswith("model")}
    assert set(rows) == {"model_fp32.pt2", "model_fp32_aoti.pt2", "model.pt2", "model_aoti.pt2", "model.pte", "model.onnx"}
    for name in ("model.pt2", "model_aoti.pt2", "model.pte", "model.onnx"):
        cells = rows[name].split()
        assert cells[8] == "pass", rows[name]
        assert cells[9].endswith("x") and float(cells[9][:-1]) > 0, rows[name]  # speed vs the fp32 AOTI package
        assert float(cells[10]) > 0, rows[name]  # quantization error vs the fp32 model
    fp32_aoti = rows["model_fp32_aoti.pt2"].split()  # its kind, "fp32 (aoti)", is two words
    assert fp32_aoti[1:3] == ["fp32", "(aoti)"] and fp32_aoti[9] == "-" and fp32_aoti[10] == "1.00x"
    assert float(fp32_aoti[11]) < 1e-3  # the fp32 package vs the fp32 model
    assert "int8_dynamic" in table[-1] and "tolerance 0.02" in table[-1]


def test_demo_fails_loudly_before_work_when_a_backend_is_missing(capsys, monkeypatch, tmp_path):
    from qexport import runners

    monkeypatch.setitem(runners.STAGES, "to_executorch", ("qexport.lower.not_written_yet", "ExecuTorch backend"))
    out = tmp_path / "demo"
    code, _, err = run_cli(capsys, "demo", "--out", str(out))
    assert_one_line_error(code, err, "demo", "ExecuTorch backend")
    assert not out.exists()
    code, _, err = run_cli(capsys, "demo", "--out", str(out), "--backends", "aoti,tflite")
    assert_one_line_error(code, err, "demo", "tflite")
    code, _, err = run_cli(capsys, "demo", "--out", str(out), "--scheme", "int5")
    assert_one_line_error(code, err, "demo", "unknown scheme 'int5'")


def test_demo_out_and_numbers_are_checked_before_work(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, needle in ((["--out", str(afile / "sub")], "cannot create the directory: Not a directory"),
                         (["--out", str(tmp_path / "d"), "--threads", "-1"], "--threads must be a positive number"),
                         (["--out", str(tmp_path / "d"), "--bench-time", "-1"], "--bench-time must be >= 0")):
        code, _, err = run_cli(capsys, "demo", *argv)
        assert_one_line_error(code, err, "demo", needle)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize("spec, needle", [
    ("'1xfoo'", "BadSpec.example_input_spec '1xfoo': shape '1xfoo' is not dimensions"),  # was "--input '1xfoo'"
    ("64", "BadSpec has example_input_spec = 64, not a string"),  # was "has no example_input_spec"
])
def test_demo_names_a_models_bad_example_input_spec(capsys, tmp_path, spec, needle):
    src = tmp_path / "bad_models.py"
    src.write_text(f"import qexport.models\nclass BadSpec(qexport.models.TinyNet):\n    example_input_spec = {spec}\n")
    code, _, err = run_cli(capsys, "demo", "--out", str(tmp_path / "d"), "--model", f"{src}:BadSpec")
    assert_one_line_error(code, err, "demo", needle)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_demo_interrupted_midway_leaves_no_half_demo(capsys, monkeypatch, tmp_path, existing):
    """Ctrl-C (or an error) after the .pt2 files are written: they go, and the directory if the demo made it;
    what else is in it stays."""
    from qexport.cli import demo_cmd

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_cmd, "_write", interrupted)
    out = tmp_path / "demo"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "demo", "--out", str(out), "--backends", "onnx")
    assert code == 130 and err.strip().splitlines()[-2:] == ["[4/6] lowering to ONNX ... FAILED in 0.0 s",
                                                             "qexport demo: interrupted"], err
    assert ([p.name for p in out.iterdir()] == ["notes.txt"]) if existing else not out.exists()
