"""Memory and traffic accounting of a graph for concrete shapes.

``bytes_moved``: every kernel reads each input once and writes each output
once (views move nothing). ``peak_live_bytes``: the largest sum of live
intermediate buffers when nodes run in order and each buffer is freed after
the last use of any value that views it (graph inputs and weights excluded).
"""

from __future__ import annotations

from typing import Mapping

from deepseek.ir.graph import Graph, Node
from deepseek.ir.ops import Prop


def _is_view(n: Node) -> bool:
    return n.fallback is None and n.opdef.has(Prop.VIEW)


def bytes_moved(graph: Graph, env: Mapping[str, int]) -> int:
    total = 0
    for n in graph.nodes:
        if not _is_view(n):
            total += sum(v.spec.nbytes(env) for v in n.input_values())
            total += sum(o.spec.nbytes(env) for o in n.outputs)
    return total


def peak_live_bytes(graph: Graph, env: Mapping[str, int]) -> int:
    root: dict[int, int] = {}  # value id -> id of the buffer-owning value, or -1
    size: dict[int, int] = {}
    for v in graph.inputs + list(graph.const_values.values()):
        root[id(v)] = -1
    for n in graph.nodes:
        first = n.input_values()[0] if n.input_values() else None
        for o in n.outputs:
            if _is_view(n) and first is not None:
                root[id(o)] = root[id(first)]
            else:
                root[id(o)] = id(o)
                size[id(o)] = o.spec.nbytes(env)
    end = len(graph.nodes)
    last: dict[int, int] = {r: i for i, n in enumerate(graph.nodes) for r in map(id, n.outputs)
                            if r in size}
    for i, n in enumerate(graph.nodes):
        for v in n.input_values():
            r = root[id(v)]
            if r != -1:
                last[r] = max(last[r], i)
    for v in graph.outputs:
        if root.get(id(v), -1) != -1:
            last[root[id(v)]] = end
    freed_at: dict[int, int] = {}
    for r, s in size.items():
        freed_at[last[r]] = freed_at.get(last[r], 0) + s
    live = peak = 0
    for i, n in enumerate(graph.nodes):
        live += sum(size.get(id(o), 0) for o in n.outputs)
        peak = max(peak, live)
        live -= freed_at.get(i, 0)
    return peak
