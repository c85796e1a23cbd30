"""The module layout: dependencies point down only, no import cycles, no private module (or private
name) used outside the package that owns it, and backends never parse or write artifact files.

Read from the source with `ast` (every import, those inside functions too), so nothing is imported.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qexport", "serializers")

#: lowest first; a module may import only from its own layer or the ones below it
LAYERS = (
    ("qexport.errors", "qexport.extras", "qexport.quiet", "qexport.table"),
    ("qexport.schemes",),
    ("qexport._upstream", "qexport.regions", "qexport.signature", "qexport.validate", "qexport.models",
     "qexport.passes", "qexport.quantize", "qexport.export"),
    ("serializers",),
    ("qexport.lower",),
    ("qexport.runtime", "qexport.runners", "qexport.serve", "qexport.generation"),
    ("qexport.cli", "qexport.__main__"),
)
#: the package facade sits above everything (its imports are lazy)
FACADE = "qexport"


@lru_cache(maxsize=None)
def modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


@lru_cache(maxsize=None)
def imports(name: str) -> tuple[tuple[str, int], ...]:
    """(imported module or module.name, line) of every qexport/serializers import in `name`."""
    f, is_pkg = modules()[name]
    base = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            pkg = base
            for _ in range(max(node.level - 1, 0)):
                pkg = pkg.rpartition(".")[0]
            mod = (f"{pkg}.{node.module}" if node.module else pkg) if node.level else node.module
            submodules = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules()]
            if len(submodules) < len(node.names):  # names from the module itself, not only its submodules
                found.append((mod, node.lineno))
            found += [(m, node.lineno) for m in submodules]
            found += [(f"{mod}.{a.name}", node.lineno) for a in node.names if _private(a.name) and f"{mod}.{a.name}" not in submodules]
    return tuple((m, line) for m, line in found if m.split(".")[0] in PACKAGES)


@lru_cache(maxsize=None)
def attribute_uses(name: str) -> tuple[tuple[str, int], ...]:
    """(module.attribute, line) of every attribute read through a qexport/serializers module that `name`
    imports (`from ..lower import kernels; kernels._sibling_key`): what `imports` alone does not see."""
    f, is_pkg = modules()[name]
    base = name if is_pkg else name.rpartition(".")[0]
    tree = ast.parse(f.read_text())
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            alias.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0] for a in node.names})
        elif isinstance(node, ast.ImportFrom):
            pkg = base
            for _ in range(max(node.level - 1, 0)):
                pkg = pkg.rpartition(".")[0]
            mod = (f"{pkg}.{node.module}" if node.module else pkg) if node.level else node.module
            alias.update({a.asname or a.name: f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules()})
    found = []
    for node in ast.walk(tree):
        chain, value = [], node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if chain and isinstance(value, ast.Name) and value.id in alias:
            found.append((".".join([alias[value.id], *reversed(chain)]), node.lineno))
    return tuple((m, line) for m, line in found if m.split(".")[0] in PACKAGES)


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _module_of(target: str) -> str:
    """The longest known module that `target` (a module or module.name) names."""
    while target and target not in modules():
        target = target.rpartition(".")[0]
    return target


def _layer(name: str) -> int | None:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return None if best is None else best[0]


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != FACADE and _layer(m) is None] == []


def test_dependencies_point_down():
    upward = []
    for name in modules():
        if name == FACADE:
            continue
        for target, line in imports(name):
            dep = _module_of(target)
            # the facade's own names (__version__, the errors) are there before anything is imported
            if dep != FACADE and _layer(dep) > _layer(name):
                upward.append(f"{name}:{line} imports {target}")
    assert upward == []


def test_lower_never_imports_the_cli():
    assert [(m, t) for m in modules() if m.startswith("qexport.lower") for t, _ in imports(m)
            if t.startswith("qexport.cli")] == []


def test_no_private_module_or_name_used_outside_its_package():
    leaks = []
    for name in modules():
        for target, line in (*imports(name), *attribute_uses(name)):
            parts = target.split(".")
            for i, part in enumerate(parts):
                if not _private(part):
                    continue
                # a private module belongs to its package; a private name to its module's package
                owner = ".".join(parts[:i] if ".".join(parts[: i + 1]) in modules() else parts[: i - 1])
                if not (name == owner or name.startswith(owner + ".")):
                    leaks.append(f"{name}:{line} imports {target}")
    assert leaks == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for name in modules():
        for target, _ in imports(name):
            dep = _module_of(target)
            if dep and dep != name and not name.startswith(dep + "."):  # a package's own __init__ is no cycle
                graph[name].add(dep)
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


#: what reading or writing an artifact file looks like; the serializers own all of it
_FILE_FORMAT_CALLS = {"write_to_file", "metadata_props", "load_model_from_string", "SerializeToString", "ZipFile",
                      "frombuffer", "aoti_load_package"}


@pytest.mark.parametrize("package", ["qexport.lower", "qexport.runtime"])
def test_backends_and_runtimes_leave_file_formats_to_the_serializers(package):
    found = []
    for name, (f, _) in modules().items():
        if not name.startswith(package + "."):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in _FILE_FORMAT_CALLS:
                found.append(f"{name}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.Attribute) and node.attr == "save" and getattr(node.value, "id", "") == "ir":
                found.append(f"{name}:{node.lineno} ir.save")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "zipfile" in names:
                    found.append(f"{name}:{node.lineno} import zipfile")
    assert found == []


def test_the_checker_sees_what_it_forbids():
    """The walk resolves relative and function-level imports (or the tests above would pass vacuously)."""
    assert any(t == "qexport.table" for t, _ in imports("qexport.lower.report"))  # a lazy import inside a method
    assert any(t == "serializers.kinds" for t, _ in imports("qexport.runtime.loaders"))
    assert any(t == "serializers.onnx.inherit_scope" for t, _ in attribute_uses("qexport.lower.onnx"))
    assert _layer("qexport.cli.demo_cmd") > _layer("qexport.runtime.loaders") > _layer("qexport.lower.aoti") \
        > _layer("serializers.kinds") > _layer("qexport.regions") > _layer("qexport.schemes.registry")
