"""Common-subexpression elimination."""

from __future__ import annotations

import torch

from deepseek.ir.graph import Graph, Value
from deepseek.ir.ops import Prop

RECOMPUTED = "_recomputed"  # activate_recompute names its copies' outputs with it


def _key(node) -> tuple | None:
    """A hashable identity of what a node computes, or None if it must stay distinct."""
    if node.fallback is None and node.opdef.has(Prop.RANDOM):
        return None
    if any(RECOMPUTED in o.name for o in node.outputs):
        return None  # merging activate_recompute's copy into the original would undo it

    def freeze(x):
        if isinstance(x, Value):
            return ("v", id(x))
        if isinstance(x, (list, tuple)):
            return ("l", tuple(freeze(v) for v in x))
        if isinstance(x, float):
            return ("f", repr(x))  # keeps -0.0 and nan distinct and hashable
        return ("c", type(x).__name__, x if isinstance(x, (int, str, bool, type(None))) else repr(x))

    return (node.kind, tuple(freeze(x) for x in node.inputs),
            tuple(sorted((k, freeze(v)) for k, v in node.attrs.items())))


def eliminate_common_subexpr(graph: Graph) -> Graph:
    """Replace a node by an earlier one with the same op, inputs and attributes.

    ``a = relu(x); b = relu(x)`` becomes ``a = relu(x)`` with every use of ``b``
    reading ``a``. Random ops are never merged, nor the copies that
    ``activate_recompute`` made (outputs named ``*_recomputed*``): merging
    them would keep the value alive again. Identical constants (same
    dtype, shape and values) are merged first, so nodes reading copies of one
    weight also merge.
    """
    _merge_equal_constants(graph)
    seen: dict[tuple, list[Value]] = {}
    kept = []
    for node in graph.nodes:
        key = _key(node)
        earlier = seen.get(key) if key is not None else None
        if earlier is None:
            if key is not None:
                seen[key] = node.outputs
            kept.append(node)
            continue
        for old, new in zip(node.outputs, earlier):
            graph.replace_all_uses(old, new)
    graph.nodes = kept
    return graph


def _merge_equal_constants(graph: Graph) -> None:
    by_content: dict[tuple, Value] = {}
    for name, v in list(graph.const_values.items()):
        t = graph.constants[name]
        if t.numel() > 4096:  # large weights are distinct in practice; comparing costs time
            continue
        raw = t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
        key = (t.dtype, tuple(t.shape), raw.numpy().tobytes())
        first = by_content.setdefault(key, v)
        if first is not v:
            graph.replace_all_uses(v, first)
    graph.remove_unused_constants()
