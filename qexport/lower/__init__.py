"""Backends: each lowers an ExportedProgram's regions by their schemes (aoti, executorch, onnx).

Every backend plans its regions through one contract (`_contract.py`): `plan_regions(program, backend)`
asks the lowerings registered with `register_lowering(scheme_or_family, backend, op)` and returns one
`RegionPlan` per region, whose `record()` every artifact's manifest stores."""

from __future__ import annotations

from os import PathLike
from typing import Any

import torch

from ..errors import LoweringError
from ._contract import (
    Backend, Decline, PlanContext, RegionPlan, backends, get_backend, lowerings_for, plan_regions, register_backend,
    register_lowering, unregister_backend, unregister_lowering,
)

__all__ = [
    "Backend", "Decline", "PlanContext", "RegionPlan", "backends", "get_backend", "lowerings_for", "plan_regions",
    "register_backend", "register_lowering", "resolve_program", "unregister_backend", "unregister_lowering",
]


def resolve_program(program_or_path: Any, stage: str) -> torch.export.ExportedProgram:
    """The program a backend entry point was given: an ExportedProgram, or a qexport .pt2 read with
    serializers.load (which checks the archive and its manifest)."""
    if isinstance(program_or_path, torch.export.ExportedProgram):
        return program_or_path
    if isinstance(program_or_path, (str, PathLike)):
        import serializers

        return serializers.load(program_or_path)
    raise LoweringError(
        f"{stage}() takes an ExportedProgram or the path of a .pt2 written by qexport.save (from "
        f"qexport.export), got {type(program_or_path).__name__}"
    )
