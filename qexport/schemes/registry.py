"""The one scheme registry: scheme names -> `Scheme` records, families -> `SchemeMath`."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidSchemeError, UnknownSchemeError
from ._scheme import REGISTERED as _SCHEMES, Scheme, SchemeMath

_FAMILIES: dict[str, SchemeMath] = {}
_BUILTINS: set[str] = set()
_BUILTIN_FAMILIES: set[str] = set()


def register_family(math: SchemeMath, *, overwrite: bool = False) -> SchemeMath:
    _check_family(math, overwrite)
    if math.family not in _BUILTIN_FAMILIES:
        _FAMILIES[math.family] = math
    return _FAMILIES[math.family]


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_family(math: SchemeMath, overwrite: bool = False) -> None:
    """A family's math is not replaced behind its schemes' backs: every scheme of that family (and every
    file naming one) would silently compute with the newcomer's numerics while its scheme dict stayed
    the same. Never for a built-in family; for a user family, only with overwrite=True (the same class
    defined again, as a re-run notebook cell or a reloaded module does, is the same math)."""
    if not isinstance(math.family, str) or not math.family:
        raise InvalidSchemeError(f"{type(math).__name__}.family must be a non-empty string")
    current = _FAMILIES.get(math.family)
    if current is None or type(math) is type(current):
        return
    if math.family in _BUILTIN_FAMILIES:
        raise InvalidSchemeError(
            f"family {math.family!r} is built in and its math ({type(current).__name__}) cannot be replaced by "
            f"{type(math).__name__}; register the scheme without math to reuse the built-in one, or give the "
            f"scheme and {type(math).__name__} a family of their own (e.g. family='my_{math.family}')"
        )
    if not overwrite and _class_name(type(math)) != _class_name(type(current)):
        users = sorted(n for n, s in _SCHEMES.items() if s.family == math.family)
        raise InvalidSchemeError(
            f"family {math.family!r} already has its math, {_class_name(type(current))} (schemes {users}); "
            f"{_class_name(type(math))} would change what they compute. Give the scheme and its math a family "
            f"of their own, or pass overwrite=True to replace it"
        )


def register(scheme: Scheme, math: "SchemeMath | type[SchemeMath] | None" = None, *, overwrite: bool = False) -> Scheme:
    """Add a scheme (and, for a new family, its math) to the registry; returns the scheme.

    A user scheme either reuses a built-in family (`math=None`, e.g. a per-tensor int8 variant) or
    brings its own `SchemeMath` subclass whose `family` equals `scheme.family`.
    """
    if not isinstance(scheme, Scheme):
        raise InvalidSchemeError(f"register() takes a qexport.Scheme, got {type(scheme).__name__}")
    if isinstance(math, type) and issubclass(math, SchemeMath):
        math = math()
    if math is not None and not isinstance(math, SchemeMath):
        raise InvalidSchemeError(f"math must be a qexport.SchemeMath (subclass or instance), got {type(math).__name__}")
    if math is not None:
        if math.family != scheme.family:
            raise InvalidSchemeError(
                f"scheme {scheme.name!r} has family {scheme.family!r} but its math is for family {math.family!r}"
            )
        _check_family(math, overwrite)
    family_math = math if math is not None else _FAMILIES.get(scheme.family)
    if family_math is None:
        raise InvalidSchemeError(
            f"scheme {scheme.name!r} names family {scheme.family!r}, which has no math registered; "
            f"pass math=YourSchemeMath() or use one of {sorted(_FAMILIES)}"
        )
    if scheme.name in _SCHEMES and not overwrite and _SCHEMES[scheme.name] != scheme:
        raise InvalidSchemeError(
            f"a different scheme named {scheme.name!r} is already registered; pick another name or pass overwrite=True"
        )
    if scheme.name in _BUILTINS and overwrite:
        raise InvalidSchemeError(f"{scheme.name!r} is a built-in scheme and cannot be replaced")
    family_math.validate(scheme)  # before anything is registered: a refused scheme leaves no family behind
    if math is not None:
        register_family(math, overwrite=overwrite)
    _SCHEMES[scheme.name] = scheme
    return scheme


def _register_builtin(scheme: Scheme, math: SchemeMath) -> None:
    register(scheme, math)
    _BUILTINS.add(scheme.name)
    _BUILTIN_FAMILIES.add(scheme.family)


def unregister(name: str) -> None:
    """Remove a user scheme (built-ins stay), and its family's math when no scheme left names the family."""
    if name in _BUILTINS:
        raise InvalidSchemeError(f"{name!r} is a built-in scheme and cannot be unregistered")
    scheme = _SCHEMES.pop(name, None)
    if scheme is not None and scheme.family not in _BUILTIN_FAMILIES and all(s.family != scheme.family for s in _SCHEMES.values()):
        _FAMILIES.pop(scheme.family, None)


def names() -> list[str]:
    return sorted(_SCHEMES)


def builtin_names() -> list[str]:
    return sorted(_BUILTINS)


def families() -> list[str]:
    """The scheme families whose math is registered (what a lowering may be registered for, besides a name)."""
    return sorted(_FAMILIES)


def get(scheme: "str | Scheme", **params: Any) -> Scheme:
    """The registered scheme `scheme` with `params` overridden and validated.

    Accepts a name or a `Scheme` (returned validated, with `params` applied).
    """
    if isinstance(scheme, Scheme):
        base = scheme
    elif isinstance(scheme, str):
        if scheme not in _SCHEMES:
            import difflib

            close = difflib.get_close_matches(scheme, _SCHEMES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownSchemeError(
                f"unknown scheme {scheme!r}.{hint} Known schemes: {', '.join(names())}; "
                f"add your own with qexport.schemes.register()"
            )
        base = _SCHEMES[scheme]
    else:
        raise UnknownSchemeError(f"a scheme is a name or a qexport.Scheme, got {type(scheme).__name__}")
    if "name" in params or "family" in params:
        raise InvalidSchemeError("name and family cannot be overridden; register a new scheme instead")
    params = _expand_shorthands(base, params)
    if params.get("activation") == "none":
        # the scheme's weight-only form (`--scheme-arg activation=none`): its activation fields go with it
        params = {"act_dtype": None, "act_granularity": None, "act_symmetric": None, **params}
    resolved = base.replace(**params) if params else base
    math_for(resolved).validate(resolved)
    return resolved


def _expand_shorthands(base: Scheme, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the family's shorthands (`SchemeMath.shorthands`, e.g. int8's reduce_range=True)
    replaced by the fields they set."""
    shorthands = math_for(base).shorthands
    out = {k: v for k, v in params.items() if k not in shorthands}
    for name in [k for k in params if k in shorthands]:
        value, sets = params[name], shorthands[name]
        if not isinstance(value, bool):
            raise InvalidSchemeError(f"{base.name}: {name} is True or False (True sets {dict(sets)}), got {value!r}")
        if value and (clash := sorted(sets.keys() & out.keys())):
            raise InvalidSchemeError(f"{base.name}: {name}=True sets {clash} itself; pass {name}=True or {', '.join(clash)}, not both")
        if value:
            out.update(sets)
    return out


def math_for(scheme: Scheme) -> SchemeMath:
    try:
        return _FAMILIES[scheme.family]
    except KeyError:
        raise UnknownSchemeError(
            f"scheme {scheme.name!r} belongs to family {scheme.family!r}, which is not registered in this "
            f"process; import the module that registers it before loading or lowering"
        ) from None
