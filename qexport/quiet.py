"""The dependency warnings a clean qexport run (CLI or Python API) does not print, in one place, each with
the upstream reason it is noise. `qexport -v ...` or QEXPORT_VERBOSE=1 shows them all. Only the exact messages below are dropped; any
other warning or log line of these libraries still gets through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Callable, Iterator, TypeVar

_R = TypeVar("_R")

#: (logger, message pattern, why it is noise)
LOG_LINES: tuple[tuple[str, str, str], ...] = (
    ("torchao", r"Failed to load .*\.so",
     "torchao 0.18's wheel ships CUDA/mxfp8 extensions built for other Python and CUDA versions; it tries each "
     "on import and logs the failure, and qexport uses none of them"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported",
     "torchao 0.18 registers its Enums (KernelPreference, ...) as pytree constants, which torch 2.13 deprecates"),
    ("torch.onnx._internal.exporter._registration", r"torchvision is not installed",
     "torch.onnx's exporter registers torchvision's detection ops when it can and logs each one it cannot"),
    ("onnxscript.optimizer._constant_folding", r"^Evaluation failed: ",
     "onnxscript 0.7's constant folding runs onnx's reference evaluator on any node whose inputs look constant and "
     "logs each it cannot evaluate (RoBERTa's position ids: a Reshape to a shape known only at run time); the node "
     "is kept unfolded and onnxruntime runs it"),
    ("onnxscript.version_converter", r"^The model version conversion is not supported by the onnxscript version "
                                     r"converter and fallback is enabled",
     "to_onnx takes a model past onnxscript's newest opset with onnx's C converter on purpose "
     "(qexport.lower.onnx._converter_max); a conversion that fails is still logged, and to_onnx raises"),
)
#: (warning category, message pattern, why it is noise)
WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "torch 2.13 deprecates LeafSpec, and deep copies of programs (torch.export, executorch) still make "
     "TreeSpec's copyreg reduction check it: one warning per copied spec"),
    (UserWarning, r"^Mutation on a buffer in the model is detected\. ExecuTorch assumes",
     "ExecuTorch 1.5's emitter warns that mutated buffers start uninitialized whether or not their initial "
     "value is kept; to_executorch keeps every one's (InitializedMutableBufferPass)"),
    (UserWarning, r"^While compiling, we found certain side effects happened in the model\.forward\. Here are the list of "
                  r"potential sources you can double check: \[((, )?\"(L\['self'\]\._modules\['_export_root'\]\.cache\.layers"
                  r"\[\d+\]|G\['__import_transformers_dot_utils_dot_output_capturing'\]\._active_collector)\")+\]$",
     "torch 2.13's strict export lists attribute writes it traced as side effects; export_lm(strict=True) writes "
     "its static cache's layers (and transformers 5 its output collector) on purpose. Only a list of those sources "
     "is dropped: a model's own side effects are still shown"),
    (UserWarning, r"^Detected pickle protocol \d+ in the checkpoint",
     "torch 2.13's weights_only unpickler warns on a file pickled with a protocol torch.save does not write (a "
     "plain pickle.dump, e.g. a --calibrate file); it then reads the file or refuses it, and qexport says which"),
)
#: native stderr lines of ExecuTorch's runtime, printed by C++ while a method loads
NATIVE_LINES = re.compile(
    r"^\[cpuinfo_utils\.cpp:\d+\] .*$",  # XNNPACK's threadpool probing ARM `midr` files on x86 (one line each)
    re.MULTILINE,
)

_quiet = False


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def install() -> None:
    """Drop the known noise for the rest of the process: `import qexport` calls this unless
    QEXPORT_VERBOSE=1 (the Python API is as quiet as the CLI), `qexport -v` undoes it."""
    global _quiet
    if _quiet:
        return
    for logger, pattern, _why in LOG_LINES:
        f = _DropMessages(pattern)
        logging.getLogger(logger).addFilter(f)
        _installed.append((logging.getLogger(logger), f))
    for category, pattern, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    _quiet = True


def uninstall() -> None:
    """Show every dependency line again (`qexport -v`)."""
    global _quiet
    for logger, f in _installed:
        logger.removeFilter(f)
    _installed.clear()
    for category, pattern, _why in WARNINGS:
        warnings.filters[:] = [w for w in warnings.filters
                               if not (w[0] == "ignore" and w[2] is category and getattr(w[1], "pattern", None) == pattern)]
    _quiet = False


@contextlib.contextmanager
def log_lines_dropped(logger: str, pattern: str) -> Iterator[None]:
    """Around one call whose caller has already checked what a dependency's log line warns about: that
    logger's lines matching `pattern` are dropped for the call only (not process-wide, as LOG_LINES are:
    the same line from a caller that checked nothing still gets through). Does nothing unless `install()` ran."""
    if not _quiet:
        yield
        return
    target, f = logging.getLogger(logger), _DropMessages(pattern)
    target.addFilter(f)
    try:
        yield
    finally:
        target.removeFilter(f)


@contextlib.contextmanager
def native_stderr() -> Iterator[None]:
    """Around a native call that prints known noise to the C stderr (fd 2): capture what it prints and
    pass on every line but the known ones. Does nothing unless `install()` ran."""
    if not _quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = NATIVE_LINES.sub("", captured.read().decode(errors="replace"))
            text = "\n".join(line for line in text.splitlines() if line.strip())
            if text:  # runtimes' logs quote a model's names, which its author chose: no raw escapes
                from .table import printable

                print(printable(text, keep="\n"), file=sys.stderr)


def first_call_quiet(fn: Callable[..., _R]) -> Callable[..., _R]:
    """`fn`, with its first call inside `native_stderr`: a runtime that sets itself up lazily prints its
    noise then (ExecuTorch's threadpool reads the `cpuinfo` files on the first execution of a `.pte` whose
    load initialised no delegate: a portable-target one). Only the first: swapping fd 2 on every call
    would add its cost to each timed call of `bench`."""
    first = True

    def call(*args, **kwargs):
        nonlocal first
        if not first:
            return fn(*args, **kwargs)
        with native_stderr():
            out = fn(*args, **kwargs)
        first = False
        return out

    return call
