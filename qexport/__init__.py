"""qexport: quantized PyTorch models as `invoke_quant` regions, through torch.export to .pt2,
AOTInductor, ExecuTorch and ONNX."""

from __future__ import annotations

from . import _upstream

_upstream.install()

from . import schemes  # noqa: E402
from .errors import (  # noqa: E402
    ArtifactError, ArtifactNotFoundError, CalibrationError, CorruptArtifactError, ExportError,
    InvalidSchemeError, LoweringError, ManifestMismatchError, NothingToQuantizeError, QExportError,
    RegionFormatError, SchemeError, UnknownSchemeError, UnsupportedModuleError, UnsupportedVersionError,
)
from .export import export  # noqa: E402
from .quantize import QuantizedModule, quantize  # noqa: E402
from .regions import Region, invoke_quant, regions  # noqa: E402
from .schemes import Scheme, SchemeMath  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "ArtifactNotFoundError", "CalibrationError", "CorruptArtifactError", "ExportError",
    "InvalidSchemeError", "LoweringError", "ManifestMismatchError", "NothingToQuantizeError",
    "QExportError", "QuantizedModule", "Region", "RegionFormatError", "Scheme", "SchemeError",
    "SchemeMath", "UnknownSchemeError", "UnsupportedModuleError", "UnsupportedVersionError",
    "__version__", "export", "invoke_quant", "quantize", "regions", "schemes",
]
