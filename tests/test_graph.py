"""qexport.lower._graph: the one module that edits programs (splice regions, add a constant, drop unused
state, the tensor behind an operand), checked on its own and through the backends that use it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export.graph_signature import InputKind

import qexport
from qexport.errors import LoweringError
from qexport.lower import _graph
from qexport.lower.kernels import apply_kernels
from qexport.regions import region_nodes

from conftest import MLP, quantized, scheme_for

X = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def int8_mlp():
    torch.manual_seed(0)
    model = quantized(MLP(), scheme_for("int8_dynamic"), (X,))
    return model, qexport.export(model, (X,))


def _region_meta(ep):
    return {r.name: (n.meta["nn_module_stack"], n.meta["stack_trace"]) for n, r in region_nodes(ep)}


def _check_spliced(ep, before, kernels):
    tagged = [n for n in ep.graph.nodes if _graph.region_tag(n)]
    assert {_graph.region_of(n) for n in tagged} == set(before) == {"layers.0", "layers.1"}
    for n in tagged:
        tag = _graph.region_tag(n)
        assert tag == {"region": tag["region"], "module": tag["region"], "scheme": "int8_dynamic", "kernel": kernels[tag["region"]]}
        stack, trace = before[tag["region"]]
        assert n.meta["nn_module_stack"] == stack and n.meta["stack_trace"] == trace


def test_aoti_spliced_nodes_keep_the_regions_module_stack_and_trace(int8_mlp):
    model, ep = int8_mlp
    before = _region_meta(ep)
    assert all(stack and trace for stack, trace in before.values())
    lowered, plans = apply_kernels(ep, "cpu")
    assert all(p.taken for p in plans) and not list(region_nodes(lowered))
    _check_spliced(lowered, before, {p.region.name: p.kernel for p in plans})
    # the repacked tensors are buffers named after their region; the weights they replace are gone
    added = [s.target for s in lowered.graph_signature.input_specs if s.target and s.target not in ep.state_dict]
    assert added and all(t.split(".")[0] == "layers" and t.rsplit(".", 1)[0] in before for t in added)
    torch.testing.assert_close(lowered.module()(X), model(X), atol=0.05, rtol=0.05)
    assert list(region_nodes(ep))  # the caller's program is untouched


def test_executorch_spliced_nodes_keep_the_regions_module_stack_and_trace(int8_mlp):
    model, ep = int8_mlp
    before = _region_meta(ep)
    ep = _graph.copy_program(ep)
    assert [r.name for r in _graph.replace_regions(ep, kernel_of=lambda r: f"ref {r.name}")] == ["layers.0", "layers.1"]
    _check_spliced(ep, before, {name: f"ref {name}" for name in before})
    torch.testing.assert_close(ep.module()(X), model(X))


def test_kernel_of_none_leaves_a_region_alone(int8_mlp):
    _, ep = int8_mlp
    ep = _graph.copy_program(ep)
    done = _graph.replace_regions(ep, kernel_of=lambda r: "ref" if r.name == "layers.1" else None)
    assert [r.name for r in done] == ["layers.1"] and [r.name for _, r in region_nodes(ep)] == ["layers.0"]


class WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros(()))
        self.offset = torch.tensor([1.0, 2.0, 3.0, 4.0])  # neither parameter nor buffer: a lifted constant

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x) + self.offset


@pytest.fixture
def with_state():
    torch.manual_seed(0)
    m = WithState()
    x = torch.randn(2, 8)
    with torch.no_grad():
        return m, x, torch.export.export(m, (x,))


def test_state_tensor_follows_parameters_buffers_and_constants(with_state):
    m, x, ep = with_state
    by_target = {s.target: n for s in ep.graph_signature.input_specs for n in ep.graph.nodes if n.name == s.arg.name}
    assert torch.equal(_graph.state_tensor(ep, by_target["fc.weight"]), m.fc.weight)
    assert torch.equal(_graph.state_tensor(ep, by_target["calls"]), m.calls)
    (const,) = [n for t, n in by_target.items() if t and t not in ("fc.weight", "fc.bias", "calls")]
    assert torch.equal(_graph.state_tensor(ep, const), m.offset)
    user = next(n for n in ep.graph.nodes if n.op == "placeholder" and not _graph.is_state(ep, n))
    with pytest.raises(LoweringError, match=rf"weights \({user.name}\) is not a parameter, buffer or constant"):
        _graph.state_tensor(ep, user, "weights")


def test_add_constant_then_drop_unused_state_keeps_a_valid_program(with_state, tmp_path):
    m, x, ep = with_state
    weight = next(n for n in ep.graph.nodes if n.name == "p_fc_weight")
    doubled = _graph.add_constant(ep, "fc.weight", m.fc.weight.detach() * 2)  # the name is taken: made unique
    assert doubled.meta["val"].shape == (4, 8)
    spec = next(s for s in ep.graph_signature.input_specs if s.arg.name == doubled.name)
    assert (spec.kind, spec.target, spec.persistent) == (InputKind.BUFFER, "fc.weight_1", True)
    weight.replace_all_uses_with(doubled)
    assert _graph.drop_unused_state(ep)
    assert "fc.weight" not in ep.state_dict and "calls" in ep.state_dict  # a mutated buffer stays
    assert not _graph.drop_unused_state(ep)
    kinds = [s.kind for s in ep.graph_signature.input_specs]
    assert kinds.index(InputKind.USER_INPUT) == len(kinds) - 1  # state before the user input
    expected = x @ (m.fc.weight * 2).T + m.fc.bias + m.offset
    torch.testing.assert_close(ep.module()(x), expected)
    # the verifier and serde accept the edited program
    torch.export.save(ep, tmp_path / "edited.pt2")
    torch.testing.assert_close(torch.export.load(tmp_path / "edited.pt2").module()(x), expected)
    ep.run_decompositions()


def test_a_traced_tensor_constant_is_refused_naming_the_region(int8_mlp):
    _, ep = int8_mlp
    ep = _graph.copy_program(ep)

    def body(x):
        return x + torch.tensor([1.0, 2.0]).sum()

    with pytest.raises(LoweringError, match="region layers.0: .* created a tensor constant while traced"):
        _graph.replace_regions(ep, lambda site: site.trace(body, site.input))
