"""Activation recomputation: trade compute for peak memory under a budget.

A value that is produced early and read again much later (a skip
connection; in a training graph, a forward activation read by the
backward) stays alive over the whole gap. ``activate_recompute`` drops such
a value after its early readers and computes it again right before its late
readers, from inputs that are alive at that point anyway, until the graph's
peak live memory fits the budget. Candidates are taken by bytes freed per
FLOP of recomputation, so cheap element-wise and normalization outputs go
first and GEMMs last.
"""

from __future__ import annotations

from typing import Mapping

from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Prop
from deepseek.passes.memory import peak_live_bytes


def _cost(node: Node, env: Mapping[str, int]) -> int:
    """Rough work of recomputing a node: its output size, far more for GEMM-class ops."""
    numel = max(1, node.outputs[0].spec.nbytes(env) // max(1, node.outputs[0].spec.dtype.itemsize))
    return numel * (1000 if node.opdef.has(Prop.MATMUL) else 1)


_peak = peak_live_bytes


_MAX_CHAIN = 4  # nodes recomputed for one value, at most


def _candidates(graph: Graph, env):
    """(score, value, chain of nodes to recompute, index of the first late reader)."""
    producers = graph.producers()
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    always = {id(v) for v in graph.inputs} | {id(v) for v in graph.const_values.values()}
    readers: dict[int, list[int]] = {}
    for i, n in enumerate(graph.nodes):
        for v in n.input_values():
            readers.setdefault(id(v), []).append(i)

    def chain(v: Value, late: int) -> list[Node] | None:
        """The nodes that recompute ``v`` at ``late`` from values alive there anyway."""
        p = producers[v]
        if len(p.outputs) != 1 or p.fallback is not None or p.opdef.has(Prop.RANDOM | Prop.VIEW):
            return None
        nodes = [p]
        for x in p.input_values():
            if id(x) in always or max(readers.get(id(x), [-1])) >= late:
                continue  # alive at the late read without help
            if x not in producers:
                return None
            sub = chain(x, late)
            if sub is None:
                return None
            nodes = sub + [n for n in nodes if all(n is not m for m in sub)]
        return nodes if len(nodes) <= _MAX_CHAIN else None

    found = []
    for v, p in producers.items():
        uses = sorted(set(readers.get(id(v), [])))
        if len(uses) < 2 or any(x is v for x in graph.outputs):
            continue
        gap, split = max((b - a, k) for k, (a, b) in enumerate(zip(uses, uses[1:])))
        late = uses[split + 1]
        nodes = chain(v, late) if gap > 1 else None
        if nodes and all(position[id(n)] < late for n in nodes):
            cost = sum(_cost(n, env) for n in nodes)
            found.append((v.spec.nbytes(env) * gap / cost, v, nodes, late))
    found.sort(key=lambda t: -t[0])
    return found


def activate_recompute(graph: Graph, memory_budget: int, env: Mapping[str, int] | None = None,
                       max_steps: int = 64) -> Graph:
    """Recompute long-lived values until peak live memory <= ``memory_budget`` bytes.

    Returns the graph (possibly still over budget when no candidate is left;
    compare ``plan_memory(graph, env).peak_live_bytes`` with the budget).
    ``env`` binds symbolic dims for the sizes (static graphs need none).
    """
    env = dict(env or {})
    for _ in range(max_steps):
        if _peak(graph, env) <= memory_budget:
            break
        for _, v, nodes, late in _candidates(graph, env):
            before = _peak(graph, env)
            twins, renamed = [], {}
            for n in nodes:  # copies of the chain, reading each other's results
                outs = [Value(graph.fresh_name(f"{o.name}_recomputed"), o.spec) for o in n.outputs]
                renamed.update(zip(map(id, n.outputs), outs))
                twins.append(Node(n.op, [renamed.get(id(x), x) if isinstance(x, Value) else x
                                         for x in n.inputs], dict(n.attrs), outs, n.source,
                                  n.fallback))
            new_v = renamed[id(v)]
            saved_nodes = graph.nodes
            saved_inputs = {id(n): n.inputs for n in saved_nodes[late:]}
            graph.nodes = list(saved_nodes[:late]) + twins + list(saved_nodes[late:])
            for n in saved_nodes[late:]:
                n.inputs = [new_v if x is v else x for x in n.inputs]
            if _peak(graph, env) < before:
                break
            graph.nodes = saved_nodes  # no gain: undo
            for n in saved_nodes[late:]:
                n.inputs = saved_inputs[id(n)]
        else:
            break  # no candidate lowers the peak any further
    return graph
