"""The memory planner and the traffic accounting of a graph, for concrete shapes.

``bytes_moved``: every kernel reads each input once and writes each output
once (views move nothing), except that a gather (embedding lookup, index
select, advanced indexing) reads from its table only the elements it returns,
and an in-place scatter update writes only the elements it updates.
``plan_memory``: one arena for all intermediate buffers (views share their
base's buffer; in-place ops share their input's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from deepseek.ir.graph import Graph, Node
from deepseek.ir.ops import Op, Prop
from deepseek.passes.memory import UPDATE_OPS, buffer_lifetimes, peak_live_bytes


def _is_view(n: Node) -> bool:
    return n.fallback is None and n.opdef.has(Prop.VIEW)


# ops that read from input 0 (the table) one element per output element, at most
_GATHERS = frozenset({Op.EMBEDDING, Op.INDEX_SELECT, Op.INDEX_TENSOR, Op.UNSAFE_INDEX_TENSOR,
                      Op.GATHER})


def node_bytes(node: Node, env: Mapping[str, int]) -> int:
    """Bytes one node's kernel reads plus writes (each input and output once; views 0;
    a gather reads only the table elements it returns; an in-place scatter update
    writes only the updated elements into its input 0)."""
    if _is_view(node):
        return 0
    inputs = [v.spec.nbytes(env) for v in node.input_values()]
    outputs = sum(o.spec.nbytes(env) for o in node.outputs)
    if node.fallback is None and node.op in _GATHERS and inputs:
        inputs[0] = min(inputs[0], outputs)
    elif node.fallback is None and node.op in UPDATE_OPS and node.reuse == 0:
        return sum(inputs[1:]) + inputs[-1]  # indices and values read, values written
    return sum(inputs) + outputs


def bytes_moved(graph: Graph, env: Mapping[str, int]) -> int:
    return sum(node_bytes(n, env) for n in graph.nodes)


@dataclass
class MemoryPlan:
    """Offsets of every intermediate buffer in one arena (bytes)."""

    offsets: dict[str, int] = field(default_factory=dict)  # owning value name -> offset
    sizes: dict[str, int] = field(default_factory=dict)
    arena_bytes: int = 0
    total_bytes: int = 0  # sum of all intermediate buffers (no reuse at all)
    peak_live_bytes: int = 0  # the lower bound any arena must reach

    def to_dict(self) -> dict:
        return {"arena_bytes": self.arena_bytes, "total_bytes": self.total_bytes,
                "peak_live_bytes": self.peak_live_bytes, "buffers": len(self.offsets)}


_ALIGN = 64


def plan_memory(graph: Graph, env: Mapping[str, int]) -> MemoryPlan:
    """Place every intermediate storage in one arena: greedy best fit by size.

    Buffers are taken largest first; each goes at the lowest offset where it
    overlaps no already-placed buffer whose lifetime overlaps its own (64-byte
    aligned). ``arena_bytes`` is then the arena's size, ``peak_live_bytes``
    the most bytes live at once (a lower bound), ``total_bytes`` what one
    buffer per tensor would take.
    """
    first, last, sizes, owner = buffer_lifetimes(graph, env, _ALIGN)
    placed: list[tuple[int, int, int, int]] = []  # (offset, size, start, end)
    plan = MemoryPlan(total_bytes=sum(sizes.values()))
    for r in sorted(first, key=lambda r: (-sizes[r], first[r])):
        start, end, size = first[r], last[r], sizes[r]
        conflicts = sorted((o, o + s) for o, s, a, b in placed if a <= end and start <= b)
        offset = 0
        for lo, hi in conflicts:  # first gap that fits, scanning upward
            if offset + size <= lo:
                break
            offset = max(offset, hi)
        placed.append((offset, size, start, end))
        plan.offsets[owner[r].name] = offset
        plan.sizes[owner[r].name] = size
        plan.arena_bytes = max(plan.arena_bytes, offset + size)
    plan.peak_live_bytes = peak_live_bytes(graph, env)
    return plan
