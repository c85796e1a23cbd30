"""The `Scheme` record and the `SchemeMath` contract every scheme family implements.

A `Scheme` is pure data: it is what travels inside graphs and artifacts (`to_dict()` is JSON-safe).
The math behind it (quantize a weight, dequantize it, quantize activations) lives in one
`SchemeMath` object per family, found through the registry by `scheme.family`.

Versioning follows torch.export's serde: SCHEME_VERSION is bumped when a field changes meaning or
is removed; a new optional field (with a default) keeps the version. `from_dict` refuses versions
newer than this code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..errors import InvalidSchemeError, UnsupportedVersionError

SCHEME_VERSION = 1

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
ACTIVATIONS = ("none", "dynamic", "static")
ACT_GRANULARITIES = ("per_token", "per_tensor")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Ops a quantized module can wrap in a region; "custom" is a region written by hand with invoke_quant.
OPS = ("linear", "conv1d", "conv2d", "embedding")
# How a weight's codes and quantization parameters are chosen (schemes/algorithms.py): round to
# nearest, half-quadratic optimisation (calibration-free, int4), least-squares scale (calibration-free,
# int8), GPTQ (from calibration inputs).
ALGORITHMS = ("rtn", "hqq", "mse", "gptq")


@dataclass(frozen=True)
class Scheme:
    """How a weight (and optionally the activation) is quantized. JSON-safe and versioned."""

    name: str
    family: str
    weight_dtype: str
    bits: int
    granularity: str
    group_size: int | None = None
    symmetric: bool = True
    qmin: float = -127
    qmax: float = 127
    activation: str = "none"
    act_dtype: str | None = None
    act_granularity: str | None = None
    act_symmetric: bool | None = None
    compute_dtype: str = "float32"
    version: int = SCHEME_VERSION
    #: how the weights' codes were chosen; the dequantization math does not depend on it, so every
    #: backend lowers a region the same whatever its algorithm (added in version 1, default "rtn")
    algorithm: str = "rtn"

    FIELDS: ClassVar[tuple[str, ...]] = ()  # filled below

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in Scheme.FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Scheme":
        if not isinstance(data, Mapping):
            raise InvalidSchemeError(f"a scheme dict was expected, got {type(data).__name__}")
        version = data.get("version", SCHEME_VERSION)
        if not isinstance(version, int) or version > SCHEME_VERSION:
            raise UnsupportedVersionError(
                f"scheme {str(data.get('name'))[:60]!r} has schema version {repr(version)[:40]}; this qexport reads "
                f"versions up to {SCHEME_VERSION}: upgrade qexport"
            )
        unknown = set(data) - set(cls.FIELDS)
        if unknown:
            raise InvalidSchemeError(f"unknown scheme field(s) {sorted(unknown)}; known: {list(cls.FIELDS)}")
        missing = {"name", "family", "weight_dtype", "bits", "granularity"} - set(data)
        if missing:
            raise InvalidSchemeError(f"scheme dict lacks required field(s) {sorted(missing)}")
        _check_types(data)
        scheme = cls(**dict(data))
        _check_common(scheme)
        return scheme

    def replace(self, **changes: Any) -> "Scheme":
        unknown = set(changes) - set(Scheme.FIELDS)
        if unknown:
            raise InvalidSchemeError(
                f"{self.name}: unknown parameter(s) {sorted(unknown)}; valid parameters: "
                f"{[f for f in Scheme.FIELDS if f not in ('name', 'family', 'version')]}"
            )
        if "version" in changes and changes["version"] != self.version:
            # the version says which schema wrote the fields, not a choice: a scheme claiming a newer
            # one is refused by this qexport's own loader ("upgrade qexport"), an older one is a lie
            raise InvalidSchemeError(
                f"{self.name}: version is the scheme schema's ({SCHEME_VERSION}), not a parameter; leave it out"
            )
        return dataclasses.replace(self, **changes)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)

    @property
    def is_weight_only(self) -> bool:
        return self.activation == "none"

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this scheme needs calibration inputs (static activation ranges, or
        the input statistics GPTQ fits the weights to)."""
        return self.activation == "static" or self.algorithm == "gptq"

    def params(self) -> dict[str, Any]:
        """The fields that differ from the registered scheme of the same name (for reports)."""
        base = REGISTERED.get(self.name)
        if base is None:  # a scheme that is not registered here: every field is a parameter
            return {k: v for k, v in self.to_dict().items() if k not in ("name", "version")}
        return {k: v for k, v in self.to_dict().items() if getattr(base, k) != v}

    def describe(self) -> str:
        """A short human label, e.g. `int4_weight_only(g128, asym, bf16)`."""
        parts = [self.granularity.replace("per_", "")]
        if self.group_size:
            parts[-1] = f"g{self.group_size}"
        parts.append("sym" if self.symmetric else "asym")
        if self.activation != "none":
            parts.append(f"act={self.activation}:{self.act_granularity}")
        parts.append(self.compute_dtype.replace("float", "fp").replace("bfp16", "bf16"))
        if self.algorithm != "rtn":
            parts.append(self.algorithm)
        base = REGISTERED.get(self.name)
        if base is not None and (self.qmin, self.qmax) != (base.qmin, base.qmax):
            parts.append(f"codes {self.qmin:g}..{self.qmax:g}")
        return f"{self.name}({', '.join(parts)})"


Scheme.FIELDS = tuple(f.name for f in dataclasses.fields(Scheme))
#: each field's annotation ("int | None"), which `from_dict` holds a file's values to
_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(Scheme)}


def _json_type_ok(annotation: str, value: Any) -> bool:
    allowed = {t.strip() for t in annotation.split("|")}
    if value is None or isinstance(value, bool):
        return ("None" if value is None else "bool") in allowed
    if isinstance(value, int):
        return bool(allowed & {"int", "float"})
    if isinstance(value, float):
        return "float" in allowed and math.isfinite(value)
    return isinstance(value, str) and "str" in allowed

#: name -> the registered Scheme, filled by `registry.register`; it lives here, below the registry,
#: so a scheme can compare itself with its registered version (`params`) without importing the registry
REGISTERED: dict[str, Scheme] = {}


class SchemeMath:
    """Reference math for one family of schemes: the single place a scheme's numerics are defined.

    Tensors of a quantized weight are passed around as an ordered dict role -> tensor; the roles a
    family produces are listed in `weight_roles` and are what backends read (by role, never by position).
    """

    family: str = ""
    weight_roles: tuple[str, ...] = ("weight", "weight_scale")
    #: weight roles that are not per output feature (a codebook every channel shares): layers' tensors of
    #: these roles cannot be stacked along out_features (AOTI runs sibling layers as one kernel that way)
    shared_roles: tuple[str, ...] = ()
    supported_ops: frozenset[str] = frozenset(OPS)
    #: documented tolerance of this family vs its own reference (relative to output max-abs),
    #: used by verify and by backend numerics tests
    tolerance: float = 1e-3
    #: weight algorithms (ALGORITHMS) this family implements in quantize_weight
    algorithms: tuple[str, ...] = ("rtn",)
    #: what a layer GPTQ cannot fit (no calibrated Hessian: an embedding, a conv) takes under gptq
    calibration_free_algorithm: str = "rtn"
    #: named shorthands `schemes.get` (and the CLI's --scheme-arg) accept besides the Scheme's fields:
    #: name -> the fields it sets when True (False sets nothing); the Scheme records the fields
    shorthands: Mapping[str, Mapping[str, Any]] = {}
    #: (weight_dtype, bits) of the codes this family stores; None: the family checks them itself
    weight_format: tuple[str, int] | None = None

    def supports(self, scheme: Scheme, op: str) -> bool:
        # Embedding inputs are indices: there is no activation to quantize.
        return op in self.supported_ops and not (op == "embedding" and scheme.activation != "none")

    # -- validation -------------------------------------------------------------------------
    def validate(self, scheme: Scheme) -> None:
        """Raise InvalidSchemeError if the scheme's fields are inconsistent for this family."""
        _check_common(scheme)
        if scheme.algorithm not in self.algorithms:
            raise InvalidSchemeError(
                f"{scheme.name}: algorithm={scheme.algorithm!r} is not available for the {self.family} family; "
                f"it offers {list(self.algorithms)}"
            )
        if self.weight_format is not None and (scheme.weight_dtype, scheme.bits) != self.weight_format:
            dtype, bits = self.weight_format
            raise InvalidSchemeError(
                f"{scheme.name}: weight_dtype={scheme.weight_dtype!r}, bits={scheme.bits} is not supported; "
                f"{self.family} schemes store weight_dtype={dtype!r}, bits={bits}"
            )
        _check_activation(scheme)

    def check_weight(self, scheme: Scheme, op: str, weight_shape: tuple[int, ...], where: str) -> None:
        """Raise InvalidSchemeError if a weight of this shape cannot be quantized by the scheme."""
        if scheme.granularity == "per_group":
            k = reduction_dim_size(op, weight_shape)
            if scheme.group_size is None or k % scheme.group_size:
                raise InvalidSchemeError(
                    f"{where}: {scheme.name} group_size={scheme.group_size} does not divide the "
                    f"{op} reduction dimension {k}; pick a group_size that divides {k} or exclude "
                    f"this module with filter_fn"
                )

    # -- weights --------------------------------------------------------------------------
    def quantize_weight(
        self, scheme: Scheme, weight: torch.Tensor, hessian: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The region's tensors for `weight` (in the op's layout). `hessian` (K x K, the sum of x^T x
        over the calibration inputs of a linear layer) is given for algorithm="gptq" only."""
        raise NotImplementedError

    def dequantize_weight(self, scheme: Scheme, q: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError


def reduction_dim_size(op: str, weight_shape: tuple[int, ...]) -> int:
    """The dimension groups run along: in_features (linear), in_ch*k (conv1d), in_ch*kh*kw (conv2d),
    embedding_dim."""
    k = 1
    for d in weight_shape[1:]:
        k *= d
    return k


def _check_types(data: Mapping[str, Any]) -> None:
    """Each field against its annotation. A scheme read from a file is the file's author's, and one built
    with `get(name, **params)` the caller's (`qexport export --scheme-arg qmin=none`): a field of another
    type would surface later as a TypeError deep in a check, a report or a backend."""
    for name, value in data.items():
        if name in _FIELD_TYPES and not _json_type_ok(_FIELD_TYPES[name], value):
            raise InvalidSchemeError(
                f"scheme {str(data.get('name'))[:60]!r}: field {name!r} must be {_FIELD_TYPES[name]}, got {str(value)[:60]!r}"
            )


#: the activations the region function quantizes (schemes/_region.py `quantize_input`, shared by every
#: family) by (activation, act_dtype): the granularities it offers and whether the codes are symmetric
_ACTIVATION_FORMS: dict[tuple[str, str], tuple[tuple[str, ...], bool]] = {
    ("dynamic", "int8"): (ACT_GRANULARITIES, False),
    ("dynamic", "float8_e4m3fn"): (ACT_GRANULARITIES, True),
    ("static", "int8"): (("per_tensor",), False),
}


def _check_activation(s: Scheme) -> None:
    """The activation fields describe what the shared region function computes. Why: it picks its math
    from `activation` and `act_dtype` alone, so any other value (act_dtype='uint8', a symmetric int8 or
    per-token static activation, act_* fields on a weight-only scheme) would run another computation
    than the one the region's scheme, and every manifest and report, claims. Checked where schemes are
    made (`get`, `register`), not in `from_dict`: files already written keep loading."""
    acts = {f: getattr(s, f) for f in ("act_dtype", "act_granularity", "act_symmetric")}
    if s.activation == "none":
        stray = {f: v for f, v in acts.items() if v is not None}
        if stray:
            raise InvalidSchemeError(
                f"{s.name}: {', '.join(f'{f}={v!r}' for f, v in stray.items())} {'describes' if len(stray) == 1 else 'describe'} quantized activations, but "
                f"activation='none'; set {', '.join(stray)} to None"
            )
        return
    form = _ACTIVATION_FORMS.get((s.activation, s.act_dtype))
    if form is None:
        offered = sorted({f"{a} {d}" for a, d in _ACTIVATION_FORMS})
        raise InvalidSchemeError(
            f"{s.name}: {s.activation} activations of act_dtype={s.act_dtype!r} are not computed by any region; "
            f"the region function quantizes activations as one of: {', '.join(offered)}"
        )
    granularities, symmetric = form
    if s.act_granularity not in granularities:
        raise InvalidSchemeError(
            f"{s.name}: {s.activation} {s.act_dtype} activations are {' or '.join(granularities)}, got "
            f"act_granularity={s.act_granularity!r}"
        )
    if s.act_symmetric is not None and s.act_symmetric != symmetric:
        raise InvalidSchemeError(
            f"{s.name}: act_symmetric={s.act_symmetric} is not supported; {s.act_dtype} activations are "
            f"{'symmetric' if symmetric else 'asymmetric'} (drop act_symmetric or set it to {symmetric})"
        )


def _check_common(s: Scheme) -> None:
    def bad(msg: str) -> None:
        raise InvalidSchemeError(f"{s.name}: {msg}")

    # A scheme from a file is its author's and one from get(..., qmin="-8") or Scheme(...) the caller's
    # (held to JSON types too: a scheme travels in graphs and manifests as JSON).
    _check_types(s.to_dict())
    for f in ("name", "family"):
        if not getattr(s, f).strip():
            raise InvalidSchemeError(f"a scheme's {f} must be a non-empty string, got {getattr(s, f)!r}")

    if s.granularity not in GRANULARITIES:
        bad(f"granularity={s.granularity!r} is not one of {GRANULARITIES}")
    if s.granularity == "per_group":
        if not isinstance(s.group_size, int) or isinstance(s.group_size, bool) or s.group_size <= 0:
            bad(f"group_size={s.group_size!r} must be a positive int for per_group granularity")
    elif s.group_size is not None:
        bad(f"group_size={s.group_size} is only meaningful with granularity='per_group'")
    if s.activation not in ACTIVATIONS:
        bad(f"activation={s.activation!r} is not one of {ACTIVATIONS}")
    if s.activation != "none":
        if s.act_granularity not in ACT_GRANULARITIES:
            bad(f"act_granularity={s.act_granularity!r} is not one of {ACT_GRANULARITIES}")
        if s.act_dtype is None:
            bad("act_dtype must be set when activations are quantized")
    if s.compute_dtype not in COMPUTE_DTYPES:
        bad(f"compute_dtype={s.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
    if not s.qmin < s.qmax:
        bad(f"qmin={s.qmin} must be below qmax={s.qmax}")
    if s.algorithm not in ALGORITHMS:
        bad(f"algorithm={s.algorithm!r} is not one of {ALGORITHMS}")
    if not 1 <= s.version <= SCHEME_VERSION:
        bad(f"version={s.version} is not a scheme schema version (1..{SCHEME_VERSION}); leave version out")
