"""The examples run as documented: custom_scheme (a user scheme end to end) and minilm (real model,
reduced: two schemes, the .pt2 and ONNX backends, a few sentences)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import qexport
from qexport.errors import InvalidSchemeError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    mod = load_example("custom_scheme")
    out = tmp_path_factory.mktemp("custom")
    results = mod.main(["--out", str(out)])
    yield mod, results, out
    qexport.schemes.unregister("int6_weight_only")


def test_custom_scheme_end_to_end(custom):
    mod, r, out = custom
    assert "int6_weight_only" in qexport.schemes.names()
    assert r["loaded_rel_err"] == 0.0
    assert r["compiled_rel_err"] <= mod.Int6Math.tolerance
    assert r["all_verified"] and {"verify_aoti", "verify_pte", "verify_onnx"} <= set(r)
    # 6-bit codes in one byte each plus a scale per channel: about a quarter of fp32
    assert 0.25 <= r["quantized_bytes"] / r["float_bytes"] < 0.26
    assert 0.005 < r["quantization_rel_err_vs_fp32"] < 0.1  # what 6 bits cost vs fp32 (not a backend tolerance)
    assert {p.name for p in out.iterdir()} >= {"tinynet_int6.pt2", "tinynet_int6_aoti.pt2", "tinynet_int6.pte", "tinynet_int6.onnx"}


def test_custom_scheme_math_is_its_own(custom):
    import torch

    mod, _, _ = custom
    s = qexport.schemes.get("int6_weight_only")
    w = torch.tensor([[0.5, -0.5, 31.0, 1.5]])  # 0.5 and 1.5 are ties: away from zero, not to even
    q = qexport.schemes.math_for(s).quantize_weight(s, w)
    assert q["weight"].tolist() == [[1, -1, 31, 2]] and q["weight"].dtype == torch.int8
    with pytest.raises(InvalidSchemeError, match="int6 is symmetric 6-bit"):
        qexport.schemes.get("int6_weight_only", bits=5)


def test_a_fresh_process_runs_the_artifact_but_needs_the_math_to_lower_it(custom):
    """The region's computation is in the graph, so loading and running need no registration;
    anything that needs the family's math (tolerance, lowering) says which module to import."""
    _, _, out = custom
    code = f"""
import json, sys, torch, qexport
ep = qexport.load({str(out / 'tinynet_int6.pt2')!r})
x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))
y = ep.module()(x)
res = {{'schemes': [r.scheme.name for r in qexport.regions(ep)]}}
try:
    qexport.schemes.math_for(qexport.regions(ep)[0].scheme)
except qexport.QExportError as e:
    res['math'] = type(e).__name__ + ': ' + str(e)
sys.path.insert(0, {str(EXAMPLES)!r})
import custom_scheme
custom_scheme.register()
res['tolerance'] = qexport.schemes.math_for(qexport.regions(ep)[0].scheme).tolerance
res['same'] = torch.equal(y, qexport.load({str(out / 'tinynet_int6.pt2')!r}).module()(x))
print(json.dumps(res))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["schemes"] == ["int6_weight_only"] * 3 and res["same"] and res["tolerance"] == 0.03
    assert res["math"].startswith("UnknownSchemeError") and "family 'int6'" in res["math"]
    assert "import the module that registers it" in res["math"]


def test_minilm_reduced(tmp_path, capsys):
    mod = load_example("minilm")
    rows = mod.main(["--out", str(tmp_path), "--schemes", "int8_dynamic,int4_weight_only", "--backends", "pt2,onnx",
                     "--sentences", "6", "--no-bench"])
    by = {(r["scheme"].split("(")[0], r["backend"]): r for r in rows}
    assert set(by) == {(s, b) for s in ("int8_dynamic", "int4_weight_only") for b in ("pt2", "onnx")}
    assert by["int8_dynamic", "pt2"]["cos_min"] > 0.995
    assert by["int4_weight_only", "pt2"]["cos_min"] > 0.9
    for s in ("int8_dynamic", "int4_weight_only"):
        assert by[s, "pt2"]["rel_vs_pt2"] == 0.0
        # the ONNX model embeds the sentences as the .pt2 does, and as close to fp32
        assert by[s, "onnx"]["cos_vs_pt2_min"] > 0.999
        assert abs(by[s, "onnx"]["cos_mean"] - by[s, "pt2"]["cos_mean"]) < 2e-3
    assert by["int4_weight_only", "onnx"]["bytes"] < 0.3 * by["int8_dynamic", "onnx"]["bytes"]  # embeddings too
    out = capsys.readouterr().out
    assert "cosine vs fp32" in out and "minilm_int4_weight_only.onnx" in out


@pytest.mark.parametrize("name, argv, message", [
    ("minilm", ["--sentences", "0"], "--sentences must be from 1 to"),  # was an IndexError in the tokenizer
    ("digits_cnn", ["--epochs", "0"], "--epochs must be >= 1"),  # was an untrained model's 9 % reported as a result
])
def test_examples_refuse_bad_arguments_before_work(name, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as a script sees it (digits_cnn's dataclass needs a real module)
    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).main(["--out", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_schemes_doc_is_in_sync_with_the_registry_and_backends():
    """docs/schemes.md is generated; regenerate it with `.venv/bin/python docs/gen_schemes.py`."""
    spec = importlib.util.spec_from_file_location("gen_schemes", EXAMPLES.parent / "docs" / "gen_schemes.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rows = gen._matrix()
    text = gen.render(rows)
    for name in qexport.schemes.builtin_names():
        assert f"| `{name}` |" in text
    assert gen.DOC.read_text() == text, "docs/schemes.md is out of date: run .venv/bin/python docs/gen_schemes.py"
    readme = gen.README.read_text()
    assert gen.README_BEGIN in readme
    assert gen.render_readme(readme, rows) == readme, "README.md's matrix is out of date: run .venv/bin/python docs/gen_schemes.py"


def test_links_in_readme_and_docs_resolve():
    """Every relative link and image in README.md and docs/ names a file that exists (and a heading that
    exists, for a link into a page); docs/benchmarks/cli_examples.md's plots pointed at docs/benchmarks/img/."""
    import re

    root = EXAMPLES.parent

    def anchors(page: Path) -> set[str]:  # GitHub's slugs: lower case, punctuation dropped, spaces to dashes
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}

    broken = []
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path) if path else page
            if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target)):
                broken.append(f"{page.relative_to(root)}: {link}")
    assert not broken, broken
