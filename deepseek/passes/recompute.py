"""Activation recomputation: trade compute for peak memory under a budget.

A value that is produced early and read again much later (a skip
connection; in a training graph, a forward activation the backward reads)
keeps its buffer alive over the whole gap. ``activate_recompute`` frees such
a buffer after its early readers and computes the value again right before
its first late reader, from values that are alive there anyway, until the
graph's peak live memory fits the budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

from deepseek.errors import MemoryBudgetError
from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Prop
from deepseek.passes.cse import RECOMPUTED
from deepseek.passes.memory import buffer_lifetimes, live_bytes, schedule_inplace_ops, storage_of
from deepseek.profiler.flops import node_flops

log = logging.getLogger(__name__)

_MAX_CHAIN = 8  # nodes recomputed for one buffer, at most (views not counted)


def recompute_cost(node: Node, env: Mapping[str, int]) -> int:
    """Work of recomputing ``node``: its FLOPs, at least one per output element (a copy
    costs its size); views cost nothing."""
    if node.fallback is None and node.opdef.has(Prop.VIEW):
        return 0
    numel = sum(o.spec.nbytes(env) // o.spec.dtype.itemsize for o in node.outputs)
    return max(node_flops(node, env), numel)


def _recomputable(node: Node) -> bool:
    # fallback nodes may alias their inputs; random ops would draw new numbers
    return node.fallback is None and not node.opdef.has(Prop.RANDOM)


@dataclass
class _Candidate:
    """Free storage ``root`` between its reads before and after the peak; recompute it."""

    score: float
    root: int
    nodes: list[Node]  # to copy, in graph order: the recompute chain and views of its result
    late: int  # index of the first late reader: the copies go right before it
    values: list[Value]  # the storage's values read at or after ``late``, to read from copies
    cost: int


class _Liveness:
    """Buffers of the graph as it is now: where each is made, read and freed."""

    def __init__(self, graph: Graph, env: Mapping[str, int]):
        self.graph, self.env = graph, env
        self.root = storage_of(graph)
        self.first, self.last, self.sizes, self.owner = buffer_lifetimes(graph, env)
        self.live = live_bytes(graph, env)
        self.position = {id(n): i for i, n in enumerate(graph.nodes)}
        self.producer: dict[int, Node] = {}
        self.reads: dict[int, list[int]] = {}  # storage -> indices of the nodes reading it
        for i, n in enumerate(graph.nodes):
            for o in n.outputs:
                self.producer[id(o)] = n
            for v in n.input_values():
                r = self.root[id(v)]
                if r != -1 and (not self.reads.get(r) or self.reads[r][-1] != i):
                    self.reads.setdefault(r, []).append(i)

    def alive_at(self, v: Value, late: int, freed: int) -> bool:
        r = self.root[id(v)]
        return r == -1 or (r != freed and self.last[r] >= late)

    def chain(self, v: Value, late: int, freed: int, nodes: dict[int, Node]) -> bool:
        """Add to ``nodes`` what recomputes ``v`` at ``late`` from values alive there."""
        p = self.producer[id(v)]
        if id(p) in nodes:
            return True
        if not _recomputable(p):
            return False
        for x in p.input_values():
            if not self.alive_at(x, late, freed) and not self.chain(x, late, freed, nodes):
                return False
        nodes[id(p)] = p
        return sum(not n.opdef.has(Prop.VIEW) for n in nodes.values()) <= _MAX_CHAIN

    def candidate(self, r: int, at: int) -> _Candidate | None:
        """Recomputing storage ``r`` so that it is not live at node ``at``, if possible."""
        reads = self.reads.get(r, [])
        if self.first[r] >= at or self.last[r] >= len(self.graph.nodes) or at in reads:
            return None  # made at the peak, a graph output, or read there
        late = next((i for i in reads if i > at), None)
        if late is None:
            return None
        nodes = self.graph.nodes
        values = {id(v): v for n in nodes[late:] for v in n.input_values()
                  if self.root[id(v)] == r and self.position[id(self.producer[id(v)])] < late}
        chain: dict[int, Node] = {}
        for v in values.values():  # the owner, or views of it made before ``late``
            while v is not self.owner[r]:
                p = self.producer[id(v)]
                if not (p.fallback is None and p.opdef.has(Prop.VIEW)):
                    return None  # a buffer written in place, or by a fallback kernel
                chain[id(p)] = p
                v = p.inputs[0]
        if not self.chain(self.owner[r], late, r, chain):
            return None
        ordered = sorted(chain.values(), key=lambda n: self.position[id(n)])
        cost = sum(recompute_cost(n, self.env) for n in ordered)
        return _Candidate(self.sizes[r] / (cost + 1), r, ordered, late, list(values.values()),
                          cost)

    def candidates(self, at: int, excess: int, covering_first: bool) -> list[_Candidate]:
        """The candidates at node ``at``, to try in order: by bytes per unit of work; with
        ``covering_first``, those that free ``excess`` bytes or more (enough for this node
        alone) go first, cheapest first."""
        found = [c for c in (self.candidate(r, at) for r in self.first
                             if self.first[r] < at <= self.last[r]) if c is not None]
        if covering_first:
            return sorted(found, key=lambda c: (0, c.cost, 0.0) if self.sizes[c.root] >= excess
                          else (1, 0, -c.score))
        return sorted(found, key=lambda c: -c.score)


def _apply(graph: Graph, nodes: list[Node], late: int, values: list[Value]):
    """Insert copies of ``nodes`` before ``graph.nodes[late]``; it and later readers of
    ``values`` read the copies. Returns a function that undoes the rewrite, and the
    copies."""
    twins, renamed = [], {}
    for n in nodes:
        outs = [Value(graph.fresh_name(f"{o.name}{RECOMPUTED}"), o.spec) for o in n.outputs]
        renamed.update(zip(map(id, n.outputs), outs))
        twins.append(Node(n.op, [renamed.get(id(x), x) if isinstance(x, Value) else x
                                 for x in n.inputs], dict(n.attrs), outs, n.source, n.fallback))
    swap = {id(v): renamed[id(v)] for v in values}
    old_nodes = graph.nodes
    old_inputs = {id(n): n.inputs for n in old_nodes[late:]}
    for n in old_nodes[late:]:
        if any(isinstance(x, Value) and id(x) in swap for x in n.inputs):
            n.inputs = [swap.get(id(x), x) if isinstance(x, Value) else x for x in n.inputs]
    graph.nodes = old_nodes[:late] + twins + old_nodes[late:]

    def undo():
        graph.nodes = old_nodes
        for n in old_nodes[late:]:
            n.inputs = old_inputs[id(n)]

    return undo, twins


@dataclass
class _Rewrite:
    """A rewrite the greedy pass kept, to make again on the graph as captured (``_replay``):
    the copies of ``nodes`` go before ``before``, whose readers of ``values`` read them."""

    nodes: list[Node]  # originals, or copies an earlier rewrite made
    before: Node
    values: list[Value]
    cost: int
    twins: list[Node]  # the copies it made


def _greedy(graph: Graph, env: Mapping[str, int], memory_budget: int, max_steps: int,
            covering_first: bool) -> list[_Rewrite]:
    """Rewrite ``graph`` (see ``activate_recompute``) until its peak fits the budget or
    nothing lowers it; returns the rewrites kept, in order."""
    rejected: set[tuple] = set()
    kept: list[_Rewrite] = []
    for _ in range(max_steps):
        state = _Liveness(graph, env)
        peak = max(state.live)
        if peak <= memory_budget:
            break
        at = state.live.index(peak)
        for c in state.candidates(at, peak - memory_budget, covering_first):
            key = (id(state.owner[c.root]), at, peak)
            if key in rejected:
                continue
            before = graph.nodes[c.late]
            undo, twins = _apply(graph, c.nodes, c.late, c.values)
            live = live_bytes(graph, env)
            if max(live) <= peak and live[at] < peak:
                kept.append(_Rewrite(c.nodes, before, c.values, c.cost, twins))
                break
            undo()
            rejected.add(key)
        else:
            break  # nothing live at the peak can be recomputed to lower it
    return kept


def _restore(graph: Graph, captured: list[Node], inputs: dict[int, list]) -> None:
    """``graph`` back as captured: its ``captured`` nodes, reading their ``inputs``."""
    graph.nodes = list(captured)
    for n in captured:
        n.inputs = inputs[id(n)]


def _replay(graph: Graph, captured: list[Node], inputs: dict[int, list],
            rewrites: list[_Rewrite], skip: set[int]) -> int | None:
    """Make ``rewrites`` but those in ``skip`` again, on ``graph`` as captured (its
    ``captured`` nodes with their ``inputs``); returns the work added, or None (the graph
    left partly rewritten) where a kept rewrite copies or reads what a skipped one made."""
    _restore(graph, captured, inputs)
    made: dict[int, Node] = {}  # recorded copy -> the copy made now
    values: dict[int, Value] = {}  # recorded copy's output -> the output made now
    dropped: set[int] = set()  # the skipped rewrites' copies and their outputs
    work = 0
    for i, rw in enumerate(rewrites):
        if i in skip:
            dropped.update(id(x) for t in rw.twins for x in (t, *t.outputs))
            continue
        if any(id(x) in dropped for x in (*rw.nodes, rw.before, *rw.values)):
            return None
        before = made.get(id(rw.before), rw.before)
        _, twins = _apply(graph, [made.get(id(n), n) for n in rw.nodes],
                          graph.nodes.index(before), [values.get(id(v), v) for v in rw.values])
        for old, new in zip(rw.twins, twins):
            made[id(old)] = new
            values.update(zip(map(id, old.outputs), new.outputs))
        work += rw.cost
    return work


def _pruned(graph: Graph, env: Mapping[str, int], memory_budget: int, captured: list[Node],
            inputs: dict[int, list], rewrites: list[_Rewrite]) -> int:
    """Drop the rewrites the budget holds without (the greedy pass fixes one peak at a
    time: a rewrite made for an early peak can be covered by later ones), the most work
    first; ``graph`` ends with the rest made again. Returns the work they add."""
    skip: set[int] = set()
    for i in sorted(range(len(rewrites)), key=lambda i: -rewrites[i].cost):
        work = _replay(graph, captured, inputs, rewrites, skip | {i})
        if work is not None and max(live_bytes(graph, env)) <= memory_budget:
            skip.add(i)
    work = _replay(graph, captured, inputs, rewrites, skip)
    assert work is not None  # each rewrite skipped was replayed without it above
    return work


def activate_recompute(graph: Graph, memory_budget: int, env: Mapping[str, int] | None = None,
                       max_steps: int = 10_000) -> Graph:
    """Recompute activations so that peak live memory is at most ``memory_budget`` bytes.

    The rewrite, repeated while the peak (``peak_live_bytes``, nodes run in
    order) is over budget: take a buffer live at the peak node, read before
    it and again after it (a forward activation the backward reads, a skip
    connection); after its last read before the peak it is freed, and copies
    of the nodes that compute it (a chain of up to 8 ops plus views, from
    values alive at that point anyway: graph inputs, constants, buffers still
    read later) go right before its first read after the peak; that reader and
    all later ones read the copies. Among such buffers the one with the
    most bytes per unit of recomputation work (FLOPs, at least one per element
    made) goes first, so element-wise, normalization and copy outputs
    recomputed from kept GEMM/convolution outputs go before GEMMs. A second
    run tries first, cheapest first, the buffers that alone free what the peak
    node is over budget by. Each run then drops, the most work first, every
    rewrite the budget holds without (one made for an early peak can be covered
    by later ones), and the run that adds less work is kept (neither order
    wins on every budget: each looks at one peak at a time). A rewrite
    that would not lower the peak (the copies' own buffers) is undone. Random
    ops and fallback kernels are never recomputed. In-place annotations
    (``schedule_inplace_ops``) are dropped and scheduled again afterwards.

    Returns the graph; a graph already within budget is left as it is.
    Raises MemoryBudgetError, leaving the graph unchanged, when no such
    rewrite brings the peak within budget (the message gives the lowest peak
    reached). ``env`` binds symbolic dims for the sizes (static graphs need none).

    Example (a training step, see ``deepseek.frontend.training``)::

        graph = capture_train_step(model, (x,), F.cross_entropy, (y,))
        activate_recompute(graph, int(0.6 * peak_live_bytes(graph, {})))
    """
    env = dict(env or {})
    if max(live_bytes(graph, env), default=0) <= memory_budget:
        return graph
    old_nodes = list(graph.nodes)
    captured_inputs = {id(n): n.inputs for n in old_nodes}
    reuse = {id(n): n.reuse for n in old_nodes}
    for n in old_nodes:
        n.reuse = None  # an in-place write would clobber a buffer the copies read
    start = max(live_bytes(graph, env))
    best = None  # (over budget, its peak if over else the work added, nodes, their inputs)
    for covering_first in (False, True):
        rewrites = _greedy(graph, env, memory_budget, max_steps, covering_first)
        work = sum(rw.cost for rw in rewrites)
        if max(live_bytes(graph, env)) <= memory_budget:
            work = _pruned(graph, env, memory_budget, old_nodes, captured_inputs, rewrites)
        peak = max(live_bytes(graph, env))
        result = (peak > memory_budget, peak if peak > memory_budget else work,
                  list(graph.nodes), [n.inputs for n in graph.nodes])
        if best is None or result[:2] < best[:2]:
            best = result
        _restore(graph, old_nodes, captured_inputs)  # for the next order
    graph.nodes = best[2]
    for n, inputs in zip(best[2], best[3]):
        n.inputs = inputs
    live = live_bytes(graph, env)
    peak = max(live)
    if peak > memory_budget:
        where = graph.nodes[live.index(peak)].name if live.index(peak) < len(graph.nodes) \
            else "the end"
        _restore(graph, old_nodes, captured_inputs)
        for n in old_nodes:
            n.reuse = reuse[id(n)]
        raise MemoryBudgetError(
            f"activate_recompute: peak live memory {start} bytes cannot be brought within the "
            f"budget of {memory_budget} bytes: recomputation reaches {peak} bytes at best, at "
            f"%{where}, where no live buffer can be recomputed to lower it (each is read there, "
            f"is a graph output, has a random or fallback producer, is more than {_MAX_CHAIN} "
            f"ops away from values alive there, or its copies would take as much memory); give "
            f"a budget of at least {peak} bytes, or a smaller batch")
    if any(r is not None for r in reuse.values()):
        schedule_inplace_ops(graph)
    log.info("activate_recompute: peak %d -> %d bytes (budget %d), %d nodes recomputed",
             start, peak, memory_budget, len(graph.nodes) - len(old_nodes))
    return graph
