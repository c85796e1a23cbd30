"""`qexport export --dynamic`: which dims are dynamic, their names in tables and manifests."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import qexport
from qexport.cli import main
from qexport.cli._dims import DynamicDim, dynamic_shapes, maxima, parse_dynamic, rename, resolve, traced_shape
from qexport.errors import UsageError


def test_parse_every_form():
    assert parse_dynamic(["0,1", "2:seq", "1.3:len"]) == [
        DynamicDim(None, 0, "batch"), DynamicDim(None, 1, "dim1"), DynamicDim(None, 2, "seq"), DynamicDim(1, 3, "len")]
    assert parse_dynamic(["0.1"]) == [DynamicDim(0, 1, "in0_dim1")]
    assert parse_dynamic(["0:batch:32,1::64", "0.2:len:8"]) == [
        DynamicDim(None, 0, "batch", 32), DynamicDim(None, 1, "dim1", 64), DynamicDim(0, 2, "len", 8)]


@pytest.mark.parametrize("value, match", [
    ("x", "'x' is not DIM"), ("1:", "is not DIM"), ("1:2seq", "names are identifiers"), ("-1", "is not DIM"),
    ("0:batch:", "is not DIM"), ("0:::8", "is not DIM"), ("0:batch:x", "is not DIM"),
])
def test_parse_errors(value, match):
    with pytest.raises(UsageError, match=match):
        parse_dynamic([value])


def test_resolve():
    shapes = [(1, 8), (1, 8, 4), (5,)]
    assert resolve(parse_dynamic(["0,1:seq"]), shapes) == [{0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}, {0: "batch"}]
    assert resolve(parse_dynamic(["1.2:feat"]), shapes) == [{}, {2: "feat"}, {}]
    with pytest.raises(UsageError, match="no input has a dim 3"):
        resolve(parse_dynamic(["3"]), shapes)
    with pytest.raises(UsageError, match="input 2 has 1 dims"):
        resolve(parse_dynamic(["2.1"]), shapes)
    with pytest.raises(UsageError, match="there are 3 inputs"):
        resolve(parse_dynamic(["3.0"]), shapes)
    assert traced_shape((1, 1, 4), {0: "batch", 1: "seq"}) == (2, 2, 4)
    parsed = parse_dynamic(["0:batch:16", "1:seq"])
    assert maxima(parsed, shapes) == [{0: 16}, {0: 16}, {0: 16}]
    assert dynamic_shapes(resolve(parsed, shapes), maxima(parsed, shapes))[0] == {
        0: torch.export.Dim.DYNAMIC(max=16), 1: torch.export.Dim.DYNAMIC}
    with pytest.raises(UsageError, match="input 0's dim 1 is traced at 8 .*above that bound"):
        maxima(parse_dynamic(["1:seq:4"]), shapes)
    assert rename("[s77, s5, 128] s77*s5", {"s77": "batch", "s5": "seq"}) == "[batch, seq, 128] batch*seq"


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def seq_dynamic(tmp_path_factory):
    path = tmp_path_factory.mktemp("dyn") / "tt.pt2"
    result = run("export", "qexport.models:TinyTransformer", "--scheme", "int8_weight_only", "--input", "1x16:int64",
                 "--dynamic", "0", "--dynamic", "1:seq", "-o", str(path))
    return (*result, path)


def test_export_batch_and_sequence_dynamic(seq_dynamic):
    code, out, err, path = seq_dynamic
    assert code == 0, err
    assert "batchxseqx128" in out and "s" + "77" not in out
    assert "inputs: batchxseq:int64 (traced at 2x16:int64)" in out
    assert "quantized 10 of 10 weight layers" in out  # the summary
    ep = qexport.load(path)
    model = qexport.quantize(qexport.models.TinyTransformer(), "int8_weight_only")
    for shape in ((3, 5), (1, 16)):
        x = torch.randint(0, 256, shape)
        torch.testing.assert_close(ep.module()(x), model(x))
    assert sorted(qexport.inspect(path).extra["dim_names"].values()) == ["batch", "seq"]
    code, out, _ = run("inspect", str(path))
    assert code == 0 and "[batch, seq, 128]" in out


def test_export_per_input_dim_and_errors(tmp_path):
    code, _, err = run("export", "qexport.models:TinyTransformer", "--scheme", "int8_weight_only", "--input", "1x16:int64",
                       "--dynamic", "0.2", "-o", str(tmp_path / "x.pt2"))
    assert code == 1 and "--dynamic 0.2: input 0 has 2 dims" in err and not (tmp_path / "x.pt2").exists()


def test_export_with_an_upper_bound(tmp_path):
    """`DIM:NAME:MAX` bounds the dim in the program (what an ExecuTorch .pte is planned for), and the
    export still infers the other dims' ranges."""
    path = tmp_path / "b.pt2"
    code, out, err = run("export", "qexport.models:TinyNet", "--scheme", "int8_weight_only", "--input", "1x256",
                         "--dynamic", "0:batch:8", "-o", str(path))
    assert code == 0, err
    (spec,) = qexport.inspect(path).extra["inputs"]
    assert spec["shape"][0] == {"name": "batch", "min": 2, "max": 8}
    code, _, err = run("export", "qexport.models:TinyNet", "--scheme", "int8_weight_only", "--input", "4x256",
                       "--dynamic", "0:batch:3", "-o", str(tmp_path / "c.pt2"))
    assert code == 1 and "input 0's dim 0 is traced at 4" in err and not (tmp_path / "c.pt2").exists()


def test_a_dim_the_model_fixes_is_named_as_the_flag_to_change(tmp_path):
    """--dynamic 1 on TinyNet, whose dim 1 feeds Linear(256, ...): one line naming the dim, not torch's page of
    advice on mark_dynamic and Dim.DYNAMIC."""
    code, _, err = run("export", "qexport.models:TinyNet", "--scheme", "int8_weight_only", "--input", "1x256",
                       "--dynamic", "0,1", "-o", str(tmp_path / "x.pt2"))
    assert code == 1 and err.strip().splitlines()[-1] == (
        "qexport export: error: --dynamic: the model fixes input x's dim 1 at 256 (a layer of that fixed size, e.g. a "
        "Linear's in_features, reads it), so it cannot be dynamic: leave that dim out of --dynamic"), err
    assert "mark_dynamic" not in err and list(tmp_path.iterdir()) == []
