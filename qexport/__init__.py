"""qexport: quantized PyTorch models as `invoke_quant` regions, through torch.export to .pt2,
AOTInductor, ExecuTorch and ONNX."""

from __future__ import annotations

import importlib
import os as _os
import sys
import types

from .errors import (
    ArtifactError, ArtifactNotFoundError, BackendUnavailableError, CalibrationError, CorruptArtifactError, ExportError,
    GenerationError, IncompatibleCPUError, InvalidSchemeError, LoweringError, ManifestMismatchError, NotALanguageModelError,
    NothingToQuantizeError, QExportError, QuantizedWeightError,
    RegionFormatError, SchemeError, UnknownSchemeError, UnsafeArtifactError, UnsupportedModuleError,
    UnsupportedVersionError, UsageError,
)

__version__ = "0.1.0"

if _os.environ.get("QEXPORT_VERBOSE") != "1":
    from . import quiet

    quiet.install()  # only the exact dependency messages qexport/quiet.py names, each with its upstream reason

# Everything but the errors is imported on first use: `import qexport` (and the CLI's argument checks,
# e.g. `qexport inspect missing.pt2`) stays free of torch, and each backend's heavy imports (Inductor,
# executorch, onnx) happen only when that backend is used. torch's additions (_upstream.install) come
# with qexport.regions, which every stage imports.
_LAZY = {
    "export": "qexport.export",
    "quantize": "qexport.quantize", "QuantizedModule": "qexport.quantize", "QuantizationSummary": "qexport.quantize",
    "LayerDecision": "qexport.quantize", "FloatWeightStandIn": "qexport.quantize",
    "Region": "qexport.regions", "invoke_quant": "qexport.regions", "regions": "qexport.regions",
    "Scheme": "qexport.schemes", "SchemeMath": "qexport.schemes",
    "inspect": "serializers",
    "register_lowering": "qexport.lower", "register_backend": "qexport.lower", "plan_regions": "qexport.lower",
    "RegionPlan": "qexport.lower", "Decline": "qexport.lower", "PlanContext": "qexport.lower",
    "export_lm": "qexport.generation", "generate": "qexport.generation", "GenerationResult": "qexport.generation",
    "GenerationSpec": "qexport.generation",
}
#: attribute -> module; the demo is a CLI command that is also a library call (qexport.demo.run_demo)
_SUBMODULES = {"schemes": "qexport.schemes", "models": "qexport.models", "runners": "qexport.runners",
               "lower": "qexport.lower", "demo": "qexport.cli.demo_cmd", "generation": "qexport.generation"}


def __getattr__(name: str):
    if name in _LAZY:
        return _import(_LAZY[name], name)
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    if name in __all__:  # a stage that writes or loads an artifact kind: the kind table names its module
        from serializers.kinds import stages

        if name in stages():
            return _import(stages()[name][0], name)
    raise AttributeError(f"module 'qexport' has no attribute {name!r}")


def _import(module_name: str, name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        from .extras import missing_extra

        raise (missing_extra(e, f"qexport.{name}") or e) from None
    return getattr(module, name)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing the submodule qexport.export (or .quantize, .regions) makes the import system set
        # that name on the package to the module, shadowing the function of the same name: keep the
        # function (resolved by __getattr__), as an eager `from .export import export` used to.
        if name in _LAZY and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES) | set(__all__))


__all__ = [
    "ArtifactError", "ArtifactNotFoundError", "BackendUnavailableError", "CalibrationError", "CorruptArtifactError", "Decline",
    "ExportError", "FloatWeightStandIn", "GenerationError", "GenerationResult", "GenerationSpec",
    "IncompatibleCPUError", "InvalidSchemeError", "LayerDecision", "LoweringError", "ManifestMismatchError",
    "NotALanguageModelError", "NothingToQuantizeError",
    "PlanContext", "QExportError", "QuantizationSummary", "QuantizedModule", "QuantizedWeightError", "Region", "RegionFormatError", "RegionPlan",
    "Scheme", "SchemeError", "SchemeMath", "UnknownSchemeError", "UnsafeArtifactError", "UnsupportedModuleError",
    "UnsupportedVersionError", "UsageError", "__version__", "compile", "export", "export_lm", "generate", "inspect", "invoke_quant", "load",
    "load_compiled", "plan_regions", "quantize", "regions", "register_backend", "register_lowering", "save", "schemes",
    "to_executorch", "to_onnx",
]
