"""The one place backends edit an ExportedProgram's graph.

Every backend replaces `invoke_quant_packed` regions by ordinary nodes before its compiler sees the
program: AOTInductor by a scheme kernel (`kernels.apply_kernels`), ExecuTorch by Q/DQ patterns or the
region's own reference math, since EXIR cannot enter HOP subgraphs ("aten.div.Tensor is not an Edge
operator") and has no schema for the HOP. The edits they need live here, once:

* `replace_regions(ep, lower)` -- splice: each region node (and its `getitem`) is replaced by the
  nodes `lower(site)` emits through a `RegionSite` (`site.call`, `site.trace`, `site.inline_reference`);
* `add_constant` -- a new tensor (a repacked weight, a zero point) as a buffer of the program;
* `drop_unused_state` -- remove the state nothing reads any more (a weight replaced by its repacked copy);
* `state_tensor` -- the real tensor behind an operand (a parameter, buffer or lifted constant; built on
  `regions.operand_state`, the lookup the export checks and the manifest use too);
  `region_state` -- every such operand of every region, by role.

Every spliced node stands where the region stood: it carries the region node's `nn_module_stack`,
`stack_trace` and `source_fn_stack` (profilers, ExecuTorch's devtools and error messages point at the
model's module, not at qexport's kernel code) and one tag, `meta["custom"][REGION_TAG]`, with the
region's name, module, scheme and kernel; torch.export keeps `custom` meta through retracing and
decompositions (so through `to_edge`), which is how a backend reports later what became of a region.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from typing import Any, Callable, Iterator

import torch
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.utils import _pytree as pytree

from ..errors import LoweringError, QExportError
from ..passes import name_regions
from ..regions import STATE_KINDS, Region, operand_state, region_nodes, region_payload
from ..signature import tensor_inputs

#: meta["custom"] key of every node emitted for a region: {"region", "module", "scheme", "kernel"}
REGION_TAG = "qexport_region"
#: what a spliced node inherits from the region node it replaces
_INHERITED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def region_tag(node: torch.fx.Node) -> dict[str, str] | None:
    """The tag a node was emitted with (read back after later passes), or None."""
    custom = node.meta.get("custom")
    tag = custom.get(REGION_TAG) if isinstance(custom, dict) else None
    return tag if isinstance(tag, dict) else None


def region_of(node: torch.fx.Node) -> str | None:
    """The name of the region a node was emitted for, or None."""
    tag = region_tag(node)
    return tag.get("region") if tag else None


# -- the program's state ------------------------------------------------------------------------

def copy_program(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A copy whose graph can be rewritten; tensors are shared (edits add or drop state, never mutate it)."""
    gm = copy.deepcopy(ep.graph_module)
    sig = copy.deepcopy(ep.graph_signature)
    # Copying a graph re-derives node names and avoids Python builtins, so nn.Sequential's input
    # `input` becomes `input_1`; the signature must follow or the verifier rejects the program.
    renamed = {a.name: b.name for a, b in zip(ep.graph.nodes, gm.graph.nodes) if a.name != b.name}
    for spec in (*sig.input_specs, *sig.output_specs):
        if getattr(spec.arg, "name", None) in renamed:
            spec.arg = type(spec.arg)(renamed[spec.arg.name])
    return ep._update(gm, sig, state_dict=dict(ep.state_dict), constants=dict(ep.constants))


def contiguous_inputs(ep: torch.export.ExportedProgram) -> list[str]:
    """Make the program take its tensor inputs contiguous, whatever the layout of the example it was
    exported with; returns the inputs changed.

    Why: a compiled package reads each input with the strides of the example it was traced from and
    never checks them (a package exported from `torch.randn(64, b).t()` gave 2.0 absolute error on a
    contiguous input, as any package does on a transposed view of its own layout). One fixed layout
    lets the runner (`qexport.load_compiled`) hand every package the same thing: a contiguous copy of
    whatever it is given. Only the placeholders' values change; the ops downstream are retraced by the
    compiler from them."""
    changed = []
    for node, val in tensor_inputs(ep):
        if not val.is_contiguous():
            node.meta["val"] = val.contiguous()
            changed.append(node.name)
    if changed and ep.example_inputs is not None:  # what a backend traces with must agree
        ep.example_inputs = torch.utils._pytree.tree_map(
            lambda t: t.contiguous() if isinstance(t, torch.Tensor) else t, ep.example_inputs)
    return changed


def is_state(ep: torch.export.ExportedProgram, node: Any) -> bool:
    """Whether `node` is a parameter, buffer or lifted constant of `ep` (not a user input)."""
    return operand_state(ep, node) is not None


def state_tensor(ep: torch.export.ExportedProgram, node: Any, what: str = "") -> torch.Tensor:
    """The real tensor behind `node`: a parameter, buffer or lifted constant of `ep`."""
    state = operand_state(ep, node)
    if state is None:
        raise LoweringError(
            f"{what or 'operand'} ({getattr(node, 'name', node)}) is not a parameter, buffer or constant of the "
            f"program; this backend needs the region's quantized tensors as buffers (export the quantized model "
            f"with qexport.export)"
        )
    return state[1].detach()


def add_constant(ep: torch.export.ExportedProgram, fqn: str, tensor: torch.Tensor) -> torch.fx.Node:
    """A new persistent buffer `fqn` (made unique) holding `tensor`, as a placeholder of `ep`'s graph.

    Placed after the existing state, before the user inputs: placeholders and input_specs must stay
    in the same order.
    """
    graph = ep.graph_module.graph
    base, i = fqn, 1
    while fqn in ep.state_dict or fqn in ep.constants:
        fqn, i = f"{base}_{i}", i + 1
    specs = list(ep.graph_signature.input_specs)
    first_user = next((i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT), len(specs))
    placeholders = list(graph.find_nodes(op="placeholder"))
    if first_user < len(placeholders):
        where = graph.inserting_before(placeholders[first_user])
    elif placeholders:
        where = graph.inserting_after(placeholders[-1])
    else:
        where = graph.inserting_before(next(iter(graph.nodes)))
    with where:
        ph = graph.placeholder("b_" + "".join(c if c.isalnum() else "_" for c in fqn))
    fake_mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
    ph.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
    specs.insert(first_user, InputSpec(InputKind.BUFFER, TensorArgument(ph.name), target=fqn, persistent=True))
    ep.graph_signature.input_specs[:] = specs
    ep.state_dict[fqn] = tensor
    return ph


def shares_state_storage(ep: torch.export.ExportedProgram, tensor: torch.Tensor) -> bool:
    """Whether `tensor` lies in the memory of a parameter, buffer or constant `ep` already holds (a
    view of it, or the tensor itself: `scale.float()` of a float32 scale)."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
        return False
    ptr = tensor.untyped_storage().data_ptr()
    return any(isinstance(o, torch.Tensor) and o.device == tensor.device and o.untyped_storage().data_ptr() == ptr
               for o in (*ep.state_dict.values(), *ep.constants.values()))


def replace_state(ep: torch.export.ExportedProgram, node: torch.fx.Node, tensor: torch.Tensor) -> None:
    """Give the parameter, buffer or constant behind `node` the value `tensor` (same dtype and shape, so
    the graph's recorded values stay true); the old tensor, which the caller's model may hold, is untouched."""
    fqn, old = operand_state(ep, node) or (None, None)
    if old is None or (old.dtype, old.shape) != (tensor.dtype, tensor.shape):
        raise LoweringError(f"{node.name}: cannot replace {old!r} by a {tensor.dtype} {tuple(tensor.shape)} tensor")
    (ep.state_dict if fqn in ep.state_dict else ep.constants)[fqn] = tensor


def drop_unused_state(ep: torch.export.ExportedProgram) -> bool:
    """Remove parameters, buffers and constants no node reads any more (a weight replaced by its
    repacked copy, a static scale that became a literal). Left in, they would still be stored in
    the artifact (and a float8 tensor is one ExecuTorch cannot hold). Mutated buffers stay."""
    graph = ep.graph_module.graph
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    unused = {n.name: n for n in graph.find_nodes(op="placeholder") if not n.users}
    keep, dropped = [], []
    for spec in ep.graph_signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if spec.kind in STATE_KINDS and name in unused and spec.target not in mutated:
            graph.erase_node(unused[name])
            dropped.append(spec.target)
        else:
            keep.append(spec)
    ep.graph_signature.input_specs[:] = keep
    still_used = {s.target for s in keep}
    for target in dropped:
        if target not in still_used:
            ep.state_dict.pop(target, None)
            ep.constants.pop(target, None)
    if dropped:
        ep.graph_module.recompile()
    return bool(dropped)


def _scratch_write(ep: torch.export.ExportedProgram, node: torch.fx.Node) -> torch.fx.Node | None:
    """The `copy_(buffer, value)` node if it is the only use of buffer placeholder `node` and writes a
    value of the buffer's shape and dtype (so no call reads the buffer's old value), else None."""
    if node.name not in ep.graph_signature.inputs_to_buffers or len(node.users) != 1:
        return None
    (user,) = node.users
    if user.target is not torch.ops.aten.copy_.default or len(user.args) != 2 or user.args[0] is not node or user.kwargs:
        return None
    old, new = node.meta.get("val"), getattr(user.args[1], "meta", {}).get("val")
    same = isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and old.dtype == new.dtype \
        and tuple(old.shape) == tuple(new.shape)
    return user if same else None


def scratch_writes_as_values(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`ep`, or a copy where each write to a buffer whose old value no call reads is the value itself
    (later reads take it; the buffer, now unread, is dropped). Such a buffer is scratch space, not state
    between calls: transformers' LongRoPE rotary (Phi-3 128k / 3.5, Phi-4-mini) writes the factors it picks
    into `inv_freq` on every call before reading them, and to_onnx refused those models as writing state."""
    if not any(_scratch_write(ep, n) for n in ep.graph.find_nodes(op="placeholder")):
        return ep
    ep = copy_program(ep)
    for node in list(ep.graph.find_nodes(op="placeholder")):
        write = _scratch_write(ep, node)
        if write is not None:
            write.replace_all_uses_with(write.args[1])
            ep.graph.erase_node(write)
    ep.graph_module.recompile()
    drop_unused_state(ep)
    return ep


def region_state(ep: torch.export.ExportedProgram) -> dict[str, dict[str, torch.Tensor]]:
    """region name -> role -> the tensor behind that operand, for the operands that are state of `ep`.

    Followed through the graph, not guessed from `<module>.<role>` names: a tied weight is one
    placeholder read under several names, and a hand-written region's tensors have no module."""
    return {
        region.name: {role: state_tensor(ep, a) for role, a in zip(region.roles, node.args[1:]) if is_state(ep, a)}
        for node, region in region_nodes(ep)
    }


# -- emitting nodes -----------------------------------------------------------------------------

def call_before(
    anchor: torch.fx.Node, target: Any, *args: Any, fake_mode: Any = None, like: torch.fx.Node | None = None,
    **kwargs: Any,
) -> torch.fx.Node:
    """Emit `target(*args, **kwargs)` before `anchor`, with meta["val"] computed under the program's fake
    mode (what export itself records; dynamic dims stay symbolic) and, unless the caller stamps its own,
    the module stack and stack trace of `like` (default `anchor`; profilers and errors point at the
    model's module) and, given `like`, its region tag."""
    graph = anchor.graph
    with graph.inserting_before(anchor):
        out = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = pytree.tree_map_only(torch.fx.Node, lambda n: n.meta["val"], (args, kwargs))
    if fake_mode is None:
        fake_mode = detect_fake_mode([a.meta.get("val") for a in pytree.tree_leaves((args, kwargs))
                                      if isinstance(a, torch.fx.Node)])
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        out.meta["val"] = target(*fake_args, **fake_kwargs)
    for key in (*_INHERITED_META, "custom") if like is not None else _INHERITED_META:
        if key in (like or anchor).meta:
            out.meta[key] = copy.copy((like or anchor).meta[key])
    return out


def _returns_alias(node: torch.fx.Node) -> bool:
    """Whether `node`'s value aliases its input's (its schema says so: a view, an in-place op's self;
    `getitem` of a split)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def contiguous_for_views(node: torch.fx.Node) -> torch.fx.Node:
    """`node`, or a contiguous copy of it that takes its users, where its value, strided otherwise than
    the graph was traced with, reaches through aliasing ops (views, in-place ops) a `view` that cannot
    view it, an `as_strided` or the program's output.

    Why: a node that now stands for a region's output with other strides (a slice of a wider kernel's
    output) keeps the region's users, traced on a contiguous value: a view across the narrowed dim
    fails AOTInductor's retrace ("Cannot view a tensor with shape ... and strides ..."), an as_strided
    reads other columns of the wider output, and an output reaches the caller strided. The views are
    recomputed on `node`'s fake value, so dims stay symbolic.
    """
    val = node.meta["val"]
    with val.fake_mode:
        # a value of its own: an in-place op on the way (unsqueeze_) must not change the node's record
        vals: dict[torch.fx.Node, Any] = {node: torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)}
        todo = [node]
        while todo:
            n = todo.pop()
            for user in n.users:
                if user.op == "output":
                    return _contiguous_copy(node)
                # only an alias of `n` itself (its first argument: `buf.copy_(n)` aliases `buf`)
                if user in vals or not _returns_alias(user) or user.args[:1] != (n,):
                    continue
                if user.target is torch.ops.aten.as_strided.default:
                    return _contiguous_copy(node)
                args, kwargs = torch.fx.node.map_arg((user.args, user.kwargs), lambda a: vals.get(a, a.meta.get("val")))
                try:
                    vals[user] = user.target(*args, **kwargs)
                except (RuntimeError, ValueError):
                    return _contiguous_copy(node)
                todo.append(user)
    return node


def _contiguous_copy(node: torch.fx.Node) -> torch.fx.Node:
    copy_ = call_before(node.next, torch.ops.aten.clone.default, node, like=node, memory_format=torch.contiguous_format)
    node.replace_all_uses_with(copy_, delete_user_cb=lambda u: u is not copy_)
    return copy_


# -- splicing regions ---------------------------------------------------------------------------

class RegionSite:
    """One region being replaced: its record, its operands (by role) and a way to emit nodes in its place."""

    def __init__(self, ep: torch.export.ExportedProgram, node: torch.fx.Node, region: Region, kernel: str = "") -> None:
        self.ep = ep
        self.graph = ep.graph_module.graph
        self.node = node
        self.region = region
        self.operands: dict[str, torch.fx.Node] = dict(zip(region.roles, node.args[1:]))
        self.tag = {"region": region.name, "module": region.module_path, "scheme": region.scheme_name, "kernel": kernel}
        self._fake_mode = detect_fake_mode([a.meta.get("val") for a in node.args[1:] if isinstance(a, torch.fx.Node)])
        self._emitted: list[torch.fx.Node] = []
        self._anchor = node

    # -- reading ----------------------------------------------------------------------------
    @property
    def input(self) -> torch.fx.Node:
        return self.operands[self.region.roles[0]]

    def has(self, role: str) -> bool:
        return role in self.operands

    def value(self, role: str) -> torch.Tensor:
        """The real tensor behind a constant operand (a buffer, parameter or lifted constant)."""
        return self.value_of(self.operands[role], role)

    def value_of(self, node: torch.fx.Node, role: str = "") -> torch.Tensor:
        return state_tensor(self.ep, node, f"region {self.region.name}: operand {role or node.name!r}")

    # -- emitting ---------------------------------------------------------------------------
    def call(self, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        """Emit `target(*args, **kwargs)` before the region node (or the node given to `before`), with
        meta["val"] computed under the program's fake mode (what export itself records) and the region tag."""
        out = call_before(self._anchor, target, *args, fake_mode=self._fake_mode, **kwargs)
        self._stamp(out)
        return out

    @contextlib.contextmanager
    def before(self, node: torch.fx.Node) -> Iterator[None]:
        """Emit at `node` instead (to rewrite nodes `inline_reference` already copied)."""
        previous, self._anchor = self._anchor, node
        try:
            yield
        finally:
            self._anchor = previous

    @property
    def emitted(self) -> list[torch.fx.Node]:
        """The nodes emitted for this region so far (emission order), erased ones left out."""
        return [n for n in self._emitted if not n._erased]

    def constant(self, suffix: str, tensor: torch.Tensor) -> torch.fx.Node:
        """A new buffer `<region name>.<suffix>` of the program (a repacked weight, a zero point a
        kernel pattern requires): computed once, here, and stored in the artifact."""
        return add_constant(self.ep, f"{self.region.name}.{suffix}", tensor)

    def inline_reference(self) -> torch.fx.Node:
        """Copy the region's own subgraph (its scheme's reference math) in place of the region."""
        sub = getattr(self.ep.graph_module, self.node.args[0].target)
        outs = self._copy_in(sub.graph, self.node.args[1:])
        if not isinstance(outs, (tuple, list)) or len(outs) != 1:
            raise LoweringError(f"region {self.region.name}: only single-output regions can be inlined, got {outs!r}")
        return outs[0]

    def trace(self, fn: Callable[..., Any], *args: torch.fx.Node) -> Any:
        """Emit what `fn(*args)` computes: traced by make_fx on the arguments' fake values (dynamic dims
        stay symbolic), its nodes copied in place; returns `fn`'s output in terms of the copies. Control
        flow in `fn` (torch.cond) brings its branch graphs into the program."""
        from torch.fx.experimental.proxy_tensor import make_fx

        with self._fake_mode:
            gm = make_fx(fn, tracing_mode="real")(*(a.meta["val"] for a in args))
        fold_static_cond_operands(gm)
        self._adopt_submodules(gm)
        return self._copy_in(gm.graph, args, fn)

    def _adopt_submodules(self, gm: torch.fx.GraphModule) -> None:
        # graph copies take get_attr nodes but not what they name: a body with control flow (torch.cond's
        # branch graphs) needs its submodules moved into the program. Every one, nested too, gets a name
        # unique in the program: make_fx names each level's branches true_graph_0/false_graph_0, and
        # AOTInductor generates one function per subgraph name, so nested branches of the same name
        # silently ran one another's code (seen on CUDA: the M=4096 branch ran the M<=16 kernel).
        attrs = [(m, a) for m in list(gm.modules()) if isinstance(m, torch.fx.GraphModule) for a in m.graph.find_nodes(op="get_attr")]
        for i, (mod, attr) in enumerate(attrs):
            fresh = f"{attr.target}_{self.region.node_name}_{i}"
            owned = getattr(mod, attr.target)
            setattr(self.ep.graph_module if mod is gm else mod, fresh, owned)
            if mod is not gm:
                delattr(mod, attr.target)
            attr.target = fresh
        for mod in gm.modules():
            if isinstance(mod, torch.fx.GraphModule):
                mod.recompile()

    def _copy_in(self, src: torch.fx.Graph, args: Any, traced: Any = None) -> Any:
        """Copy `src`'s nodes, its placeholders bound to `args`, in front of the anchor, each stamped;
        returns `src`'s output in terms of the copies. `traced`: the function `src` was traced from,
        whose tensor constants are fake (refused, naming it)."""
        env: dict[torch.fx.Node, Any] = dict(zip((n for n in src.nodes if n.op == "placeholder"), args))
        for n in src.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                return pytree.tree_map_only(torch.fx.Node, lambda a: env[a], n.args[0])
            if n.op == "get_attr" and traced is not None and isinstance(getattr(self.ep.graph_module, n.target), torch.Tensor):
                raise LoweringError(
                    f"region {self.region.name}: {traced} created a tensor constant while traced; pass it as an "
                    f"operand (a `(suffix, tensor)` buffer) instead"
                )
            with self.graph.inserting_before(self._anchor):
                copied = self.graph.node_copy(n, lambda a: env[a])
            self._stamp(copied)
            env[n] = copied
        return None

    def _stamp(self, node: torch.fx.Node) -> None:
        node.meta["custom"] = {**(node.meta.get("custom") or {}), REGION_TAG: dict(self.tag)}
        for key in _INHERITED_META:
            if key in self.node.meta:
                node.meta[key] = copy.copy(self.node.meta[key])
            else:
                node.meta.pop(key, None)
        self._emitted.append(node)

    def _splice(self, out: torch.fx.Node) -> None:
        """Make `out` stand for the region's output and remove the region node (and its subgraph)."""
        gm, graph = self.ep.graph_module, self.graph
        for g in list(self.node.users):
            for spec in self.ep.graph_signature.output_specs:
                if getattr(spec.arg, "name", None) == g.name:
                    spec.arg = TensorArgument(out.name)
            g.replace_all_uses_with(out)
            graph.erase_node(g)
        subgraph = self.node.args[0]
        graph.erase_node(self.node)
        if isinstance(subgraph, torch.fx.Node) and subgraph.op == "get_attr" and not subgraph.users:
            graph.erase_node(subgraph)
            if hasattr(gm, subgraph.target):
                delattr(gm, subgraph.target)


LowerFn = Callable[[RegionSite], torch.fx.Node]


def _reference(site: RegionSite) -> torch.fx.Node:
    return site.inline_reference()


def replace_regions(
    ep: torch.export.ExportedProgram,
    lower: LowerFn | None = None,
    *,
    kernel_of: Callable[[Region], str | None] | None = None,
) -> list[Region]:
    """Replace regions of `ep` (in place) by the nodes `lower(site)` emits; returns the regions replaced.

    `kernel_of(region)` names the kernel recorded in each emitted node's tag, or None to leave that
    region as it is (default: every region, "reference"). `lower` defaults to the region's own
    subgraph. Unused state is not dropped here (`drop_unused_state`): a caller may still need it.
    """
    lower = lower or _reference
    done = []
    for node, region in region_nodes(ep):
        kernel = kernel_of(region) if kernel_of is not None else "reference"
        if kernel is None:
            continue
        users = list(node.users)
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            raise LoweringError(
                f"region {region.name}: only single-output regions (`getitem(region, 0)` users) can be replaced, "
                f"found {[u.format_node() for u in users]}"
            )
        site = RegionSite(ep, node, region, kernel)
        try:
            out = lower(site)
        except QExportError:
            raise
        except Exception as e:  # a lowering's own code (a kernel body, a user's rewrite): name the region
            raise LoweringError(f"region {region.name}: lowering it to {kernel} failed: {type(e).__name__}: {e}") from e
        _check_output(region, kernel, users, out)
        site._splice(out)
        done.append(region)
    if done:
        ep.graph_module.graph.eliminate_dead_code()
        ep.graph_module.recompile()
    return done


def _check_output(region: Region, kernel: str, users: list[torch.fx.Node], out: Any) -> None:
    """Refuse a lowering whose output is not what the region's users were traced with (its dtype and
    shape): spliced in, it would fail deep in a backend's compiler, or silently compute something else."""
    if not isinstance(out, torch.fx.Node):
        raise LoweringError(f"region {region.name}: lowering it to {kernel} returned {type(out).__name__}; "
                            f"a lowering returns the graph node that stands for the region's output")
    want, got = (users[0].meta.get("val") if users else None), out.meta.get("val")
    if not isinstance(want, torch.Tensor):
        return
    if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.dim() != want.dim() or not all(
            statically_known_true(a == b) for a, b in zip(got.shape, want.shape)):
        what = f"a {got.dtype} tensor of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else repr(got)
        raise LoweringError(
            f"region {region.name}: lowering it to {kernel} gives {what}; the region's output is a {want.dtype} "
            f"tensor of shape {tuple(want.shape)} (a lowering must compute what the region computes)"
        )


def with_region_names(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`ep` if every region payload records its unique name (programs from qexport.export do), else a
    copy where they do (`qexport.passes.name_regions`), for a backend that reads names from nodes alone."""
    if all(p is None or p.name == r.name for p, r in ((region_payload(n), r) for n, r in region_nodes(ep))):
        return ep
    ep = copy_program(ep)
    name_regions(ep)
    return ep


def fold_static_cond_operands(gm: torch.fx.GraphModule) -> bool:
    """Bake the Python-int operands make_fx gives `torch.cond` (sizes that are static) into its branches.

    Why: Inductor's cond lowering (torch 2.11, `ir.Conditional.create`) asserts that every operand is
    a graph node and fails the AOTI compile otherwise.
    """
    changed = False
    for mod in list(gm.modules()):
        if not isinstance(mod, torch.fx.GraphModule):
            continue
        for node in mod.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond):
            pred, true_fn, false_fn, operands = node.args
            static = {i: o for i, o in enumerate(operands) if not isinstance(o, torch.fx.Node)}
            if not static:
                continue
            for branch in (true_fn, false_fn):
                sub = getattr(mod, branch.target)
                for i, ph in enumerate(list(sub.graph.find_nodes(op="placeholder"))):
                    if i in static:
                        ph.replace_all_uses_with(static[i])
                        sub.graph.erase_node(ph)
                sub.recompile()
            node.args = (pred, true_fn, false_fn, tuple(o for i, o in enumerate(operands) if i not in static))
            changed = True
        if changed:
            mod.recompile()
    return changed
