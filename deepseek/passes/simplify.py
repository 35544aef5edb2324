"""Clean-up passes: constant folding and dead-code elimination."""

from __future__ import annotations

import torch

from deepseek.ir.graph import Graph, Value
from deepseek.ir.interpreter import run_node
from deepseek.ir.ops import Prop
from deepseek.ir.types import has_sym

# Folding may grow a constant (expand, full) by at most this much.
_FOLD_GROWTH_BYTES = 1 << 20


def fold_constants(graph: Graph) -> Graph:
    """Evaluate nodes whose inputs are all constants; their outputs become constants.

    Random ops and fallback nodes are left alone, and a node is not folded
    when its outputs would be larger than its inputs by more than 1 MiB
    (``expand`` of a scalar must not bloat the artifact).
    """
    kept = []
    for node in graph.nodes:
        values = node.input_values()
        foldable = (
            node.fallback is None
            and not node.opdef.has(Prop.RANDOM)
            and all(graph.is_constant(v) for v in values)
            and not any(has_sym(a) for a in node.attrs.values())
            and all(o.spec.is_static for o in node.outputs)
        )
        if foldable:
            in_bytes = sum(v.spec.nbytes() for v in values)
            out_bytes = sum(o.spec.nbytes() for o in node.outputs)
            foldable = out_bytes <= in_bytes + _FOLD_GROWTH_BYTES
        if not foldable:
            kept.append(node)
            continue
        args = [graph.constants[x.name] if isinstance(x, Value) else x for x in node.inputs]
        with torch.no_grad():
            results = run_node(node, args, {})
        for o, t in zip(node.outputs, results):
            c = graph.add_constant(o.name, t.contiguous().clone())
            graph.replace_all_uses(o, c)
    graph.nodes = kept
    graph.remove_unused_constants()
    return graph


def eliminate_dead_code(graph: Graph) -> Graph:
    """Remove nodes none of whose outputs is used, and constants nobody reads."""
    live = {id(v) for v in graph.outputs}
    kept = []
    for node in reversed(graph.nodes):
        if any(id(o) in live for o in node.outputs):
            kept.append(node)
            live.update(id(v) for v in node.input_values())
    graph.nodes = kept[::-1]
    graph.remove_unused_constants()
    return graph
