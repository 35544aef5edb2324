"""The nesting of a model's inputs and outputs, as plain JSON-able data.

Outputs are rebuilt from flat tensors into the model's tuples, lists, dicts,
namedtuples and transformers ``ModelOutput`` classes. A class is only ever
re-imported from an allow-list of modules (never from arbitrary names in a
user's file).
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from deepseek.errors import ArtifactError

_ALLOWED_CLASS_MODULES = ("transformers.",)


def _class_path(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def spec_to_json(spec: pytree.TreeSpec) -> dict:
    """Encode a pytree TreeSpec (of a model's outputs) as JSON-able data."""
    if spec.is_leaf():
        return {"kind": "leaf"}
    children = [spec_to_json(c) for c in spec.children_specs]
    t = spec.type
    if t is tuple:
        return {"kind": "tuple", "items": children}
    if t is list:
        return {"kind": "list", "items": children}
    if t is dict:
        return {"kind": "dict", "keys": list(spec.context), "items": children}
    if t is type(None):
        return {"kind": "none"}
    if isinstance(t, type) and issubclass(t, tuple) and hasattr(t, "_fields"):
        return {"kind": "namedtuple", "class": _class_path(t), "fields": list(t._fields), "items": children}
    keys = spec.context if isinstance(spec.context, (list, tuple)) else None
    if keys is not None and all(isinstance(k, str) for k in keys):
        return {"kind": "mapping_class", "class": _class_path(t), "keys": list(keys), "items": children}
    raise TypeError(f"cannot describe output container {t.__name__}; return tensors, tuples, lists "
                    "or dicts")


def _load_class(path: str):
    module, _, qualname = path.partition(":")
    if not module.startswith(_ALLOWED_CLASS_MODULES):
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def unflatten(structure: dict, leaves: Sequence[Any]) -> Any:
    """Rebuild the nested output from flat ``leaves`` following ``structure``."""
    it = iter(leaves)

    def build(s: dict):
        kind = s.get("kind")
        if kind == "leaf":
            return next(it)
        if kind == "none":
            return None
        items = [build(c) for c in s["items"]]
        if kind == "tuple":
            return tuple(items)
        if kind == "list":
            return items
        if kind == "dict":
            return dict(zip(s["keys"], items))
        if kind == "namedtuple":
            cls = _load_class(s["class"])
            return cls(*items) if cls is not None else dict(zip(s["fields"], items))
        if kind == "mapping_class":
            cls = _load_class(s["class"])
            data = dict(zip(s["keys"], items))
            return cls(**data) if cls is not None else data
        raise ArtifactError(f"unknown output structure kind {kind!r}")

    return build(structure)


def count_leaves(structure: dict) -> int:
    if structure.get("kind") == "leaf":
        return 1
    return sum(count_leaves(c) for c in structure.get("items", []))


def flatten_inputs(args: tuple, kwargs: dict) -> list[Any]:
    """Flat leaves of a call's (args, kwargs), in torch.export's order."""
    leaves, _ = pytree.tree_flatten((tuple(args), dict(kwargs)))
    return leaves


def is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)
