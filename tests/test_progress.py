"""Stage names for long library calls (qexport/lower/_stages.py), as to_executorch shows them."""

from __future__ import annotations

import io

import pytest
import torch

import qexport
from qexport.lower import _stages

from conftest import MLP


def test_stages_name_only_long_ones(monkeypatch):
    out = io.StringIO()
    stage = _stages.Stages("work", stream=out)
    with stage("quick"):
        pass
    assert out.getvalue() == ""  # under AFTER_S: nothing
    monkeypatch.setattr(_stages, "AFTER_S", 0.0)
    with stage("slow"):
        pass
    with pytest.raises(RuntimeError), stage("broken"):
        raise RuntimeError
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("work: slow ... done in") and lines[1].startswith("work: broken ... FAILED in")
    quiet = io.StringIO()
    with _stages.Stages("work", enabled=False, stream=quiet)("slow"):
        pass
    assert quiet.getvalue() == ""


def test_to_executorch_names_its_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_stages, "AFTER_S", 0.0)
    x = torch.randn(2, 64)
    ep = qexport.export(qexport.quantize(MLP().eval(), "int8_dynamic"), (x,))
    qexport.to_executorch(ep, tmp_path / "m.pte")
    err = capsys.readouterr().err
    for name in ("lowering 2 regions to Q/DQ", "to_edge_transform_and_lower (xnnpack)", "to_executorch (memory planning"):
        assert f"to_executorch: {name}" in err, err
    qexport.to_executorch(ep, tmp_path / "q.pte", progress=False)
    assert "to_executorch:" not in capsys.readouterr().err
