"""Graph passes over exported programs that every backend relies on. Each returns whether it changed
the graph, in the manner of onnx-ir's PassResult."""

from __future__ import annotations

import torch

from .errors import RegionFormatError
from .regions import iter_region_nodes, operand_state, region_nodes, region_payload, set_region_payload, storage_key


def canonicalize_region_operands(ep: torch.export.ExportedProgram) -> bool:
    """Put every region's operands in the order its payload's `roles` names.

    Why: strict export (Dynamo) lifts a HOP body's inputs in the order the body first *uses* them,
    not the order they were passed, so `roles` would no longer line up with the node's operands.
    Each quantized tensor is a buffer named `<module>.<role>`, which identifies it; the one
    operand that is not such a buffer is the activation input. A tied weight (one tensor registered
    in several quantized modules) is lifted as one placeholder per name but the graph reads only one
    of them, so an operand answers to every name of its bytes (`storage_key`: a program read back by
    torch.export.load, re-exported, holds one tensor object per name over the same storage).
    """
    names_of: dict[object, list[str]] = {}
    for fqn, t in ep.state_dict.items():
        names_of.setdefault(storage_key(t), []).append(fqn)
    changed = False
    for node in iter_region_nodes(ep):
        payload = region_payload(node)
        if payload is None or not payload.module:
            continue
        roles = payload.roles
        operands = list(node.args[1:])
        by_role: dict[str, object] = {}
        prefix = payload.module + "."
        for a in operands:
            state = operand_state(ep, a)
            names = names_of.get(storage_key(state[1]), [state[0]]) if state else []
            own = next((n for n in names if n.startswith(prefix)), None)
            role = own[len(prefix):] if own else "input"
            if role in by_role:
                raise RegionFormatError(f"region {payload.module}: two operands claim role {role!r}")
            by_role[role] = a
        if sorted(by_role) != sorted(roles):
            raise RegionFormatError(
                f"region {payload.module}: operands {sorted(by_role)} do not match its roles {sorted(roles)}"
            )
        perm = [operands.index(by_role[r]) for r in roles]
        if perm == list(range(len(operands))):
            continue
        sub = getattr(ep.graph_module, node.args[0].target)
        phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        anchor = next(n for n in sub.graph.nodes if n.op != "placeholder")
        for i in perm:
            anchor.prepend(phs[i])
        sub.recompile()
        node.args = (node.args[0], *(operands[i] for i in perm))
        changed = True
    if changed:
        ep.graph_module.recompile()
    return changed


def name_regions(ep: torch.export.ExportedProgram) -> bool:
    """Record each region's unique name (`regions.region_nodes`) in its payload.

    Why in the graph: the ONNX exporter's translation of a region sees only the node's arguments, and
    a name derived again from the module path would give a shared module's regions one name.
    """
    changed = False
    for node, region in region_nodes(ep):
        payload = region_payload(node)
        if payload is not None and payload.name != region.name:
            set_region_payload(node, payload.replace(name=region.name))
            changed = True
    if changed:
        ep.graph_module.recompile()
    return changed
