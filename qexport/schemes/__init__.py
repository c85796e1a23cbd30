"""Scheme registry: `names()`, `get(name, **params)`, `register(scheme, math)`.

One file per family; each built-in scheme is defined once, with its reference math.
"""

from ._scheme import ALGORITHMS, OPS, SCHEME_VERSION, Scheme, SchemeMath, reduction_dim_size
from .registry import builtin_names, families, get, math_for, names, register, register_family, unregister
from . import int8, int4, fp8, nf4  # noqa: E402,F401  (registers the built-ins)
from ._region import make_region_fn, quantize_input

__all__ = [
    "ALGORITHMS", "OPS", "SCHEME_VERSION", "Scheme", "SchemeMath", "builtin_names", "families", "get", "make_region_fn", "math_for",
    "names", "quantize_input", "reduction_dim_size", "register", "register_family", "unregister",
]
