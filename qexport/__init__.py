"""qexport: quantized PyTorch models as `invoke_quant` regions, through torch.export to .pt2,
AOTInductor, ExecuTorch and ONNX."""

from __future__ import annotations

from . import _upstream

_upstream.install()

from . import schemes  # noqa: E402
from .errors import (  # noqa: E402
    ArtifactError, ArtifactNotFoundError, BackendUnavailableError, CalibrationError, CorruptArtifactError, ExportError,
    InvalidSchemeError, LoweringError, ManifestMismatchError, NothingToQuantizeError, QExportError,
    RegionFormatError, SchemeError, UnknownSchemeError, UnsafeArtifactError, UnsupportedModuleError,
    UnsupportedVersionError, UsageError,
)
from .export import export  # noqa: E402
from .quantize import LayerDecision, QuantizationSummary, QuantizedModule, quantize  # noqa: E402
from .regions import Region, invoke_quant, regions  # noqa: E402
from .schemes import Scheme, SchemeMath  # noqa: E402

__version__ = "0.1.0"

# Stage entry points, imported on first use so `import qexport` stays light and each backend's
# heavy imports (Inductor, executorch, onnx) happen only when that backend is used.
_LAZY = {
    "save": "serializers", "load": "serializers", "inspect": "serializers",
    "compile": "qexport.lower.aoti", "load_compiled": "qexport.lower.aoti",
    "to_executorch": "qexport.lower.executorch",
    "to_onnx": "qexport.lower.onnx",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qexport' has no attribute {name!r}")


__all__ = [
    "ArtifactError", "ArtifactNotFoundError", "BackendUnavailableError", "CalibrationError", "CorruptArtifactError", "ExportError",
    "InvalidSchemeError", "LayerDecision", "LoweringError", "ManifestMismatchError", "NothingToQuantizeError",
    "QExportError", "QuantizationSummary", "QuantizedModule", "Region", "RegionFormatError", "Scheme", "SchemeError",
    "SchemeMath", "UnknownSchemeError", "UnsafeArtifactError", "UnsupportedModuleError", "UnsupportedVersionError", "UsageError",
    "__version__", "compile", "export", "inspect", "invoke_quant", "load", "load_compiled", "quantize",
    "regions", "save", "schemes", "to_executorch", "to_onnx",
]
