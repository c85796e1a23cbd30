"""Shared small models and inputs. Models are tiny so every backend (and AOTI compiles) stays fast."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import qexport
from qexport.models import TinyNet

torch.manual_seed(0)


class MLP(TinyNet):
    """qexport's built-in MLP (ReLU between Linear layers), small by default."""

    def __init__(self, dims=(64, 128, 32)):
        super().__init__(dims)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class EmbedNet(nn.Module):
    def __init__(self, vocab=100, dim=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 32)

    def forward(self, idx):
        return self.fc(self.emb(idx)).mean(1)


class Block(nn.Module):
    """A transformer block: attention (q, k, v, o projections) and an MLP."""

    def __init__(self, dim=64, heads=4, hidden=128):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=128, dim=64, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


class TiedLM(nn.Module):
    """An embedding and an LM head sharing one weight (GPT-2's `wte` / `lm_head`, at toy size)."""

    def __init__(self, vocab=64, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx))


def quantized(model: nn.Module, scheme, example, **kw) -> nn.Module:
    """Quantize `model` (a fresh instance) with calibration on `example` when the scheme needs it."""
    s = qexport.schemes.get(scheme) if isinstance(scheme, str) else scheme
    if s.activation == "static":
        kw.setdefault("calibration_data", [example])
    return qexport.quantize(model.eval(), s, **kw)


# Parameters that make every built-in scheme applicable to the small models above (in_features 64).
SCHEME_ARGS = {"int4_weight_only": {"group_size": 32}, "int8_dynamic_int4_weight": {"group_size": 32}, "nf4": {"group_size": 32}}


@contextlib.contextmanager
def exact_cpu_int_mm():
    """Kernels planned for another machine, run here: the CPU `aten._int_mm` is oneDNN's s8 x s8 GEMM,
    which without VNNI (an AVX2 CPU, or ONEDNN_MAX_CPU_ISA=AVX2) saturates its int16 pair sums (off
    by up to 3e4). Where it does, ATen's own exact loop runs instead, as the target's would."""
    a = torch.full((17, 64), 127, dtype=torch.int8)
    saturates = not torch.equal(torch._int_mm(a, a[:8].t()), a.int() @ a[:8].int().t())
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled and not saturates
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def scheme_for(name: str):
    return qexport.schemes.get(name, **SCHEME_ARGS.get(name, {}))


@pytest.fixture(params=qexport.schemes.builtin_names())
def builtin_scheme(request):
    return scheme_for(request.param)


@pytest.fixture
def mlp_input():
    return torch.randn(4, 64)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`qexport demo` run once per session through the CLI's main(): (exit code, stdout, out dir).
    Shared by the CLI and runner tests: it leaves one artifact of every kind (.pt2, AOTI package,
    .pte, .onnx, and an fp32 .pt2), and its AOTI compile is the slow part (~20 s)."""
    import contextlib
    import io

    from qexport.cli import main

    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--out", str(out), "--bench-time", "0.1"])
    return code, buf.getvalue(), out


@pytest.fixture(scope="session")
def tied_pte(tmp_path_factory):
    """(TiedLM quantized as transformers models are: int8_dynamic head, XNNPACK takes it; int8 weight-only
    embedding, left in the program; its input; its .pte with the shared table in tied.ptd beside it)."""
    torch.manual_seed(0)
    model = qexport.quantize(TiedLM().eval(), {nn.Linear: "int8_dynamic", nn.Embedding: "int8_weight_only"})
    # 640 tokens x 64 logits: an output ATen copies in parallel (over its 32768-element grain)
    x = torch.randint(0, 64, (8, 80), generator=torch.Generator().manual_seed(4))
    path = tmp_path_factory.mktemp("tied") / "tied.pte"
    report = qexport.to_executorch(qexport.export(model, (x,)), path, progress=False)
    return model, x, path, report


# -- generation: a quantized decoder LM and its artifacts, built once per session --------------------

LM_CACHE = 48


@pytest.fixture(scope="session")
def lm_program(tmp_path_factory):
    """(quantized Llama, its export_lm program, its .pt2 path): int8_dynamic (fp32 compute, integer
    GEMMs every backend computes exactly: XNNPACK delegates them), a 48-position cache."""
    from hf_models import causal_lm

    model = qexport.quantize(causal_lm("llama"), "int8_dynamic")
    ep = qexport.export_lm(model, max_cache_len=LM_CACHE)
    path = tmp_path_factory.mktemp("lm") / "lm.pt2"
    qexport.save(ep, path)
    return model, ep, path


@pytest.fixture(scope="session")
def lm_aoti(lm_program):
    """The .pt2 above compiled by AOTInductor for this CPU (the slow part: Inductor's C++)."""
    path = lm_program[2].with_name("lm_aoti.pt2")
    qexport.compile(lm_program[2], path)
    return path


@pytest.fixture(scope="session")
def lm_pte(lm_program):
    """(the .pt2 above lowered to ExecuTorch with XNNPACK, its lowering report)."""
    path = lm_program[2].with_name("lm.pte")
    return path, qexport.to_executorch(lm_program[2], path, progress=False)


@pytest.fixture(scope="session")
def lm_onnx(lm_program):
    """The same quantized model exported with its cache as inputs and outputs (ONNX has no state)."""
    path = lm_program[2].with_name("lm.onnx")
    qexport.to_onnx(qexport.export_lm(lm_program[0], max_cache_len=LM_CACHE, cache="io"), path)
    return path
