"""`export(model, args)`: torch.export with the checks qexport's later stages rely on."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from . import validate
from .errors import ExportError, QuantizedWeightError
from .quantize import quantized_modules
from .passes import canonicalize_region_operands, name_regions
from .regions import is_region_node, iter_region_nodes, region_payload, set_region_payload
from .signature import names_from_dynamic_shapes, record_dim_names


def export(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """`torch.export.export` of a (quantized) model: one `invoke_quant` HOP per quantized module.

    The result is a plain ExportedProgram (verifier-clean, `run_decompositions()`-able).
    """
    if not isinstance(model, nn.Module):
        raise ExportError(f"export() takes an nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise ExportError(f"args must be a tuple of example inputs, got {type(args).__name__}; write (x,) for one input")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ExportError(f"kwargs must be a dict of keyword example inputs, got {type(kwargs).__name__}")
    if not isinstance(strict, bool):  # strict="no" is truthy: it would silently trace with Dynamo
        raise ExportError(f"strict must be True or False, got {strict!r}")
    validate.check_export_inputs(model, args, kwargs)
    # Deployment export is inference: trace in eval mode, then give every module its own mode back
    # (model.train(flag) would also flip submodules the user had put in eval, e.g. turning dropout on).
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
    except NotImplementedError:
        # a program's module (ep.module(), e.g. a loaded .pt2 being re-exported or wrapped) refuses
        # eval(): its graph keeps the mode it was traced in; the flags of the modules around it still go
        for m in modes:
            m.training = False
    try:
        with _paths_from(model), _program_paths_from(model):
            ep = torch.export.export(model, args, dict(kwargs or {}), dynamic_shapes=dynamic_shapes, strict=strict)
    except QuantizedWeightError:  # the model's own forward read a quantized weight's values: that error names the layer and the fix
        raise
    except Exception as e:  # torch's messages are long; keep them, but say which stage failed
        raise ExportError(f"torch.export failed ({'strict' if strict else 'non-strict'}): {type(e).__name__}: {e}") from e
    finally:
        for m, training in modes.items():
            m.training = training
    if strict:
        # Dynamo cannot build the value-less stand-in a quantized layer's `.weight` answers with, so
        # there it is a `torch.empty` (QuantizedModule.weight), dead once only its metadata was read
        ep.graph_module.graph.eliminate_dead_code()
        ep.graph_module.recompile()
    _check_every_weight_is_read(model, ep)
    validate.check_region_inputs(ep)
    canonicalize_region_operands(ep)
    name_regions(ep)
    record_dim_names(ep, names_from_dynamic_shapes(ep, model.forward, args, dict(kwargs or {}), dynamic_shapes))
    return ep


def _check_every_weight_is_read(model: nn.Module, ep: torch.export.ExportedProgram) -> None:
    """Every quantized weight reaches the graph through a region: a quantized module without one is
    an error unless a module tied to it (sharing its tensors) has one, as T5's `shared` embedding,
    which the model reads through `encoder.embed_tokens`."""
    with_region = {p.module for p in map(region_payload, iter_region_nodes(ep)) if p is not None}
    modules = quantized_modules(model)
    read = {id(m.tensors()["weight"]) for path, m in modules if path in with_region}
    missing = [path for path, m in modules if path not in with_region and id(m.tensors()["weight"]) not in read]
    if missing:
        raise ExportError(
            f"{len(missing)} quantized module(s) have no region in the exported graph ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): a quantized module the forward never calls is not exported; "
            f"leave it out of the recipe (quantize(model, {{..., {missing[0]!r}: None}})) or call it"
        )


@contextlib.contextmanager
def _paths_from(model: nn.Module) -> Iterator[None]:
    """Name each quantized module's region by its path from `model` while it is traced.

    Why: a region finds its tensors as `<module path>.<role>` among the program's buffers, which are
    named from the exported root; a model quantized and then wrapped (`export_lm`'s cache module, a
    user's pre/post-processing module) was quantized under other paths."""
    found = quantized_modules(model)
    saved = {m: m.module_path for _, m in found}
    for fqn, m in found:
        m.module_path = fqn
    try:
        yield
    finally:
        for m, path in saved.items():
            m.module_path = path


@contextlib.contextmanager
def _program_paths_from(model: nn.Module) -> Iterator[None]:
    """The same for the regions of an exported program's module placed inside `model` (`ep.module()`
    of a loaded .pt2, or torch.export.unflatten(ep), wrapped in pre/post-processing): their payloads
    name paths from that program's root, so a wrapped one's tensors (`inner.0.weight`) were looked for
    under `0.weight` and export failed ("two operands claim role 'input'"). Each is prefixed with
    where the program sits while `model` is traced."""
    changed: list[tuple[torch.fx.Node, dict]] = []
    codegen: set[torch.fx.GraphModule] = set()  # what runs a changed graph as generated code
    roots = [(p, m) for p, m in model.named_modules() if p and isinstance(m, (torch.fx.GraphModule, torch.export.UnflattenedModule))]
    for path, root in [(p, m) for p, m in roots if not any(p.startswith(f"{q}.") for q, _ in roots)]:
        for m in root.modules():
            graph = getattr(m, "graph", None)
            for node in [n for n in graph.nodes if is_region_node(n)] if isinstance(graph, torch.fx.Graph) else ():
                payload = region_payload(node)
                if payload is not None and payload.module:
                    changed.append((node, dict(node.kwargs)))
                    set_region_payload(node, payload.replace(module=f"{path}.{payload.module}", name=None))  # named after export
                    # an unflattened program's InterpreterModule runs its graph_module's code under Dynamo
                    codegen.add(m if isinstance(m, torch.fx.GraphModule) else m.__dict__.get("graph_module"))
    codegen.discard(None)
    for gm in codegen:
        gm.recompile()
    try:
        yield
    finally:
        for node, kwargs in changed:
            node.kwargs = kwargs
        for gm in codegen:
            gm.recompile()
