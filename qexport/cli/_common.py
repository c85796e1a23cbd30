"""Helpers every subcommand shares: input specs, --scheme-arg parsing, TARGET import, output paths,
progress display and number formatting. Each parser raises UsageError naming the bad argument and
what a good one looks like, before any work starts."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..errors import ArtifactError, UsageError
from ..runtime import STAGES, stage  # noqa: F401  (re-exported for the subcommands)

# --------------------------------------------------------------------------------------------------
# --input SHAPE[:DTYPE[:HIGH]]

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "float16": torch.float16,
    "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
INPUT_SPEC_HELP = (
    "an example input: SHAPE[:DTYPE[:HIGH]], e.g. 1x256, 4x3x32x32:float32, 1x16:int64:256 "
    "(integer inputs are drawn from [0, HIGH); HIGH defaults to the model's first nn.Embedding size). "
    "Repeat for several inputs"
)


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int | None = None

    def __str__(self) -> str:
        s = "x".join(map(str, self.shape)) + ":" + str(self.dtype).removeprefix("torch.")
        return s + (f":{self.high}" if self.high is not None else "")

    def make(self, generator: torch.Generator, default_high: int = 2, batch: int | None = None) -> torch.Tensor:
        shape = (batch, *self.shape[1:]) if batch is not None and self.shape else self.shape
        try:
            if self.dtype.is_floating_point:
                return torch.randn(shape, generator=generator).to(self.dtype)
            if self.dtype == torch.bool:
                return torch.ones(shape, dtype=torch.bool)
            return torch.randint(0, self.high or default_high, shape, generator=generator, dtype=self.dtype)
        except (RuntimeError, MemoryError) as e:  # torch's "Storage size calculation overflowed", "can't allocate"
            raise UsageError(f"--input {self}: cannot make this example input "
                             f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None


def parse_input_spec(text: str, what: str = "--input") -> InputSpec:
    """SHAPE[:DTYPE[:HIGH]] as --input takes it; `what` names where `text` came from in errors."""
    parts = text.strip().split(":")
    example = "e.g. 1x256, 4x3x32x32:float32 or 1x16:int64:256"
    if not parts[0] or len(parts) > 3:
        raise UsageError(f"{what} {text!r}: expected SHAPE[:DTYPE[:HIGH]], {example}")
    try:
        shape = tuple(int(d) for d in parts[0].replace(",", "x").split("x"))
    except ValueError:
        raise UsageError(f"{what} {text!r}: shape {parts[0]!r} is not dimensions joined by 'x', {example}") from None
    if any(d <= 0 for d in shape):
        raise UsageError(f"{what} {text!r}: every dimension must be positive")
    dtype = torch.float32
    if len(parts) > 1 and parts[1]:
        if parts[1] not in _DTYPES:
            raise UsageError(f"{what} {text!r}: unknown dtype {parts[1]!r}; use one of {', '.join(sorted(set(_DTYPES)))}")
        dtype = _DTYPES[parts[1]]
    high = None
    if len(parts) > 2:
        if dtype.is_floating_point or dtype == torch.bool:
            raise UsageError(f"{what} {text!r}: HIGH only applies to integer inputs")
        try:
            high = int(parts[2])
        except ValueError:
            high = 0
        if high <= 0:
            raise UsageError(f"{what} {text!r}: HIGH {parts[2]!r} must be a positive integer (values are drawn from [0, HIGH))")
        if high - 1 > torch.iinfo(dtype).max:
            raise UsageError(f"{what} {text!r}: HIGH {parts[2]!r} is past {parts[1]}'s largest value, {torch.iinfo(dtype).max}")
    return InputSpec(shape, dtype, high)


def default_int_high(model: nn.Module) -> int:
    """Where integer example inputs come from when the spec names no HIGH: the first embedding's rows
    (token ids of a language model), else {0, 1}."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    return 2


# --------------------------------------------------------------------------------------------------
# --scheme-arg k=v


def _coerce(key: str, raw: str, current: Any, optional: bool) -> Any:
    low = raw.strip().lower()
    if low in ("none", "null") and optional:  # activation=none is the text "none", not None
        return None
    if isinstance(current, bool):
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise UsageError(f"--scheme-arg {key}={raw}: {key} is a boolean; write {key}=true or {key}=false")
    if isinstance(current, int) or (current is None and low.lstrip("-").isdigit()):
        try:
            return int(raw)
        except ValueError:
            raise UsageError(f"--scheme-arg {key}={raw}: {key} is an integer") from None
    if isinstance(current, float):
        try:
            f = float(raw)
        except ValueError:
            raise UsageError(f"--scheme-arg {key}={raw}: {key} is a number") from None
        return int(f) if f.is_integer() else f
    return raw


def parse_scheme_args(scheme_name: str, pairs: Sequence[str]) -> dict[str, Any]:
    """`["group_size=64", "symmetric=false"]` -> {"group_size": 64, "symmetric": False}, each value
    coerced to the type of the field it overrides in the registered scheme `scheme_name`."""
    import dataclasses

    from ..schemes import Scheme, get, math_for

    base = get(scheme_name)  # UnknownSchemeError (with a "did you mean") comes first
    shorthands = math_for(base).shorthands  # e.g. int8's reduce_range=true, a flag
    settable = [f for f in Scheme.FIELDS if f not in ("name", "family", "version")] + list(shorthands)
    optional = {f.name for f in dataclasses.fields(Scheme) if "None" in str(f.type)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--scheme-arg {pair!r}: expected KEY=VALUE, e.g. group_size=64")
        if key not in settable:
            raise UsageError(f"--scheme-arg {pair!r}: {scheme_name} has no parameter {key!r}; parameters: {', '.join(settable)}")
        out[key] = _coerce(key, raw, False if key in shorthands else getattr(base, key), key in optional)
    return out


# --------------------------------------------------------------------------------------------------
# TARGET "package.module:callable" or "path/to/file.py:callable"


def import_target(target: str) -> Any:
    """The object TARGET names. Errors say which half (module or attribute) was wrong."""
    mod_name, sep, attr = target.rpartition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"TARGET {target!r}: expected package.module:callable (e.g. qexport.models:TinyNet) or file.py:callable")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise UsageError(f"TARGET {target!r}: file {mod_name} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UsageError(f"TARGET {target!r}: running {mod_name} failed: {type(e).__name__}: {e}") from e
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory resolve
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                raise UsageError(f"TARGET {target!r}: no module named {e.name!r} (is it installed, or on PYTHONPATH?)") from None
            raise UsageError(f"TARGET {target!r}: importing {mod_name} failed: {e}") from e
        except Exception as e:
            raise UsageError(f"TARGET {target!r}: importing {mod_name} failed: {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))[:12]
            raise UsageError(f"TARGET {target!r}: {mod_name} has no attribute {attr!r}; it has: {', '.join(public)}")
        obj = getattr(obj, part)
    return obj


def build_model(target: str) -> nn.Module:
    """Import TARGET and call it (no arguments) to get the nn.Module; an nn.Module instance is used as is."""
    obj = import_target(target)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise UsageError(f"TARGET {target!r} is a {type(obj).__name__}, not a callable that returns an nn.Module")
        try:
            obj = obj()
        except SystemExit as e:  # sys:exit would end the CLI with status 0 having written nothing
            raise UsageError(f"TARGET {target!r}: calling it exited the program (SystemExit {e.code!r}); it must return a torch.nn.Module") from None
        except Exception as e:
            raise UsageError(f"TARGET {target!r}: calling it with no arguments failed: {type(e).__name__}: {e}") from e
    if not isinstance(obj, nn.Module):
        raise UsageError(f"TARGET {target!r} returned a {type(obj).__name__}; it must return a torch.nn.Module")
    return obj.eval()


# --------------------------------------------------------------------------------------------------
# files and stages


def output_path(path: str, suffixes: Sequence[str], what: str = "output") -> Path:
    """Check, before any work, that an output file can be written at `path`."""
    from serializers.files import check_writable

    p = Path(path)
    if suffixes and p.suffix not in suffixes:
        raise UsageError(f"{what} {path!r} must end with {' or '.join(suffixes)}")
    try:
        return check_writable(p)
    except ArtifactError as e:
        raise type(e)(f"{what}: {e}") from None


def input_path(path: str, what: str = "file") -> Path:
    from serializers.inspect import check_readable

    try:
        return check_readable(path)
    except ArtifactError as e:
        raise type(e)(f"{what}: {e}") from None


# --------------------------------------------------------------------------------------------------
# progress and formatting


class Progress:
    """Numbered steps on stderr. On a terminal a step shows a live elapsed-time counter while it runs
    (Inductor and ExecuTorch lowering take tens of seconds and print nothing); elsewhere (pipes, CI
    logs) each step prints one line when it ends.

    Use `with progress.step(label):`, or `advance(label)` ... `close()` where the steps are driven
    by a callback (verify and bench report each artifact as they reach it)."""

    def __init__(self, total: int | None = None, stream=None, enabled: bool = True) -> None:
        self.total = total
        self.n = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._current: tuple[str, float, threading.Event, threading.Thread | None] | None = None

    def _prefix(self) -> str:
        return f"[{self.n}/{self.total}] " if self.total else ""

    def advance(self, label: str) -> None:
        """End the running step (as done) and start the next one."""
        self.close(ok=True)
        self.n += 1
        label = self._prefix() + label
        t0 = time.perf_counter()
        stop = threading.Event()
        ticker = None
        if self.live:
            def tick() -> None:
                i = 0
                spin = "|/-\\"
                while not stop.wait(0.2):
                    self.stream.write(f"\r{label} ... {time.perf_counter() - t0:5.1f} s {spin[i % 4]}")
                    self.stream.flush()
                    i += 1

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        self._current = (label, t0, stop, ticker)

    def close(self, ok: bool = True) -> None:
        """End the running step, if any."""
        if self._current is None:
            return
        label, t0, stop, ticker = self._current
        self._current = None
        stop.set()
        if ticker is not None:
            ticker.join()
        if self.enabled:
            line = f"{label} ... {'done' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s"
            self.stream.write(f"\r{line}\033[K\n" if self.live else line + "\n")
            self.stream.flush()

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.advance(label)
        try:
            yield
        except BaseException:
            self.close(ok=False)
            raise
        self.close(ok=True)


PIN_HELP = ("FILE=SHA256: refuse FILE unless its SHA-256 (what sha256sum prints) is this one; repeatable. "
            "An AOTI package is native code: pin the digest you got from a source you trust (docs/security.md)")


def parse_pins(values: Sequence[str] | None, files: Sequence[str]) -> dict[str, str]:
    """`--expected-sha256 FILE=HEX` values as {FILE: hex}; FILE must be one of `files`."""
    pins: dict[str, str] = {}
    known = {Path(f).resolve() for f in files}
    for value in values or ():
        path, sep, digest = value.rpartition("=")
        digest = digest.strip().lower()
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise UsageError(f"--expected-sha256 {value!r}: expected FILE=SHA256 with a 64-hex-digit SHA-256")
        if Path(path).resolve() not in known:
            raise UsageError(f"--expected-sha256 {value!r}: {path} is not one of the files given")
        pins[path] = digest
    return pins


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 10**15:  # past any real artifact (and past what a float holds, for a manifest's numbers)
        return f"{str(n)[:4]}… ({len(str(n))}-digit) B"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"
