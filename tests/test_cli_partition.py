"""`qexport partition IN.pt2 --target xnnpack|portable -o OUT.pte`: writes a .pte the ExecuTorch runtime
runs, prints the per-region report; bad arguments fail before any work with a message."""

from __future__ import annotations

import json

import pytest
import torch

import qexport
from qexport.cli import main
from qexport.cli.partition_cmd import TARGETS

from conftest import ConvNet, quantized, scheme_for

pytest.importorskip("executorch")


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = quantized(ConvNet(), scheme_for("int8_static"), (x,))
    path = tmp_path_factory.mktemp("cli") / "conv.pt2"
    qexport.save(qexport.export(model, (x,)), path)
    return path, model, x


def test_xnnpack_prints_the_report_and_writes_a_runnable_pte(pt2, tmp_path, capsys):
    src, model, x = pt2
    out = tmp_path / "conv.pte"
    assert main(["partition", str(src), "--target", "xnnpack", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("conv1", "conv2", "fc"):
        assert name in text
    assert "3/3 regions delegated" in text and "XnnpackBackend" in text
    from executorch.runtime import Runtime

    y = Runtime.get().load_program(str(out)).load_method("forward").execute([x])[0]
    assert ((y - model(x)).abs().max() / model(x).abs().max()).item() <= 2e-2


def test_portable_json_report(pt2, tmp_path, capsys):
    src, _, _ = pt2
    out = tmp_path / "conv_portable.pte"
    assert main(["partition", str(src), "--target", "portable", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == "executorch/portable" and report["delegated_nodes"] == 0
    assert [r["delegated"] for r in report["regions"]] == [False, False, False]
    assert report["bytes"] == out.stat().st_size


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "xnnpack", "-o", "{tmp}/x.onnx"], "must end with .pte"),
        (["--target", "portable", "-o", "{tmp}/nodir/x.pte"], "does not exist"),
        (["--target", "xnnpack", "-o", "{tmp}/x.pte", "--keep-regions", "--onnx-target", "host"],
         "--keep-regions, --onnx-target do not apply to --target xnnpack"),
    ],
)
def test_bad_output_fails_before_work(pt2, tmp_path, capsys, args, message):
    src, _, _ = pt2
    argv = ["partition", str(src), *(a.format(tmp=tmp_path) for a in args)]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_input_and_unknown_target(tmp_path, capsys):
    assert main(["partition", str(tmp_path / "none.pt2"), "--target", "xnnpack", "-o", str(tmp_path / "x.pte")]) == 1
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["partition", str(tmp_path / "none.pt2"), "--target", "coreml", "-o", str(tmp_path / "x.pte")])
    assert "invalid choice" in capsys.readouterr().err


def test_every_target_names_its_suffix():
    assert {t: TARGETS[t].suffix for t in ("xnnpack", "portable", "onnx")} == {
        "xnnpack": ".pte", "portable": ".pte", "onnx": ".onnx"}


@pytest.mark.parametrize("flags, named", [
    (["--keep-regions"], "--keep-regions does not apply to --target xnnpack"),
    (["--opset", "21", "--onnx-target", "host"], "--opset, --onnx-target do not apply to --target xnnpack"),
])
def test_an_onnx_option_with_a_pte_target_is_refused(pt2, tmp_path, capsys, flags, named):
    src, _, _ = pt2
    assert main(["partition", str(src), "--target", "xnnpack", *flags, "-o", str(tmp_path / "x.pte")]) == 1
    err = capsys.readouterr().err
    assert named in err and "only to --target onnx" in err
    assert not list(tmp_path.iterdir())


def test_an_output_where_nothing_can_be_written_fails_before_lowering(pt2, capsys):
    """/proc passes os.access for root (and so do some read-only mounts): the lowering used to run to
    the end before the write failed."""
    src, _, _ = pt2
    assert main(["partition", str(src), "--target", "xnnpack", "-o", "/proc/x.pte"]) == 1
    err = capsys.readouterr().err
    assert "/proc/x.pte" in err and "lower" not in err
