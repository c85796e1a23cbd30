"""`qexport inspect FILE`: the region table, totals, --json, and one clear line on errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import qexport
from qexport.cli import main
from serializers import Manifest

from conftest import EmbedNet, quantized, scheme_for


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    idx = torch.randint(0, 100, (2, 8))
    model = quantized(EmbedNet(), scheme_for("int4_weight_only"), (idx,))
    path = tmp_path_factory.mktemp("cli") / "embed.pt2"
    manifest = qexport.save(qexport.export(model, (idx,)), path, extra={"note": "cli test"})
    return path, manifest


def test_table(artifact, capsys):
    path, manifest = artifact
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: pt2 artifact, manifest v1, written by qexport {qexport.__version__} with torch {torch.__version__}")
    assert out[1].split() == ["region", "op", "scheme", "params", "weight", "input", "bytes", "float", "bytes", "ratio"]
    rows = {line.split()[0]: line for line in out[3:3 + len(manifest.regions)]}
    assert set(rows) == {"emb", "fc"}
    assert "embedding  int4_weight_only(g32, asym, bf16)  group_size=32  [100, 64]  [2, 8]" in rows["emb"]
    emb = manifest.region("emb")
    assert f"{emb.weight_bytes / emb.float_bytes:.3f}x" in rows["emb"]
    assert out[-2].startswith(f"total: 2 regions, ") and "quantized replacing" in out[-2] and "file " in out[-2]
    assert out[-1] == 'extra: {"note": "cli test"}'


def test_json(artifact, capsys):
    path, manifest = artifact
    assert main(["inspect", "--json", str(path)]) == 0
    assert Manifest.from_dict(json.loads(capsys.readouterr().out)) == manifest


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.pt2", "missing.pt2: no such file"),
        (lambda d: (d / "junk.pt2").write_bytes(b"PK\x03\x04junk") and d / "junk.pt2", "junk.pt2: not a zip archive"),
        (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", "notes.txt: not a qexport artifact"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qexport inspect: error: ") and message in lines[0]


def test_command_line_entry_point(artifact):
    path, _ = artifact
    proc = subprocess.run([sys.executable, "-m", "qexport", "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "int4_weight_only(g32, asym, bf16)" in proc.stdout and "total: 2 regions" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "qexport", "inspect", str(path) + ".nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no such file" in proc.stderr
