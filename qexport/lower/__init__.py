"""Backends: each lowers an ExportedProgram's regions by their schemes (aoti, executorch, onnx)."""

from __future__ import annotations

from os import PathLike
from typing import Any

import torch

from ..errors import LoweringError


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
