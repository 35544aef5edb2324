"""Split a graph between a backend and the CPU fallback, with explicit transfers.

Nodes the chosen backend supports go to it; the rest run on the reference
backend (PyTorch kernels on the CPU). Consecutive nodes of one backend form
one partition, a subgraph compiled as a unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deepseek.backends.hal import Backend, get_backend
from deepseek.ir.graph import Graph, Node


@dataclass
class Partition:
    backend: Backend
    graph: Graph  # the subgraph: its inputs/outputs are Values of the parent graph
    executable: object = None
    device: str = "cpu"
    nodes: list[Node] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"backend": self.backend.name, "nodes": len(self.graph.nodes), "device": self.device}


def _subgraph(parent: Graph, nodes: list[Node], needed_later: set[int], first: bool) -> Graph:
    sub = Graph()
    defined: set[int] = set()
    if first:  # the first partition takes the graph's inputs, all of them, in order
        sub.inputs, sub.input_names = list(parent.inputs), list(parent.input_names)
        defined.update(id(v) for v in parent.inputs)
    for n in nodes:
        for v in n.input_values():
            if id(v) in defined:
                continue
            if parent.is_constant(v):
                sub.constants[v.name] = parent.constants[v.name]
                sub.const_values[v.name] = v
            else:
                sub.inputs.append(v)
                sub.input_names.append(v.name)
            defined.add(id(v))
        defined.update(id(o) for n2 in [n] for o in n2.outputs)
    sub.nodes = list(nodes)
    produced = {id(o) for n in nodes for o in n.outputs}
    sub.outputs = [o for n in nodes for o in n.outputs if id(o) in needed_later and id(o) in produced]
    return sub


def partition(graph: Graph, backend: Backend) -> list[Partition]:
    """Assign each node to ``backend`` or the reference fallback; one Partition per run."""
    fallback = get_backend("reference")
    runs: list[tuple[Backend, list[Node]]] = []
    for n in graph.nodes:
        b = backend if backend.supports(n) else fallback
        if runs and runs[-1][0] is b:
            runs[-1][1].append(n)
        else:
            runs.append((b, [n]))
    if not runs:  # a graph of no nodes (outputs are inputs or constants)
        runs = [(backend, [])]
    parts = []
    for k, (b, nodes) in enumerate(runs):
        later = {id(v) for v in graph.outputs}
        for _, other in runs[k + 1:]:
            later.update(id(v) for n in other for v in n.input_values())
        sub = _subgraph(graph, nodes, later, first=k == 0)
        parts.append(Partition(b, sub, device=b.capabilities().device, nodes=nodes))
    return parts

