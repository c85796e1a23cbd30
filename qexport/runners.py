"""Run any qexport artifact: one loader for `.pt2` programs, AOTInductor packages, ExecuTorch `.pte`
and ONNX files, plus what `verify`, `bench` and the demo build on it. The code lives in
`qexport.runtime`, one module per job; this module is its public face, as it always was.

Every runner takes and returns a *flat* list of tensors (the program's user inputs in graph order,
its outputs flattened), because that is the one calling convention all four runtimes share.
"""

from __future__ import annotations

from .runtime import *  # noqa: F401,F403
from .runtime import __all__
