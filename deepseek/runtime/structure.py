"""The nesting of a model's inputs and outputs, as plain JSON-able data.

Outputs are rebuilt from flat tensors into the model's tuples, lists, dicts,
namedtuples and transformers ``ModelOutput`` classes. A class is only ever
re-imported from an allow-list of modules (never from arbitrary names in a
user's file).
"""

from __future__ import annotations

import collections
import importlib
import inspect
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from deepseek.errors import ArtifactError, CaptureError

_ALLOWED_CLASS_MODULES = ("transformers.", "torch.return_types")


# Classes met while capturing in this process: rebuilt as themselves here; in another
# process only allow-listed modules are imported, other classes come back as dicts.
_SEEN_CLASSES: dict[str, type] = {}


def _class_path(cls) -> str:
    path = f"{cls.__module__}:{cls.__qualname__}"
    _SEEN_CLASSES[path] = cls
    return path


def spec_to_json(spec: pytree.TreeSpec) -> dict:
    """Encode a pytree TreeSpec (of a model's outputs) as JSON-able data."""
    if spec.is_leaf():
        return {"kind": "leaf"}
    # TreeSpec.children() where it exists (torch 2.13 deprecates children_specs)
    kids = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    children = [spec_to_json(c) for c in kids]
    t = spec.type
    if t is tuple:
        return {"kind": "tuple", "items": children}
    if t is list:
        return {"kind": "list", "items": children}
    if t is dict:
        return {"kind": "dict", "keys": list(spec.context), "items": children}
    if t is type(None):
        return {"kind": "none"}
    if t is collections.namedtuple:  # torch's pytree keeps the class in the context
        cls = spec.context
        return {"kind": "namedtuple", "class": _class_path(cls), "fields": list(cls._fields),
                "items": children}
    if isinstance(t, type) and issubclass(t, tuple) and hasattr(t, "n_fields"):  # torch.return_types
        return {"kind": "structseq", "class": _class_path(t), "items": children}
    keys = spec.context if isinstance(spec.context, (list, tuple)) else None
    if keys is not None and all(isinstance(k, str) for k in keys):
        return {"kind": "mapping_class", "class": _class_path(t), "keys": list(keys), "items": children}
    raise CaptureError(f"cannot describe output container {getattr(t, '__name__', t)}; return "
                       "tensors, tuples, lists, dicts or namedtuples")


def _load_class(path: str):
    if path in _SEEN_CLASSES:
        return _SEEN_CLASSES[path]
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
        if kind == "structseq":
            cls = _load_class(s["class"])
            return cls(items) if cls is not None else tuple(items)
        if kind == "mapping_class":
            cls = _load_class(s["class"])
            data = dict(zip(s["keys"], items))
            return cls(**data) if cls is not None else data
        raise ArtifactError(f"unknown output structure kind {kind!r}")

    return build(structure)


_KINDS = {"leaf", "none", "tuple", "list", "dict", "namedtuple", "structseq", "mapping_class"}


def count_leaves(structure: dict) -> int:
    """Leaves of a structure tree; raises ArtifactError if the tree is malformed."""
    if not isinstance(structure, dict) or structure.get("kind") not in _KINDS:
        raise ArtifactError(f"malformed output structure node {str(structure)[:80]}")
    kind = structure["kind"]
    if kind == "leaf":
        return 1
    if kind == "none":
        return 0
    items = structure.get("items")
    if not isinstance(items, list):
        raise ArtifactError(f"output structure {kind} lacks its items")
    names = structure.get("keys", structure.get("fields"))
    if kind in ("dict", "mapping_class", "namedtuple") and (
            not isinstance(names, list) or len(names) != len(items)
            or not all(isinstance(k, (str, int)) for k in names)):
        raise ArtifactError(f"output structure {kind} has keys that do not match its items")
    if kind in ("namedtuple", "structseq", "mapping_class") and not isinstance(structure.get("class"), str):
        raise ArtifactError(f"output structure {kind} lacks its class name")
    return sum(count_leaves(c) for c in items)


def check_structures(in_structure, out_structure, n_inputs: int, n_outputs: int) -> None:
    """Raise ArtifactError unless the structures fit a graph of these inputs/outputs."""
    if in_structure is not None:
        if not isinstance(in_structure, dict):
            raise ArtifactError("in_structure must be an object")
        n = in_structure.get("n_leaves")
        leaves = in_structure.get("tensor_leaves")
        consts = in_structure.get("constants", {})
        if (not isinstance(n, int) or not isinstance(leaves, list)
                or not all(isinstance(i, int) and 0 <= i < n for i in leaves)
                or len(set(leaves)) != len(leaves) or len(leaves) != n_inputs
                or not isinstance(consts, dict)
                or not all(isinstance(k, str) and k.isdigit() and int(k) < n for k in consts)):
            raise ArtifactError("in_structure does not match the graph's inputs")
        params = in_structure.get("params", [])
        if not isinstance(params, list) or not all(isinstance(p, str) and p.isidentifier()
                                                   for p in params):
            raise ArtifactError("in_structure.params must be a list of parameter names")
        if "spec" in in_structure:
            count_leaves(in_structure["spec"])
    if out_structure is not None and count_leaves(out_structure) != n_outputs:
        raise ArtifactError(f"out_structure has {count_leaves(out_structure)} leaves but the graph "
                            f"has {n_outputs} outputs")


def flatten_inputs(args: tuple, kwargs: dict) -> list[Any]:
    """Flat leaves of a call's (args, kwargs), in torch.export's order."""
    leaves, _ = pytree.tree_flatten((tuple(args), dict(kwargs)))
    return leaves


def flatten_with_structure(args: tuple) -> tuple[list[Any], dict]:
    """Flat leaves of positional ``args`` and the JSON description of their nesting."""
    leaves, spec = pytree.tree_flatten(tuple(args))
    return leaves, spec_to_json(spec)


def bind_by_name(params: list[str], args: tuple, kwargs: dict) -> tuple:
    """Order a call's arguments as the captured ``forward`` parameters ``params``.

    Raises TypeError (with Python's message) for missing, unknown or doubled arguments.
    """
    sig = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                             for p in params])
    return tuple(sig.bind(*args, **kwargs).arguments.values())


def is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)
