"""Clean-up passes: constant folding, dead-code elimination, algebraic simplification."""

from __future__ import annotations

import torch

from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.interpreter import run_node
from deepseek.ir.ops import Op, Prop
from deepseek.ir.types import TensorSpec, has_sym

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
            # one contiguous copy of its own (contiguous() then clone() copied twice)
            c = graph.add_constant(o.name, t.clone(memory_format=torch.contiguous_format))
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


_IDENTITY_OPS = {Op.CLONE, Op.ALIAS, Op.DETACH, Op.LIFT_FRESH_COPY, Op.CONTIGUOUS}
_VIEW_OPS = {Op.VIEW, Op.UNSAFE_VIEW, Op.RESHAPE}
_NEUTRAL = {  # op -> (position of the neutral operand, its value)
    Op.MUL_TENSOR: 1, Op.MUL_SCALAR: 1, Op.DIV_TENSOR: 1, Op.DIV_SCALAR: 1,
    Op.ADD_TENSOR: 0, Op.ADD_SCALAR: 0, Op.SUB_TENSOR: 0, Op.SUB_SCALAR: 0,
}
_INT_MAX = 2**63 - 1


def _replacement(graph: Graph, node, producers) -> Value | None:
    """The value ``node`` can be replaced by, or None (see simplify_algebra)."""
    op, ins, attrs, out = node.op, node.inputs, node.attrs, node.outputs[0] if node.outputs else None
    x = ins[0] if ins and isinstance(ins[0], Value) else None
    if x is None or node.fallback is not None or len(node.outputs) != 1 or x.spec != out.spec:
        return None  # every rewrite below keeps shape and dtype exactly
    if op in _IDENTITY_OPS and not attrs.get("memory_format"):
        return x
    if op is Op.TO_COPY and set(attrs) <= {"dtype"}:
        return x
    if op in _NEUTRAL and len(ins) > 1 and not isinstance(ins[1], Value) \
            and ins[1] == _NEUTRAL[op] and attrs.get("alpha", 1) == 1:
        return x
    if op in _VIEW_OPS or op is Op.EXPAND:
        return x  # to its own shape
    if op is Op.PERMUTE and list(attrs["dims"]) == list(range(x.spec.rank)):
        return x
    if op is Op.SLICE_TENSOR and attrs.get("step", 1) == 1:
        return x  # same shape as its input: the full range
    return None


def simplify_algebra(graph: Graph) -> Graph:
    """Remove ops that compute their input and collapse chains of layout ops.

    * ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0`` (no broadcast, no dtype change) -> ``x``
    * clone / alias / detach / same-dtype cast / view, expand or slice to the
      same shape / identity permute -> ``x``
    * ``view(view(x))`` -> ``view(x)``; ``permute(permute(x, p), q)`` -> one permute
    * max pooling whose indices nobody reads -> max pooling without indices
    * ``bmm(a, expand(w))`` with one weight broadcast over the batch (what
      ``matmul`` of a strided 3-D input and a 2-D weight decomposes to) ->
      ``mm(reshape(a), w)``: one GEMM reading the weight once, not once per batch
    """
    producers = graph.producers()
    users = graph.users()
    outputs = {id(v) for v in graph.outputs}
    kept = []
    for node in graph.nodes:
        if node.op is Op.MAX_POOL2D_WITH_INDICES and not users.get(node.outputs[1]) \
                and id(node.outputs[1]) not in outputs:
            node.op, node.outputs = Op.MAX_POOL2D, node.outputs[:1]  # nobody reads the indices
        new = _replacement(graph, node, producers)
        if new is not None:
            graph.replace_all_uses(node.outputs[0], new)
            continue
        src = producers.get(node.inputs[0]) if node.inputs and isinstance(node.inputs[0], Value) \
            else None
        if src is not None and node.op in _VIEW_OPS and src.op in _VIEW_OPS:
            node.inputs[0] = src.inputs[0]  # view of a view: reshape the original
        elif src is not None and node.op is Op.PERMUTE and src.op is Op.PERMUTE:
            inner, outer = src.attrs["dims"], node.attrs["dims"]
            node.inputs[0] = src.inputs[0]
            node.attrs = {**node.attrs, "dims": [inner[d] for d in outer]}
            if node.attrs["dims"] == list(range(len(outer))):
                graph.replace_all_uses(node.outputs[0], src.inputs[0])
                continue
        kept.extend(_unbroadcast_bmm(graph, node, producers) or [node])
    graph.nodes = kept
    return eliminate_dead_code(graph)


def _unbroadcast_bmm(graph: Graph, node, producers) -> list | None:
    """Nodes computing ``bmm(a, expand(w))`` as one mm on ``a``'s rows, or None."""
    if node.op is not Op.BMM or node.fallback is not None:
        return None
    a, b = node.inputs
    src = producers.get(b)
    if src is None or src.op is not Op.EXPAND or not isinstance(src.inputs[0], Value):
        return None
    w, out = src.inputs[0], node.outputs[0]
    if not (a.spec.is_static and w.spec.is_static and out.spec.is_static) or \
            w.spec.rank not in (2, 3) or (w.spec.rank == 3 and w.spec.shape[0] != 1):
        return None
    batch, m, k = a.spec.shape
    n = w.spec.shape[-1]
    made = []

    def add(op, inputs, attrs, shape, name):
        v = graph.add_node(op, inputs, attrs, [TensorSpec(tuple(shape), out.spec.dtype)], name)
        made.append(graph.nodes.pop())  # placed by the caller, in order
        return v.outputs[0]

    rows = add(Op.RESHAPE, [a], {"shape": [batch * m, k]}, (batch * m, k), f"{out.name}_rows")
    if w.spec.rank == 3:
        w = add(Op.RESHAPE, [w], {"shape": [k, n]}, (k, n), f"{out.name}_weight")
    mm = add(Op.MM, [rows, w], {}, (batch * m, n), f"{out.name}_mm")
    res = add(Op.RESHAPE, [mm], {"shape": [batch, m, n]}, (batch, m, n), f"{out.name}_batched")
    graph.replace_all_uses(out, res)
    return made


def _is_causal_mask(mask: torch.Tensor, length: int) -> bool:
    """Whether ``mask`` (leading dims 1, then (length, length)) lets query i attend to
    exactly the keys j <= i: True there and False elsewhere (boolean), or 0 there and
    -inf or less than half the dtype's lowest value elsewhere (additive; such a score
    adds nothing to a softmax whose row has an attended score)."""
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (length, length) \
            or any(d != 1 for d in mask.shape[:-2]):
        return False
    m = mask.reshape(length, length)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    if m.dtype == torch.bool:
        return bool(torch.equal(m, allowed))
    if not m.dtype.is_floating_point:
        return False
    blocked = m[~allowed]
    return bool((m[allowed] == 0).all()) and bool(
        (blocked <= torch.finfo(m.dtype).min / 2).all())


def use_causal_attention(graph: Graph) -> Graph:
    """Attention whose mask is a constant causal mask runs as ``is_causal`` instead.

    A decoder's mask for a prompt with no padding (query i attends to keys
    j <= i, the same for every batch row and head) is what scaled dot-product
    attention's ``is_causal`` computes without reading a mask; its kernels
    then skip the blocks above the diagonal, half the work (the flash kernels,
    on CPU and GPU, take no mask at all). Only square attention (as many
    queries as keys), where both of PyTorch's and the models' alignments of a
    causal mask agree.
    """
    for n in graph.nodes:
        if n.op is not Op.SCALED_DOT_PRODUCT_ATTENTION or n.fallback is not None \
                or len(n.inputs) < 4 or not graph.is_constant(n.inputs[3]) \
                or n.attrs.get("is_causal") or n.attrs.get("dropout_p"):
            continue
        q, k = n.inputs[0].spec.shape, n.inputs[1].spec.shape
        length = q[-2]
        if isinstance(length, int) and k[-2] == length \
                and _is_causal_mask(graph.constants[n.inputs[3].name], length):
            n.inputs[3] = None  # as if captured with no mask
            n.attrs["is_causal"] = True
    graph.remove_unused_constants()
    return graph


def precompute_attention_masks(graph: Graph) -> Graph:
    """Make a boolean attention mask that several attention nodes read additive, once.

    Scaled dot-product attention turns a boolean mask into an additive one
    (0 where attended, -inf elsewhere) on every call: two extra kernels per
    layer. ``where(mask, 0, -inf)`` in the query's dtype, computed once before
    the first reader, feeds them all instead; the attention is the same.
    """
    readers: dict[int, list[Node]] = {}
    for n in graph.nodes:
        if n.op is Op.SCALED_DOT_PRODUCT_ATTENTION and n.fallback is None and len(n.inputs) > 3 \
                and isinstance(n.inputs[3], Value) and n.inputs[3].spec.dtype == torch.bool:
            readers.setdefault(id(n.inputs[3]), []).append(n)
    before: dict[int, Node] = {}  # id(first reader) -> the node to put in front of it
    for nodes in readers.values():
        dtypes = {n.inputs[0].spec.dtype for n in nodes}
        if len(nodes) < 2 or len(dtypes) != 1:
            continue
        mask, dtype = nodes[0].inputs[3], dtypes.pop()
        zero = graph.add_constant("mask_zero", torch.zeros((), dtype=dtype))
        neg_inf = graph.add_constant("mask_neg_inf", torch.full((), float("-inf"), dtype=dtype))
        additive = Value(graph.fresh_name(f"{mask.name}_additive"),
                         TensorSpec(mask.spec.shape, dtype))
        before[id(nodes[0])] = Node(Op.WHERE_SELF, [mask, zero, neg_inf], {}, [additive])
        for n in nodes:
            n.inputs[3] = additive
    if before:
        graph.nodes = [m for n in graph.nodes for m in ([before[id(n)]] if id(n) in before else [])
                       + [n]]
    return graph
