"""The calling convention every runtime shares: a `Runner` takes and returns a *flat* list of tensors
(the program's user inputs in graph order, its outputs flattened), plus what a runner knows about its
inputs (`InputInfo`) so verify and bench can make examples."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from ..table import printable

Flat = list[torch.Tensor]


@dataclass
class InputInfo:
    """What a runner knows about one of its inputs: enough to generate a valid example."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    #: integer inputs are drawn from [low, high); None means "not an index": filled with ones (masks)
    high: int | None = None
    low: int = 0
    #: token positions (where a KV cache writes): 0, 1, ... as a generation's first call has them; ones
    #: would write two tokens to one cache slot, which runtimes resolve differently
    positions: bool = False
    #: what the artifact's program (or manifest) records for this input, `signature.InputSpec`: its static
    #: sizes, dynamic ranges and dtype; None where the file does not say
    spec: Any = None

    def make(self, generator: torch.Generator) -> torch.Tensor:
        if self.positions:
            return torch.arange(self.shape[-1], dtype=self.dtype).expand(self.shape).contiguous()
        if self.dtype.is_floating_point:
            return torch.randn(self.shape, generator=generator).to(self.dtype)
        if self.high is None or self.dtype == torch.bool:
            return torch.ones(self.shape, dtype=self.dtype)
        return torch.randint(self.low, self.high, self.shape, generator=generator, dtype=self.dtype)


@dataclass
class Runner:
    """A loaded artifact: `runner(flat_inputs) -> flat_outputs`."""

    kind: str
    path: Path
    call: Callable[[Flat], Flat]
    #: the ExportedProgram for a .pt2 (lets verify compare region by region)
    program: torch.export.ExportedProgram | None = None
    inputs: list[InputInfo] | None = None
    #: flat inputs -> {region name: (node or function name, first output)}, where the runtime exposes regions
    #: (a .pt2, an .onnx written with keep_regions=True); None elsewhere
    region_call: Callable[[Flat], dict[str, tuple[str, torch.Tensor]]] | None = None
    #: where `call` takes its inputs and leaves its outputs ("cuda" for a CUDA AOTI package)
    device: str = "cpu"
    #: what callers built once for this runner and reuse (e.g. generation's captured decode step)
    cache: dict[str, Any] = field(default_factory=dict)
    #: the other files the artifact reads (a .pte's data file), counted in `size`
    data_files: tuple[Path, ...] = ()
    #: `call` checks its inputs itself (an AOTI package: `load_compiled`'s runner), so `__call__` does not
    call_checks_inputs: bool = False

    def __call__(self, inputs: Sequence[torch.Tensor]) -> Flat:
        """CPU tensors in and out whatever the device; `call` is the device-level convention."""
        if isinstance(inputs, torch.Tensor):  # list(x) would hand its rows over as inputs
            from ..errors import UsageError

            raise UsageError(f"{self.path}: a runner takes a list of tensors, one per input (runner([x])), not a tensor")
        if not self.call_checks_inputs:  # `call` stays unchecked: generation feeds it what it built itself, per token
            refuse_mismatch(self, inputs)
        if self.device == "cpu":
            return self.call(list(inputs))
        return [y.cpu() for y in self.call([x.to(self.device) for x in inputs])]

    def region_outputs(self, inputs: Sequence[torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]] | None:
        return self.region_call(list(inputs)) if self.region_call is not None else None

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in (self.path, *self.data_files))


def flat_tensors(out: Any) -> Flat:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def program_runner(ep: torch.export.ExportedProgram, path: "Path | None" = None) -> Runner:
    """A Runner over an in-memory ExportedProgram (eager, through `ep.module()`)."""
    module = ep.module()

    def call(flat: Flat) -> Flat:
        args, kwargs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
        with torch.no_grad():
            return flat_tensors(module(*args, **kwargs))

    return Runner("pt2", path or Path("<program>"), call, program=ep, inputs=program_inputs(ep),
                  region_call=lambda flat: region_outputs(ep, flat))


def region_outputs(ep: torch.export.ExportedProgram, flat: Flat) -> dict[str, tuple[str, torch.Tensor]]:
    """Each region's first output when the program runs on `flat`, keyed by region name (or node name)."""
    from ..regions import HOP_TARGETS, region_nodes

    gm = ep.module()  # unlifting keeps node names
    names = {node.name: region.name for node, region in region_nodes(ep)}
    captured: dict[str, tuple[str, torch.Tensor]] = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.op == "call_function" and n.target in HOP_TARGETS:
                key = names.get(n.name, n.name)
                first = out[0] if isinstance(out, (tuple, list)) else out
                captured[key] = (n.name, first.detach())
            return out

    args, kwargs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    flat_args = pytree.arg_tree_leaves(*args, **kwargs)
    with torch.no_grad():
        Capture(gm).run(*flat_args)
    return captured


# --------------------------------------------------------------------------------------------------
# inputs


def program_inputs(ep: torch.export.ExportedProgram) -> list[InputInfo]:
    """The program's user inputs (graph order), with concrete shapes: a dynamic dim takes its
    lower bound (at least 2, so it stays dynamic-looking), capped by its upper bound.

    Integer inputs that index a table (`signature.index_ranges`: an embedding, plain or a region) are
    drawn from [0, rows); other integer and bool inputs (attention masks) are ones."""
    from ..signature import program_inputs as signature
    from serializers.manifest import GENERATION_META

    return input_infos(signature(ep, require_tensors=True), generating=GENERATION_META in ep.graph_module.meta.get("custom", {}))


def input_infos(specs: Sequence[Any], *, generating: bool) -> list[InputInfo]:
    """InputInfos for `signature.InputSpec`s (a program's, or those its manifest records): each dynamic dim
    at its example size; integer inputs whose spec bounds them as table indices drawn from [0, hi]."""
    infos = [InputInfo(s.name, tuple(d.example() for d in s.shape), s.torch_dtype, *_draw(s), spec=s) for s in specs]
    if generating and len(infos) > 1:
        infos[1].positions = True  # a generating LM's inputs are (input_ids, cache_position, ...): qexport.generation
    return infos


def _draw(spec: Any) -> tuple[int | None, int]:
    """(high, low) for an input whose spec bounds its values: drawn from its non-negative part (the rows
    of a table), the exclusive high within int64 (randint takes it as one)."""
    values = getattr(spec, "values", None)
    if values is None or values[1] < 0:
        return None, 0
    return min(values[1], (1 << 63) - 2) + 1, max(values[0], 0)


#: the largest input `make_inputs` generates; an artifact's author chooses its input shapes
MAX_GENERATED_BYTES = 1 << 30


def make_inputs(infos: Sequence[InputInfo], seed: int = 0) -> Flat:
    """Example inputs for `infos`; ArtifactError (before allocating anything) for a shape that is
    negative or larger than MAX_GENERATED_BYTES: the shapes come from the file (a `.pte`'s or an
    `.onnx`'s inputs, a program's signature), and a declared (2**36, 64) input was a 16 TiB allocation."""
    from ..errors import ArtifactError

    for i in infos:
        sizes_ok = all(isinstance(d, int) and d >= 0 for d in i.shape)  # before any arithmetic on them
        n = math.prod(i.shape) * i.dtype.itemsize if sizes_ok else None
        if n is None or n > MAX_GENERATED_BYTES:
            raise ArtifactError(
                f"input {printable(i.name)[:80]!r} has shape {printable(tuple(i.shape))[:120]}"
                f"{'' if n is None else f' ({n:,} bytes)'}, which qexport does not generate (sizes must be whole "
                f"numbers, at most {MAX_GENERATED_BYTES:,} bytes in all); give inputs of your own (qexport bench --input SHAPE)"
            )
    g = torch.Generator().manual_seed(seed)
    return [i.make(g) for i in infos]


def describe_inputs(flat: Sequence[torch.Tensor]) -> str:
    """`1x64 float32, 1x16 int64`: what a set of inputs is, for messages."""
    return ", ".join("x".join(map(str, x.shape)) + " " + str(x.dtype).removeprefix("torch.") for x in flat) or "no inputs"


def input_mismatch(runner: Runner, flat: Sequence[torch.Tensor]) -> str | None:
    """Why `flat` cannot be `runner`'s inputs at all (their count or a rank differs, or, where the
    artifact records its inputs' specs, a dtype or a static size), or
    None. Without it, an artifact of another model fails with its runtime's own words ("Invalid rank for
    input: x", "Guard failed: x.size()[1] == 3", a .pte's "error 0x10" and native log lines), which do
    not say that the files do not belong together. A runtime-reported shape alone would not do: a
    dynamic dim's example size says nothing about its range."""
    if runner.inputs is None:
        return None
    takes = len(runner.inputs)
    if takes != len(flat):
        return f"it takes {takes} input{'s' * (takes != 1)}, not {len(flat)}"
    for info, x in zip(runner.inputs, flat):
        if len(info.shape) != x.dim():
            return (f"its input {printable(info.name)[:80]!r} has {len(info.shape)} dims "
                    f"({'x'.join(map(str, info.shape)) or 'a scalar'}), not {x.dim()}")
        spec = info.spec  # a dynamic dim out of range is the runtime's to refuse: the loaders say how to widen it
        if spec is not None and (x.dtype != spec.torch_dtype or not all(d.dynamic or d.accepts(n) for d, n in zip(spec.shape, x.shape))):
            return f"it takes {printable(spec.describe())[:200]}, not {describe_inputs([x])}"
    return None


def refuse_mismatch(runner: Runner, flat: Sequence[torch.Tensor]) -> None:
    """UsageError where `input_mismatch` finds that `flat` cannot be `runner`'s inputs. For the runtimes
    that do not say it themselves: ExecuTorch answers a wrong dtype or count with "error 0x12" and a
    native log line, onnxruntime with its own feed errors, a program's module with a failed guard ("Guard
    failed: x.size()[1] == 256", a pytree length) or runs another dtype than it was traced with."""
    if (why := input_mismatch(runner, flat)) is not None:
        from ..errors import UsageError

        raise UsageError(f"{runner.path}: {why} (pass the inputs the artifact was exported with)")


__all__ = ["Flat", "InputInfo", "Runner", "describe_inputs", "flat_tensors", "input_mismatch", "input_infos", "make_inputs", "program_inputs", "program_runner", "refuse_mismatch", "region_outputs"]
