"""Models people bring, at test size: transformers GPT-2, Llama, BERT, T5's encoder, ViT and ResNet
built from configs (no hub) and an nn.Conv1d stack, quantized with a mixed recipe and taken through every backend,
numerics checked against the eager quantized model."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import qexport
from qexport import runners

pytest.importorskip("transformers")
import hf_models as hf  # noqa: E402

#: int8_dynamic for linear and conv layers (XNNPACK / QGemm / _int_mm kernels), int8 weight-only for
#: embeddings (indices have no activation to quantize)
RECIPE = {nn.Linear: "int8_dynamic", nn.Conv1d: "int8_dynamic", nn.Conv2d: "int8_dynamic", nn.Embedding: "int8_weight_only"}


class Conv1dNet(nn.Module):
    """An nn.Conv1d stack (audio front ends), over the pixels read as 3 channels of 256 samples."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 4, 5, stride=2, groups=4))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.conv(pixels.flatten(2)),)


MODELS = {
    "conv1d": (Conv1dNet, hf.pixels),
    "gpt2": (hf.gpt2, hf.token_ids),
    "llama": (hf.llama, hf.token_ids),
    "bert": (hf.bert, hf.token_ids),
    "t5": (hf.t5_encoder, hf.token_ids),
    "vit": (hf.vit, hf.pixels),
    "resnet": (hf.resnet, hf.pixels),
}
#: bound of every backend vs the eager quantized model, relative to the output's max-abs (int8 rounding
#: of activations may flip by one step where a backend's float order differs)
TOLERANCE = 2e-2


class Zoo(nn.Module):
    """The models in one program, so each backend compiles once for all of them (an AOTI compile
    or ExecuTorch lowering has a fixed cost of seconds): outputs are the models' first outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.models = nn.ModuleDict({name: build() for name, (build, _) in MODELS.items()})

    def forward(self, ids: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(ids if MODELS[name][1] is hf.token_ids else pixels)[0] for name, m in self.models.items())


class Exported:
    def __init__(self, tmp) -> None:
        self.x = (hf.token_ids(), hf.pixels())
        self.float_model = Zoo()
        with torch.no_grad():
            self.float_expected = self.float_model(*self.x)
        self.model = qexport.quantize(Zoo(), RECIPE)
        with torch.no_grad():
            self.expected = self.model(*self.x)
        self.ep = qexport.export(self.model, self.x)
        self.pt2 = tmp / "zoo.pt2"
        qexport.save(self.ep, self.pt2)
        self.tmp = tmp
        self._artifacts: dict[str, object] = {}

    def artifact(self, backend: str):
        if backend == "pt2":
            return self.pt2
        if backend not in self._artifacts:
            path = self.tmp / {"aoti": "zoo_aoti.pt2", "pte": "zoo.pte", "onnx": "zoo.onnx"}[backend]
            # the stage is looked up by name: reading all three would need every extra for the AOTI case too
            getattr(qexport, {"aoti": "compile", "pte": "to_executorch", "onnx": "to_onnx"}[backend])(self.ep, path)
            self._artifacts[backend] = path
        return self._artifacts[backend]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    return Exported(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def gpt2_pt2(tmp_path_factory):
    """GPT-2 alone (its output is a transformers ModelOutput): the model, its input and its .pt2."""
    model = qexport.quantize(hf.gpt2(), RECIPE)
    x = hf.token_ids()
    path = tmp_path_factory.mktemp("gpt2") / "gpt2.pt2"
    qexport.save(qexport.export(model, (x,)), path)
    return model, x, path


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def test_every_weight_layer_is_quantized(zoo):
    """ViT's patch conv included: the model casts the pixels to `projection.weight.dtype`, which the
    quantized layer answers as the float one did (float32)."""
    summary = zoo.model.qexport_summary
    assert [d.module for d in summary.skipped if d.op is not None] == [], str(summary)
    projection = zoo.model.get_submodule("models.vit.vit.embeddings.patch_embeddings.projection")
    assert projection.op == "conv2d" and projection.weight.dtype == torch.float32
    kinds = {d.layer_type for d in summary.quantized}
    assert {"Conv1D", "Linear", "Conv1d", "Conv2d", "Embedding"} <= kinds
    # T5's `shared` is read through `encoder.embed_tokens`, tied to it: one region for the pair
    assert {r.module_path for r in qexport.regions(zoo.ep)} == {d.module for d in summary.quantized} - {"models.t5.shared"}
    for name in MODELS:
        assert any(d.module.startswith(f"models.{name}.") for d in summary.quantized), name


def test_eager_quantized_is_close_to_float(zoo):
    for name, q, f in zip(MODELS, zoo.expected, zoo.float_expected):
        assert rel_err(q, f) < 0.1, (name, rel_err(q, f))


@pytest.mark.parametrize("backend", ["pt2", "aoti", "pte", "onnx"])
def test_backend_matches_eager_quantized(zoo, backend):
    got = runners.load(zoo.artifact(backend))(list(zoo.x))
    assert len(got) == len(MODELS)
    for name, g, expected in zip(MODELS, got, zoo.expected):
        assert g.shape == expected.shape, name
        assert rel_err(g, expected) < TOLERANCE, (name, backend, rel_err(g, expected))


def test_tied_weight_stored_once(gpt2_pt2, zoo, tmp_path):
    """GPT-2's wte / lm_head share one int8 table: the .pt2 and the .onnx are smaller than the same
    model untied by at least the table; every artifact of the zoo (the .pte with its .ptd) holds GPT-2's
    and Llama's tables once each, in whichever layout and code type (the ONNX integer GEMM's uint8 + 128
    codes, transposed) a backend stores them."""
    model, x, path = gpt2_pt2
    pte = zoo.artifact("pte")
    files = {"pt2": zoo.pt2.read_bytes(), "aoti": zoo.artifact("aoti").read_bytes(), "onnx": zoo.artifact("onnx").read_bytes(),
             "pte": pte.read_bytes() + pte.with_suffix(".ptd").read_bytes()}
    for name in ("gpt2", "llama"):
        head = zoo.model.models[name].lm_head
        table = head.tensors()["weight"]
        assert table is zoo.model.models[name].get_input_embeddings().tensors()["weight"], name
        forms = [t.contiguous().numpy().tobytes() for t in (table, table.T, (table.to(torch.int16) + 128).to(torch.uint8),
                                                            (table.T.to(torch.int16) + 128).to(torch.uint8))]
        assert {kind: sum(data.count(f) for f in forms) for kind, data in files.items()} == dict.fromkeys(files, 1), name
    assert model.transformer.wte.tensors()["weight"] is model.lm_head.tensors()["weight"]
    untied = qexport.quantize(hf.gpt2(tie=False), RECIPE)
    untied_ep = qexport.export(untied, (x,))
    qexport.save(untied_ep, tmp_path / "untied.pt2")
    assert os.path.getsize(tmp_path / "untied.pt2") - os.path.getsize(path) >= hf.VOCAB * 32
    qexport.to_onnx(path, tmp_path / "tied.onnx")
    qexport.to_onnx(tmp_path / "untied.pt2", tmp_path / "untied.onnx")  # the same route: manifests of equal size
    assert os.path.getsize(tmp_path / "untied.onnx") - os.path.getsize(tmp_path / "tied.onnx") >= hf.VOCAB * 32
    got = runners.load(tmp_path / "tied.onnx")([x])[0]  # lm_head reads the table through a Transpose
    assert rel_err(got, model(x).logits) < TOLERANCE
    ep = qexport.load(path)
    head = ep.state_dict["lm_head.weight"]
    tied = [n for n, t in ep.state_dict.items() if t.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()]
    assert sorted(tied) == ["lm_head.weight", "transformer.wte.weight"]


FRESH = textwrap.dedent("""
    import sys, torch, qexport
    from qexport import runners
    from qexport.cli import main
    assert "transformers" not in sys.modules
    assert main(["verify", sys.argv[1], sys.argv[1]]) == 0
    assert main(["bench", sys.argv[1], "--warmup", "0", "--min-iters", "1", "--min-time", "0"]) == 0
    x = torch.load(sys.argv[2])
    out = qexport.load(sys.argv[1]).module()(x)
    print(type(out).__module__, type(out).__name__)
    torch.testing.assert_close(runners.load(sys.argv[1])([x])[0], out[0])
""")


def test_fresh_process_loads_transformers_outputs(gpt2_pt2, tmp_path):
    """A process that never imported transformers verifies, benchmarks (the CLI), loads and runs the
    .pt2: the output container is registered from the allow-list."""
    _, x, path = gpt2_pt2
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, "-c", FRESH, str(path), str(tmp_path / "x.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["transformers.modeling_outputs", "CausalLMOutputWithCrossAttentions"]
    assert "1/1 passed" in run.stdout


def test_container_allow_list(tmp_path, monkeypatch):
    """Only ModelOutput subclasses of allow-listed modules are registered; a name outside the list is
    never imported."""
    from serializers.containers import register_output_containers, spec_type_names

    (tmp_path / "planted.py").write_text("raise SystemExit('imported a module named by a file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert register_output_containers(["planted.Evil", "transformers.modeling_outputs.torch",
                                       "transformers.modeling_outputs._private", "os.system"]) == []
    # transformers' per-model modules define outputs too (Swin's): only ModelOutput subclasses, only there
    assert register_output_containers(["transformers.models.swin.modeling_swin.SwinLayer",
                                       "transformers.models.swin.configuration_swin.SwinConfig",
                                       "transformers.models.planted.modeling_planted.Evil",
                                       "transformers.models.swin.modeling_swin.os.system"]) == []
    swin = "transformers.models.swin.modeling_swin.SwinImageClassifierOutput"
    register_output_containers([swin])
    assert swin in torch.utils._pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE
    spec = '[1, {"type": "a.B", "context": "[]", "children_spec": [{"type": "c.D", "children_spec": []}]}]'
    assert sorted(spec_type_names(spec)) == ["a.B", "c.D"]
    assert list(spec_type_names("not json")) == []


class FloatMatmulHead(nn.Module):
    """A layer left float that computes `x @ W.T` itself (Falcon's FalconLinear): torch.onnx folds the
    transposed weight into an initializer that is a transposed numpy view."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.fc = nn.Linear(32, 32)
            self.head = nn.Parameter(torch.randn(48, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) @ self.head.T


def test_float_transposed_weight_to_onnx(tmp_path):
    model = qexport.quantize(FloatMatmulHead().eval(), "int8_dynamic")
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    qexport.to_onnx(qexport.export(model, (x,)), tmp_path / "m.onnx")
    assert rel_err(runners.load(tmp_path / "m.onnx")([x])[0], model(x)) < TOLERANCE


def test_one_odd_layer_does_not_refuse_the_model():
    """T5's relative_attention_bias is an Embedding(32, num_heads): int4 groups cannot divide it, so the
    default selection skips it with the reason and quantizes the rest."""
    model = qexport.quantize(hf.t5_encoder(), qexport.schemes.get("int4_weight_only", group_size=32))
    why = {d.module: d.reason for d in model.qexport_summary.skipped}
    assert list(why) == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"]
    assert "group_size=32 does not divide the embedding reduction dimension 2" in next(iter(why.values()))
    x = hf.token_ids()
    assert rel_err(model(x)[0], hf.t5_encoder()(x)[0]) < 0.25  # int4 on a tiny random model


def test_nodes_emitted_for_regions_keep_the_regions_module(zoo):
    """Every backend's rewrite of a region stands where the region stood: the FX nodes AOTI and ExecuTorch
    splice in carry the region node's nn_module_stack and stack_trace (a sibling's slice its own region's,
    not the stack's first member's), and the ONNX nodes that read a region's weights its module scope."""
    import onnx

    from qexport.lower import _graph, executorch
    from qexport.lower.kernels import apply_kernels
    from qexport.regions import region_nodes

    before = {r.name: (n.meta["nn_module_stack"], n.meta["stack_trace"]) for n, r in region_nodes(zoo.ep)}
    aoti, plans = apply_kernels(zoo.ep, "cpu")
    assert any("siblings" in p.details for p in plans)  # Llama's q/k/v and gate/up
    planned = {p.region.name: p for p in executorch.plan(zoo.ep)}
    pte = _graph.copy_program(zoo.ep)
    _graph.replace_regions(pte, lambda site: planned[site.region.name].lowering(site), kernel_of=lambda r: planned[r.name].kernel)
    for ep in (aoti, pte):
        tagged = [n for n in ep.graph.nodes if _graph.region_of(n)]
        assert tagged and all((n.meta["nn_module_stack"], n.meta["stack_trace"]) == before[_graph.region_of(n)] for n in tagged)
    slices = [n for n in aoti.graph.nodes if n.target is torch.ops.aten.slice.Tensor and _graph.region_of(n)]
    assert {_graph.region_of(n) for n in slices} == {p.region.name for p in plans if "siblings" in p.details}

    model = onnx.load(str(zoo.artifact("onnx")), load_external_data=False)
    weights = {f"{r.module_path}.{role}": r.module_path for r in qexport.regions(zoo.ep) for role in r.roles[1:]}
    # (not the Transpose that rebuilds a tied table for its twin, lower/onnx_shared.py: it serves two regions)
    readers = [(n, weights[i]) for n in model.graph.node for i in n.input if i in weights and n.op_type != "Transpose"]
    assert len({m for _, m in readers}) > 30
    for node, module in readers:
        # (a tied weight deduplicated is read under its twin's name)
        scope = {p.key: p.value for p in node.metadata_props}.get("namespace", "")
        assert any(f"/{m}: " in scope for m in weights.values()), (node.op_type, module, scope)
