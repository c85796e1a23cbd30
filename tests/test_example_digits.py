"""examples/digits_cnn.py: a CNN trained on real data (sklearn digits), quantized int8_static with
calibration, lowered to an XNNPACK .pte and evaluated by ExecuTorch's runtime: accuracy within 1 point
of fp32, every region delegated, the manifest readable from the .pte."""

from __future__ import annotations

import os
import sys

import pytest

import qexport

pytest.importorskip("executorch")
pytest.importorskip("sklearn")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import digits_cnn  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """As the docstring runs it, a script with --out DIR: DIR need not exist (the script raised there, after 60 s of training)."""
    return digits_cnn.main(["--out", str(tmp_path_factory.mktemp("digits") / "new")])


def test_training_worked(result):
    assert result.fp32_accuracy >= 90.0


def test_pte_accuracy_within_one_point_of_fp32(result):
    assert abs(result.pte_accuracy - result.fp32_accuracy) <= 1.0
    # the .pte is the eager int8 model: at most a borderline image or two may flip
    assert result.pte_vs_eager_disagreements <= 2


def test_every_region_is_delegated_to_xnnpack(result):
    assert [r.name for r in result.report.regions] == ["conv1", "conv2", "fc1", "fc2"]
    assert result.report.all_delegated


def test_manifest_of_the_pte(result):
    manifest = qexport.inspect(result.pte)
    assert manifest.artifact == "pte"
    assert {r.scheme.name for r in manifest.regions} == {"int8_static"}
    assert manifest.quantized_bytes < manifest.float_bytes / 3
