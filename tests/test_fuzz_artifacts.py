"""Fuzzing qexport.load / qexport.inspect with damaged copies of a real artifact (seeded).

Two kinds of damage in-process: raw bytes of the file (truncations, bit flips, overwritten blocks:
what a bad disk or a cut download does) and members rewritten inside a structurally valid zip with
correct CRCs (what reaches torch's own parsers). Whatever the damage, only a QExportError may escape,
and no call may hang. Then a slice of `tests/fuzz_artifacts.py` (every kind, hostile files too, in a
worker process so a crash is counted; the full run's figures are in docs/security.md).
"""

from __future__ import annotations

import random
import signal
import zipfile
from pathlib import Path

import pytest
import torch

import qexport
from qexport import QExportError

from conftest import MLP, quantized, scheme_for

SEED = 20261126
RAW_CASES = 180
MEMBER_CASES = 90
SLICE_CASES = 50
HANG_SECONDS = 20


class Hang(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the code under test eats it."""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    x = torch.randn(4, 64)
    model = quantized(MLP(), scheme_for("int8_static"), (x,))
    path = tmp_path_factory.mktemp("fuzz") / "model.pt2"
    qexport.save(qexport.export(model, (x,)), path)
    return path


def _call(fn, path: Path) -> str:
    """'ok', the QExportError's class name, or 'ESCAPED ...' / 'HANG'."""
    def alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        fn(path)
        return "ok"
    except QExportError as e:
        assert str(path) in str(e), f"error does not name the file: {e}"
        return type(e).__name__
    except Hang:
        return "HANG"
    except Exception as e:
        return f"ESCAPED {type(e).__name__}: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _raw_mutation(data: bytes, rng: random.Random, i: int) -> tuple[str, bytes]:
    b = bytearray(data)
    kind = ("truncate", "flip", "block")[i % 3]
    if kind == "truncate":
        return kind, bytes(b[: rng.randrange(len(b))])
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    off = rng.randrange(len(b))
    n = min(rng.randint(1, 512), len(b) - off)
    b[off:off + n] = rng.randbytes(n)
    return kind, bytes(b)


def _check(results: list[tuple[str, str, str]]) -> None:
    bad = [r for r in results if r[2].startswith(("ESCAPED", "HANG"))]
    assert not bad, f"{len(bad)} of {len(results)} damaged files broke the contract, e.g. {bad[:5]}"


def test_raw_damage(artifact, tmp_path):
    rng = random.Random(SEED)
    data = artifact.read_bytes()
    results = []
    for i in range(RAW_CASES):
        kind, damaged = _raw_mutation(data, rng, i)
        p = tmp_path / f"raw{i}.pt2"
        p.write_bytes(damaged)
        for fn in (qexport.load, qexport.inspect):
            results.append((f"raw{i}:{kind}", fn.__name__, _call(fn, p)))
        p.unlink()
    _check(results)
    # every truncation loses the zip's central directory: none may load
    assert all(r[2] != "ok" for r in results if r[0].endswith("truncate"))
    assert sum(r[2] != "ok" for r in results if r[1] == "load") > RAW_CASES * 0.9


def test_member_damage(artifact, tmp_path):
    rng = random.Random(SEED + 1)
    with zipfile.ZipFile(artifact) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    results = []
    for i in range(MEMBER_CASES):
        target, payload = rng.choice([m for m in members if m[1]])
        kind, damaged = _raw_mutation(payload, rng, i)
        p = tmp_path / f"member{i}.pt2"
        with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as out:
            for name, d in members:
                out.writestr(name, damaged if name == target else d)
        for fn in (qexport.load, qexport.inspect):
            results.append((f"member{i}:{kind}:{target.split('/', 1)[1]}", fn.__name__, _call(fn, p)))
        p.unlink()
    _check(results)
    # damage to the JSON that describes the program (graph, payload configs, manifest) is always caught
    described = [r for r in results if r[1] == "load" and r[0].endswith(".json") and r[0].split(":")[1] == "truncate"]
    assert described and all(r[2] != "ok" for r in described)


def test_fuzz_slice_every_kind(demo_run, tied_pte, tmp_path):
    """50 seeded mutations per kind (damage, rewrites with fresh digests, hostile constructions):
    no payload runs, nothing is written outside the sandbox's extraction folders, nothing crashes or
    hangs, only QExportErrors escape, and no damaged .pt2, AOTI package or .pte data file loads."""
    import fuzz_artifacts

    d = demo_run[2]
    artifacts = {"pt2": d / "model.pt2", "aoti": d / "model_aoti.pt2", "pte": d / "model.pte", "onnx": d / "model.onnx",
                 "ptd": tied_pte[2]}
    report = fuzz_artifacts.run(artifacts, SLICE_CASES, fuzz_artifacts.SEED, tmp_path / "sandbox", log=lambda *_: None)
    bad = {k: v["bad_examples"] for k, v in report["kinds"].items() if v["bad_examples"]}
    assert not bad, bad
    assert report["extraction_folders_left"] == 0
    for kind in ("pt2", "aoti"):
        counts = report["kinds"][kind]["counts"]
        assert counts["damage"] == 35 and counts["hostile"] == 5 and counts.get("damage_loaded", 0) == 0
    for kind in ("pte", "onnx", "ptd"):  # the checksum trailer (for ptd, the data file's size and SHA-256 in it)
        assert report["kinds"][kind]["counts"].get("damage_loaded", 0) == 0
    assert report["kinds"]["ptd"]["counts"]["damage"] == 25 and report["kinds"]["ptd"]["counts"]["hostile"] == 5
