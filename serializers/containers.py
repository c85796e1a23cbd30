"""Output containers a program may return that a fresh process has not registered with pytree.

torch.export stores a program's input/output structure as a pytree spec naming each container by its
`serialized_type_name`, and loading fails ("Deserializing transformers.modeling_outputs.
CausalLMOutputWithPast in pytree is not registered") unless the class registered itself first, which
for transformers' `ModelOutput`s happens when their module is imported. A loader cannot import what
the file names (that would run any module an attacker writes into it), so the containers come from an
allow-list: the modules below and transformers' own per-model modules (`transformers.models.<model>.
modeling_<model>`, where Swin, CLIP and others define their outputs), from which only `ModelOutput`
subclasses are taken.
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any, Iterable, Iterator

import torch.utils._pytree as pytree

#: module -> the base class (module, name) every container taken from it must derive from.
#: DynamicCache-holding outputs are out of scope: export with use_cache=False.
ALLOWED_MODULES: dict[str, tuple[str, str]] = {
    "transformers.modeling_outputs": ("transformers.utils.generic", "ModelOutput"),
}
#: transformers' model modules (its own code, inside its package): `SwinImageClassifierOutput` lives in
#: transformers.models.swin.modeling_swin, not in modeling_outputs
MODEL_MODULE = re.compile(r"transformers\.models\.[a-z0-9_]+\.modeling_[a-z0-9_]+")


def _base_of(module_name: str) -> tuple[str, str] | None:
    if module_name in ALLOWED_MODULES:
        return ALLOWED_MODULES[module_name]
    return ALLOWED_MODULES["transformers.modeling_outputs"] if MODEL_MODULE.fullmatch(module_name) else None


def spec_type_names(spec: str) -> Iterator[str]:
    """The container type names in a serialized treespec (torch's `treespec_dumps` JSON)."""
    try:
        _, tree = json.loads(spec)
    except (ValueError, TypeError):
        return
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                yield node["type"]
            stack.extend(node.get("children_spec") or ())


def register_output_containers(type_names: Iterable[str]) -> list[str]:
    """Register every allow-listed container among `type_names` that pytree does not know yet;
    returns the names registered. Unknown names are left alone (torch's loader reports them)."""
    done = []
    for name in set(type_names):
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module_name, _, cls_name = name.rpartition(".")
        base_name = _base_of(module_name)
        if base_name is None or not cls_name.isidentifier() or cls_name.startswith("_"):
            continue
        try:
            module = importlib.import_module(module_name)
            base = getattr(importlib.import_module(base_name[0]), base_name[1])
        except Exception:  # transformers, that model or its optional dependency is missing or broken here
            continue  # (any error, not only ImportError: a load must not die in a library's import); torch's loader names the container
        cls = getattr(module, cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            continue
        # transformers registers each subclass as it is defined (import above); older releases did so
        # only on first instantiation, so make sure
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            pytree.register_pytree_node(
                cls, pytree._dict_flatten, lambda values, context: cls(**dict(zip(context, values))),
                serialized_type_name=name, flatten_with_keys_fn=pytree._dict_flatten_with_keys,
            )
        done.append(name)
    return done


def register_program_containers(model_json: "bytes | str | Any") -> list[str]:
    """Register the allow-listed containers named by a serialized program's (models/<name>.json, raw
    or parsed) input and output specs. Unparseable JSON registers nothing: torch's loader reports it."""
    if isinstance(model_json, (bytes, str)):
        try:
            model_json = json.loads(model_json)
        except (ValueError, RecursionError):
            return []
    names: list[str] = []
    graph_module = model_json.get("graph_module") if isinstance(model_json, dict) else None
    for entry in (graph_module or {}).get("module_call_graph") or ():
        sig = (entry or {}).get("signature") or {}
        for key in ("in_spec", "out_spec"):
            if isinstance(sig.get(key), str):
                names.extend(spec_type_names(sig[key]))
    return register_output_containers(names)
