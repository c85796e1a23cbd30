"""Three small additions to torch that make `invoke_quant` regions exportable (installed on import).

1. `InvokeQuant.__fx_create_arg__`: upstream's public `InvokeQuant()(fn, ...)` passes itself as
   `quant_options`; fx turns that frozen dataclass into a `call_function` node targeting the class,
   with no `meta["val"]`, which the export verifier rejects ("Node.meta invoke_quant is missing val
   field") and serde cannot write. fx's documented hook for "how does this value appear in a graph"
   is `__fx_create_arg__`; we lower the options to a plain dict literal, which every consumer
   (verifier, serde, run_decompositions, aot_eager) already handles.
2. Inductor's `canonicalize_quant_mapping` asserts that `quant_options` is such a node. We give it
   one back: a pre-step turns a dict `quant_options` into the transient `InvokeQuant(...)` node the
   pass expects (unknown keys, like qexport's own payload, are dropped there), so torch.compile with
   Inductor and AOTInductor keep upstream's behaviour, `codegen_low_precision` honoured.

3. Inductor's `invoke_quant` lowering marks the op behind each region output for low-precision
   codegen by asking the output for `get_operation_name()`, which a view does not implement: a region
   whose last op is a view (a linear on a 3-D activation ends in `mm` then `view`, as every
   user-defined scheme's fallback and `qexport.kernels="inductor"` int8_dynamic do) failed AOTInductor
   and torch.compile with `LoweringException: NotImplementedError: ReinterpretView`. While that
   lowering runs, a view answers with the name of the op that wrote the buffer it views.

And one name older torch lacks: `torch.export.pt2_archive.constants.OPAQUE_OBJ_FILENAME_PREFIX`
(torch 2.11, the CUDA image's, has no opaque objects), which the `.pt2` reader checks members against.

Importing this module (every stage does, through qexport.regions) refuses a torch older than 2.11 by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch

from .errors import BackendUnavailableError

#: the oldest torch release qexport is run against (docs/formats.md "Torch versions"); pyproject pins it too,
#: but a torch installed beside qexport (`--no-deps`, PYTHONPATH, a conda env) bypasses that pin
MIN_TORCH = (2, 11)


def check_torch_version(version: str) -> None:
    """Refuse a torch older than MIN_TORCH by name, before any stage fails somewhere inside torch."""
    try:
        release = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:  # a local build with an unusual version string: let it try
        return
    if release < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise BackendUnavailableError(
            f"qexport needs torch {need} or newer; this is torch {version}: pip install 'torch>={need}'")


check_torch_version(str(torch.__version__))

from torch._higher_order_ops import InvokeQuant  # noqa: E402  (after the version check: older torch may lack it)

_INSTALLED = False
#: torch >= 2.12's value (torch/csrc/export/pt2_archive_constants.h)
OPAQUE_OBJ_FILENAME_PREFIX = "opaque_obj_"


def _invoke_quant_fx_create_arg(self: InvokeQuant, tracer: torch.fx.Tracer) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _quant_options_to_node(gm: torch.fx.GraphModule) -> None:
    fields = {f.name for f in dataclasses.fields(InvokeQuant)}
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_quant_packed):
        opts = node.kwargs.get("quant_options")
        if isinstance(opts, dict):
            with gm.graph.inserting_before(node):
                opts_node = gm.graph.call_function(InvokeQuant, (), {k: v for k, v in opts.items() if k in fields})
            node.update_kwarg("quant_options", opts_node)


@contextlib.contextmanager
def _views_name_their_buffers() -> Iterator[None]:
    from torch._inductor import ir

    own = "get_operation_name" in vars(ir.BaseView)
    if not own:
        ir.BaseView.get_operation_name = lambda self: self.unwrap_view().get_operation_name()  # type: ignore[method-assign]
    try:
        yield
    finally:
        if not own:
            del ir.BaseView.get_operation_name


def _install_invoke_quant_lowering() -> None:
    from torch._inductor import lowering

    op = torch._higher_order_ops.invoke_quant
    upstream = lowering.lowerings.get(op)
    if upstream is None:
        return

    def invoke_quant_lowering(*args: Any, **kwargs: Any) -> Any:
        with _views_name_their_buffers():
            return upstream(*args, **kwargs)

    invoke_quant_lowering.__wrapped__ = upstream  # type: ignore[attr-defined]
    lowering.lowerings[op] = invoke_quant_lowering


def pt2_archive_constants_compat() -> None:
    """Give torch < 2.12 the archive constant the `.pt2` reader checks members against."""
    from torch.export.pt2_archive import constants

    # torch 2.11 writes no opaque-object members, so its archives never start with this name; without
    # it every `qexport.load` there failed with AttributeError before reading the archive.
    if not hasattr(constants, "OPAQUE_OBJ_FILENAME_PREFIX"):
        constants.OPAQUE_OBJ_FILENAME_PREFIX = OPAQUE_OBJ_FILENAME_PREFIX


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    InvokeQuant.__fx_create_arg__ = _invoke_quant_fx_create_arg  # type: ignore[attr-defined]
    pt2_archive_constants_compat()

    from torch._inductor.fx_passes import joint_graph

    upstream = joint_graph.canonicalize_quant_mapping

    def canonicalize_quant_mapping(gm: torch.fx.GraphModule) -> None:
        _quant_options_to_node(gm)
        upstream(gm)

    canonicalize_quant_mapping.__wrapped__ = upstream  # type: ignore[attr-defined]
    joint_graph.canonicalize_quant_mapping = canonicalize_quant_mapping
    _install_invoke_quant_lowering()
    _INSTALLED = True
