"""Memory passes: storage and liveness analysis, in-place scheduling.

Buffers are tracked by *storage*: a view shares its base's storage, and a
node that reuses an input's buffer (``node.reuse``) writes into that
storage. A storage is live from the node that creates it to the last node
reading any value stored in it. Graph inputs and constants are never
planned, and never written except donated inputs (``graph.donated``), which
an op may update in place once nothing else reads them.
"""

from __future__ import annotations

from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Op, Prop


def _aliases_input(n: Node) -> bool:
    return n.fallback is not None or n.opdef.has(Prop.VIEW)


def storage_of(graph: Graph) -> dict[int, int]:
    """value id -> id of the value owning its storage (-1: an input or constant that
    is never written; a donated input owns its storage)."""
    root: dict[int, int] = {}
    for v in graph.inputs + list(graph.const_values.values()):
        root[id(v)] = id(v) if v.name in graph.donated and v in graph.inputs else -1
    for n in graph.nodes:
        first = n.input_values()[0] if n.input_values() else None
        for i, o in enumerate(n.outputs):
            if _aliases_input(n) and first is not None:
                root[id(o)] = root[id(first)]
            elif n.reuse is not None and i == 0:
                root[id(o)] = root[id(n.inputs[n.reuse])]
            else:
                root[id(o)] = id(o)
    return root


def storage_last_use(graph: Graph, root: dict[int, int]) -> dict[int, int]:
    """storage id -> index of the last node reading it (len(nodes) for graph outputs)."""
    last: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        for o in n.outputs:
            last.setdefault(root[id(o)], i)
        for v in n.input_values():
            last[root[id(v)]] = i
    for v in graph.outputs:
        last[root[id(v)]] = len(graph.nodes)
    return last


# ops that return an updated copy of input 0 (scatter-like): in place they write into it
UPDATE_OPS = frozenset({Op.INDEX_PUT, Op.INDEX_COPY})


def schedule_inplace_ops(graph: Graph) -> Graph:
    """Let an element-wise or scatter-like op write into an input whose storage dies there.

    Sets ``node.reuse = k`` when input k (not a constant, not a graph input
    unless donated, not read by any later node through any view, same shape
    and dtype as the output, read once by this node, and no other input of
    the node a view of its storage) can hold the result. Scatter-like ops
    (index_put, index_copy) only update their input 0. Backends with in-place
    kernels use it; the memory planner gives both one buffer.
    """
    for n in graph.nodes:
        n.reuse = None
    is_view = {id(o) for n in graph.nodes if _aliases_input(n) for o in n.outputs}
    root = storage_of(graph)
    last = storage_last_use(graph, root)
    for i, n in enumerate(graph.nodes):
        update = n.op in UPDATE_OPS
        if n.fallback is not None or len(n.outputs) != 1 or not (
                update or n.opdef.has(Prop.ELEMENTWISE)):
            continue
        for k, v in enumerate(n.inputs[:1] if update else n.inputs):
            if _can_hold(n, i, v, root, last, is_view):
                n.reuse = k
                root = storage_of(graph)  # the output now lives in v's storage
                last = storage_last_use(graph, root)
                break
    return graph


def _can_hold(n: Node, i: int, v, root: dict, last: dict, is_view: set) -> bool:
    """Whether input ``v`` of node ``n`` (the graph's node ``i``) can hold its output."""
    return (isinstance(v, Value) and root[id(v)] != -1 and id(v) not in is_view
            and last.get(root[id(v)]) == i and v.spec == n.outputs[0].spec
            and sum(x is v for x in n.inputs) == 1
            and not any(root.get(id(x)) == root[id(v)] for x in n.input_values()
                        if x is not v))  # another input viewing v's storage


def can_write_into(graph: Graph, node: Node, v: Value) -> bool:
    """Whether ``node``'s output may be written into input ``v``'s storage (as
    ``schedule_inplace_ops`` decides, whichever input it picked): v's storage is
    neither a constant nor a graph input, nor a view, and dies at ``node``."""
    is_view = {id(o) for n in graph.nodes if _aliases_input(n) for o in n.outputs}
    root = storage_of(graph)
    return _can_hold(node, graph.nodes.index(node), v, root, storage_last_use(graph, root),
                     is_view)


def buffer_lifetimes(graph: Graph, env, align: int = 64) -> tuple[dict, dict, dict, dict]:
    """For each owned storage: (first node, last node, aligned bytes, owning value)."""
    root = storage_of(graph)
    last = storage_last_use(graph, root)
    first: dict[int, int] = {}
    owner: dict[int, Value] = {}
    for i, n in enumerate(graph.nodes):
        for o in n.outputs:
            if root[id(o)] == id(o):
                first[id(o)] = i
                owner[id(o)] = o
    sizes = {r: -(-owner[r].spec.nbytes(env) // align) * align for r in first}
    return first, {r: last[r] for r in first}, sizes, owner


def live_bytes(graph: Graph, env) -> list[int]:
    """Bytes of intermediate storage live while each node runs (one more entry: at the end)."""
    first, last, sizes, _ = buffer_lifetimes(graph, env)
    n = len(graph.nodes)
    delta = [0] * (n + 2)
    for r in first:
        delta[first[r]] += sizes[r]
        delta[min(last[r], n) + 1] -= sizes[r]
    live, acc = [], 0
    for i in range(n + 1):
        acc += delta[i]
        live.append(acc)
    return live


def peak_live_bytes(graph: Graph, env) -> int:
    """The most bytes of intermediate storage live at once, nodes run in order."""
    return max(live_bytes(graph, env), default=0)


def reorder_for_memory(graph: Graph) -> Graph:
    """Choose the node order that keeps the least intermediate memory live.

    A greedy list scheduler: of the nodes whose inputs are ready, run the one
    that frees the most bytes net of what it allocates (storages whose last
    reader it is, minus its own new outputs), ties going to the original
    order. Independent branches are then finished one at a time instead of
    side by side. Random ops keep their relative order. The new order is kept
    only if it lowers the peak of live intermediate bytes; graphs with
    symbolic shapes are left as they are.
    """
    nodes = graph.nodes
    if len(nodes) < 3 or not all(o.spec.is_static for n in nodes for o in n.outputs):
        return graph
    before = peak_live_bytes(graph, {})
    root = storage_of(graph)
    producer = {id(o): i for i, n in enumerate(nodes) for o in n.outputs}
    deps = [{producer[id(v)] for v in n.input_values() if id(v) in producer} for n in nodes]
    randoms = [i for i, n in enumerate(nodes) if n.fallback is None and n.opdef.has(Prop.RANDOM)]
    for a, b in zip(randoms, randoms[1:]):  # random draws keep their order (the RNG stream)
        deps[b].add(a)
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    readers: dict[int, set[int]] = {}  # storage -> nodes that read it
    for i, n in enumerate(nodes):
        for v in n.input_values():
            readers.setdefault(root[id(v)], set()).add(i)
    pinned = {root[id(v)] for v in graph.outputs}
    owned = [sum(o.spec.nbytes({}) for o in n.outputs if root[id(o)] == id(o)) for n in nodes]
    size = {id(o): o.spec.nbytes({}) for n in nodes for o in n.outputs}
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    left = {r: len(s) for r, s in readers.items()}
    order: list[int] = []

    def gain(i: int) -> int:
        freed = sum(size.get(r, 0) for r in {root[id(v)] for v in nodes[i].input_values()}
                    if left.get(r) == 1 and r not in pinned and r in size)
        return freed - owned[i]

    while ready:
        i = max(ready, key=lambda k: (gain(k), -k))
        ready.remove(i)
        order.append(i)
        for r in {root[id(v)] for v in nodes[i].input_values()}:
            left[r] -= 1
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(nodes) or order == list(range(len(nodes))):
        return graph
    original = graph.nodes
    graph.nodes = [nodes[i] for i in order]
    if peak_live_bytes(graph, {}) >= before:
        graph.nodes = original
    return graph
