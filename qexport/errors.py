"""One exception hierarchy for everything qexport refuses.

Every error names what was wrong and what to do about it, and is raised before any work is done
(no partial files, no half-quantized models).
"""

from __future__ import annotations


class QExportError(Exception):
    """Root of every error qexport raises on purpose."""


class SchemeError(QExportError):
    """A scheme could not be resolved or is inconsistent."""


class UnknownSchemeError(SchemeError, KeyError):
    """A scheme name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InvalidSchemeError(SchemeError, ValueError):
    """A scheme parameter out of range, or one that does not fit the module it is applied to."""


class UnsupportedModuleError(QExportError, TypeError):
    """A module the scheme cannot quantize was selected."""


class QuantizedWeightError(QExportError, RuntimeError):
    """Code computed with the `.weight` of a quantized layer, which stands in for the float weight's
    dtype, shape and device but holds no values."""


class CalibrationError(QExportError, ValueError):
    """A static scheme without (usable) calibration data."""


class NothingToQuantizeError(QExportError, ValueError):
    """quantize() found no module to replace."""


class ExportError(QExportError):
    """torch.export could not capture the model, or the result is not what qexport needs."""


class RegionFormatError(QExportError):
    """A graph node that claims to be a qexport region but cannot be read."""


class ArtifactError(QExportError):
    """An artifact on disk could not be read or written."""


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """The path does not exist."""


class CorruptArtifactError(ArtifactError):
    """The file exists but is not a readable artifact (not a zip, truncated, damaged)."""


class ManifestMismatchError(ArtifactError):
    """The manifest stored in an artifact does not describe the graph stored beside it."""


class UnsupportedVersionError(ArtifactError):
    """A format or schema version newer than this qexport can read."""


class IncompatibleCPUError(ArtifactError):
    """An artifact built for CPUs this one is not: an AOTInductor package compiled for features
    (AVX-512, VNNI, AMX, ...) it lacks, an ONNX file whose int8 form is wrong on it."""


class LoweringError(QExportError):
    """A backend could not lower a program."""


class UnsafeArtifactError(ArtifactError):
    """An archive that would run pickled code on load (pickled tensors, objects or example inputs)."""


class UsageError(QExportError, ValueError):
    """An argument that cannot be understood: on the command line (input spec, --scheme-arg, TARGET) or
    given to a function (a filter_fn that is not a filter_fn(module, fqn))."""


class NotALanguageModelError(ArtifactError):
    """`generate` was given an artifact that was not exported for generation (no generation record)."""


class GenerationError(QExportError, ValueError):
    """A generation request the artifact cannot serve: token ids outside its vocabulary, a prompt
    and token count beyond its KV cache, an empty prompt."""


class BackendUnavailableError(QExportError, ImportError):
    """A stage (serializer or backend) that this installation does not provide."""


__all__ = [name for name in dir() if name.endswith("Error")]
