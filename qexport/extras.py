"""The optional extras (`pip install 'qexport[executorch]'`, `'qexport[onnx]'`, `'qexport[all]'`) and the
error that names the one a missing import needs. Core qexport (quantize, export, .pt2, AOTInductor) needs
only torch and numpy."""

from __future__ import annotations

from .errors import BackendUnavailableError

#: top-level module -> the extra that installs it (pyproject.toml [project.optional-dependencies])
EXTRAS = {
    "executorch": "executorch",
    "onnx": "onnx", "onnx_ir": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "ml_dtypes": "onnx",
}


def missing_extra(e: ImportError, what: str) -> BackendUnavailableError | None:
    """The BackendUnavailableError for `e` if it is an extra's module that is not installed, else None."""
    top = (getattr(e, "name", None) or "").split(".")[0]
    if not isinstance(e, ModuleNotFoundError) or top not in EXTRAS:
        return None
    return _not_installed(top, what)


def require(extra: str, what: str) -> None:
    """BackendUnavailableError naming the pip command if a module of `extra` is not installed. Looked
    up, not imported: a stage's module imports its backend only when the stage runs (so that planning
    works without it), and a caller checking every stage first must not pay for the imports."""
    import importlib.util

    for top, name in EXTRAS.items():
        if name == extra and importlib.util.find_spec(top) is None:
            raise _not_installed(top, what)


def _not_installed(top: str, what: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"{what} needs {top}, which is not installed: pip install 'qexport[{EXTRAS[top]}]' "
        f"(or 'qexport[all]' for every backend)")
