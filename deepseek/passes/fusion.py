"""Fusion passes: rewrites that merge several ops into one."""

from __future__ import annotations

import torch

from deepseek.ir.fused import dump_program
from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Op, Prop
from deepseek.ir.serialize import encode_attr
from deepseek.ir.types import TensorSpec


def fuse_conv_bn(graph: Graph) -> Graph:
    """Fold an inference batch norm into the convolution that feeds it.

    ``bn(conv(x, W, b))`` with constant W, b and BN statistics becomes
    ``conv(x, W * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``
    per output channel (computed in float64). Only when the convolution's
    output has no other reader and the BN's mean/rstd outputs are unused.
    """
    producers = graph.producers()
    users = graph.users()
    outputs = {id(v) for v in graph.outputs}
    removed: set[int] = set()
    for bn in graph.nodes:
        if bn.op is not Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING:
            continue
        x, gamma, beta, mean, var = bn.inputs
        conv = producers.get(x)
        if (conv is None or conv.op is not Op.CONVOLUTION or conv.attrs.get("transposed")
                or len(users.get(x, [])) != 1 or id(x) in outputs
                or any(users.get(o) or id(o) in outputs for o in bn.outputs[1:])):
            continue
        w, b = conv.inputs[1], conv.inputs[2]
        if not all(graph.is_constant(v) for v in (w, gamma, beta, mean, var)):
            continue
        if b is not None and not graph.is_constant(b):
            continue
        _fold(graph, conv, bn, w, b, gamma, beta, mean, var)
        graph.replace_all_uses(bn.outputs[0], conv.outputs[0])
        removed.add(id(bn))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]
    graph.remove_unused_constants()
    return graph


def _fold(graph: Graph, conv: Node, bn: Node, w, b, gamma, beta, mean, var) -> None:
    c = graph.constants
    eps = float(bn.attrs["eps"])
    W = c[w.name]
    scale = c[gamma.name].double() / torch.sqrt(c[var.name].double() + eps)
    bias = c[b.name].double() if b is not None else torch.zeros_like(scale)
    new_w = (W.double() * scale.reshape(-1, *([1] * (W.dim() - 1)))).to(W.dtype)
    new_b = ((bias - c[mean.name].double()) * scale + c[beta.name].double()).to(W.dtype)
    conv.inputs[1] = graph.add_constant(f"{w.name}_bn", new_w.contiguous())
    conv.inputs[2] = graph.add_constant(f"{conv.name}_bias_bn", new_b.contiguous())


def merge_sibling_gemms(graph: Graph) -> Graph:
    """Merge GEMMs that read the same input into one GEMM over their weights side by side.

    ``q = addmm(bq, x, Wq); k = addmm(bk, x, Wk); v = addmm(bv, x, Wv)`` with
    constant (K, N_i) weights and constant biases (or none at all) becomes
    ``qkv = addmm(cat(bq, bk, bv), x, cat(Wq, Wk, Wv))`` and three column
    slices of it (views: no copy). One wide GEMM reads x once, launches once
    and keeps a GPU's tensor cores busier than three narrow ones (BERT's
    attention projections). The merged GEMM takes the place of the first one.
    Quantized linears (``linear_int8``, ``linear_int8_dynamic``) of equal
    attributes merge alike: their (N_i, K) int8 weights, per-channel scales and
    biases stacked, so a dynamic one quantizes its rows once for all three.
    """
    def key(n: Node):
        if n.fallback is not None:
            return None
        if n.op in _INT8_LINEARS:
            return _int8_key(graph, n)
        if n.op not in (Op.ADDMM, Op.MM):
            return None
        b, x, w = n.inputs if n.op is Op.ADDMM else (None, *n.inputs)
        if not (isinstance(x, Value) and graph.is_constant(w) and w.spec.rank == 2
                and (b is None or (graph.is_constant(b) and b.spec.shape == (w.spec.shape[1],)))
                and n.attrs.get("beta", 1) == 1 and n.attrs.get("alpha", 1) == 1):
            return None
        return id(x), n.op, w.spec.shape[0], w.spec.dtype

    groups: dict[tuple, list[Node]] = {}
    for n in graph.nodes:
        k = key(n)
        if k is not None:
            groups.setdefault(k, []).append(n)
    replaced: dict[int, list[Node]] = {}  # id(first GEMM of a group) -> the nodes replacing it
    removed: set[int] = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        first = group[0]
        merged, widths = (_merged_int8 if first.op in _INT8_LINEARS else _merged_gemm)(graph, group)
        out = merged.outputs[0]
        dim, start = out.spec.rank - 1, 0
        nodes = [merged]
        for n, width in zip(group, widths):
            nodes.append(Node(Op.SLICE_TENSOR, [out], {"dim": dim, "start": start,
                                                       "end": start + width, "step": 1},
                              n.outputs, n.source))
            start += width
        replaced[id(first)] = nodes
        removed.update(id(n) for n in group[1:])
    graph.nodes = [m for n in graph.nodes if id(n) not in removed
                   for m in replaced.get(id(n), [n])]
    graph.remove_unused_constants()
    return graph


_INT8_LINEARS = (Op.LINEAR_INT8, Op.LINEAR_INT8_DYNAMIC)


def _int8_key(graph: Graph, n: Node):
    """What quantized linears must share to merge: input, op, attributes, K, a bias or none;
    constant weights and scales, no weight zero point."""
    x, w, scale, zero_point, bias = n.inputs
    if not (isinstance(x, Value) and graph.is_constant(w) and graph.is_constant(scale)
            and zero_point is None and (bias is None or graph.is_constant(bias))):
        return None
    return (id(x), n.op, tuple(sorted((k, repr(v)) for k, v in n.attrs.items())),
            w.spec.shape[1], bias is None)


def _merged_gemm(graph: Graph, group: list[Node]) -> tuple[Node, list[int]]:
    first = group[0]
    ws = [graph.constants[n.inputs[-1].name] for n in group]
    w = graph.add_constant(f"{first.inputs[-1].name}_merged", torch.cat(ws, 1))
    x = first.inputs[-2]
    inputs = [x, w]
    if first.op is Op.ADDMM:
        b = torch.cat([graph.constants[n.inputs[0].name] for n in group])
        inputs = [graph.add_constant(f"{first.inputs[0].name}_merged", b), x, w]
    out = Value(graph.fresh_name(f"{first.outputs[0].name}_merged"),
                TensorSpec((x.spec.shape[0], w.spec.shape[1]), first.outputs[0].spec.dtype))
    return Node(first.op, inputs, {}, [out], first.source), [t.shape[1] for t in ws]


def _merged_int8(graph: Graph, group: list[Node]) -> tuple[Node, list[int]]:
    first = group[0]
    x = first.inputs[0]
    ws = [graph.constants[n.inputs[1].name] for n in group]
    scales = [graph.constants[n.inputs[2].name].float().reshape(-1).expand(w.shape[0])
              for n, w in zip(group, ws)]
    inputs = [x, graph.add_constant(f"{first.inputs[1].name}_merged", torch.cat(ws, 0)),
              graph.add_constant(f"{first.inputs[2].name}_merged", torch.cat(scales)), None,
              None if first.inputs[4] is None else graph.add_constant(
                  f"{first.inputs[4].name}_merged",
                  torch.cat([graph.constants[n.inputs[4].name] for n in group]))]
    spec = first.outputs[0].spec
    out = Value(graph.fresh_name(f"{first.outputs[0].name}_merged"),
                TensorSpec((*spec.shape[:-1], sum(w.shape[0] for w in ws)), spec.dtype))
    return Node(first.op, inputs, dict(first.attrs), [out], first.source), \
        [w.shape[0] for w in ws]


def fuse_add_layer_norm(graph: Graph) -> Graph:
    """Merge a residual add with the layer norm that reads it into one kernel.

    ``s = add(x, r); y = layer_norm(s)`` (same shapes, no broadcast, dtypes
    that promote to the sum's: a bf16 sub-block output into a float32 residual; the norm's mean and rstd unused) becomes
    ``s, y = deepseek::add_layer_norm(x, r, weight, bias)`` at the add's
    place: the sum is written once and normalized while it is in registers,
    instead of written, read back and normalized by a second kernel. ``s``
    keeps its other readers (the next residual add of a pre-norm block).
    """
    producers = graph.producers()
    users = graph.users()
    outputs = {id(v) for v in graph.outputs}
    merged: dict[int, Node] = {}  # id(add node) -> the fused node taking its place
    removed: set[int] = set()
    for ln in graph.nodes:
        if ln.op is not Op.NATIVE_LAYER_NORM or ln.fallback is not None or \
                any(users.get(o) or id(o) in outputs for o in ln.outputs[1:]):
            continue
        add = producers.get(ln.inputs[0])
        if add is None or add.op is not Op.ADD_TENSOR or add.fallback is not None or \
                id(add) in merged or add.attrs.get("alpha", 1) != 1:
            continue
        s = add.outputs[0]
        if not all(isinstance(v, Value) and v.spec.shape == s.spec.shape for v in add.inputs) \
                or torch.promote_types(*(v.spec.dtype for v in add.inputs)) != s.spec.dtype:
            continue
        w, b = (ln.inputs[1:] + [None, None])[:2]
        merged[id(add)] = Node(Op.ADD_LAYER_NORM, [add.inputs[0], add.inputs[1], w, b],
                               {"normalized_shape": ln.attrs["normalized_shape"],
                                "eps": ln.attrs["eps"]},
                               [s, ln.outputs[0]], add.source or ln.source)
        removed.add(id(ln))
    graph.nodes = [merged.get(id(n), n) for n in graph.nodes if id(n) not in removed]
    return graph


def fuse_rms_norm(graph: Graph) -> Graph:
    """Merge the ops of an RMS normalization into one ``deepseek::fused_rms_norm`` node.

    ``h = float(x); y = weight * dtype_of_x(h * rsqrt(mean(h ** 2, -1) + eps))`` as
    transformers' RMSNorm writes it (the casts absent in float32 models, the weight
    optional) becomes ``fused_rms_norm(x, weight, eps)``: one kernel that reads the row once,
    instead of six element-wise and reduction kernels. Each intermediate must have no
    other reader.
    """
    producers, users = graph.producers(), graph.users()
    outputs = {id(v) for v in graph.outputs}

    def only_user(v: Value, op: Op) -> Node | None:
        us = users.get(v, [])
        if len(us) == 1 and us[0].op is op and us[0].fallback is None and id(v) not in outputs:
            return us[0]
        return None

    replaced: dict[int, Node] = {}
    removed: set[int] = set()
    for pw in graph.nodes:
        if pw.op is not Op.POW_TENSOR_SCALAR or pw.attrs.get("exponent") != 2 or \
                pw.fallback is not None or pw.inputs[0].spec.dtype != torch.float32:
            continue
        h = pw.inputs[0]
        mean = only_user(pw.outputs[0], Op.MEAN_DIM)
        if mean is None or list(mean.attrs.get("dim") or []) not in ([-1], [h.spec.rank - 1]) \
                or not mean.attrs.get("keepdim") or mean.attrs.get("dtype") is not None:
            continue
        add = only_user(mean.outputs[0], Op.ADD_TENSOR) or only_user(mean.outputs[0],
                                                                      Op.ADD_SCALAR)
        if add is None or add.inputs[0] is not mean.outputs[0] or \
                not isinstance(add.inputs[1], (int, float)) or add.attrs.get("alpha", 1) != 1:
            continue
        rsqrt = only_user(add.outputs[0], Op.RSQRT)
        scale = only_user(rsqrt.outputs[0], Op.MUL_TENSOR) if rsqrt is not None else None
        if scale is None or set(map(id, scale.inputs)) != {id(h), id(rsqrt.outputs[0])}:
            continue
        x, last, chain = h, scale, [pw, mean, add, rsqrt, scale]
        cast_in = producers.get(h)
        if cast_in is not None and cast_in.op is Op.TO_COPY and set(cast_in.attrs) <= {"dtype"} \
                and len(users.get(h, [])) == 2:
            x = cast_in.inputs[0]
            cast_out = only_user(scale.outputs[0], Op.TO_COPY)
            if x.spec.dtype == torch.float32 or cast_out is None or \
                    cast_out.attrs.get("dtype") != x.spec.dtype or set(cast_out.attrs) != {"dtype"}:
                continue
            last, chain = cast_out, [cast_in] + chain + [cast_out]
        weight = None
        scaled = only_user(last.outputs[0], Op.MUL_TENSOR)
        if scaled is not None:
            other = [v for v in scaled.inputs if v is not last.outputs[0]]
            if len(other) == 1 and isinstance(other[0], Value) and graph.is_constant(other[0]) \
                    and other[0].spec.shape == (x.spec.shape[-1],) \
                    and other[0].spec.dtype == x.spec.dtype:  # (either order: a*b == b*a)
                weight, last, chain = other[0], scaled, chain + [scaled]
        if last.outputs[0].spec != x.spec:
            continue
        eps = float(add.inputs[1])
        replaced[id(last)] = Node(Op.FUSED_RMS_NORM, [x, weight], {"eps": eps}, last.outputs,
                                  last.source or pw.source)
        removed.update(id(n) for n in chain if n is not last)
    graph.nodes = [replaced.get(id(n), n) for n in graph.nodes if id(n) not in removed]
    return graph


def _fusible(node: Node) -> bool:
    if node.fallback is not None or len(node.outputs) != 1:
        return False
    d = node.opdef
    return d.has(Prop.ELEMENTWISE) and not d.has(Prop.RANDOM | Prop.QUANT | Prop.FUSED)


def fuse_elementwise(graph: Graph) -> Graph:
    """Merge chains of element-wise ops into one ``fused_pointwise`` node each.

    A producer joins its consumer's kernel when the consumer is its only
    reader, it is not a graph output, and it has the consumer's output
    shape (inputs of other shapes broadcast inside the kernel). Each kernel
    then reads its external inputs once and writes one output: the
    intermediates never reach memory.
    """
    users = graph.users()
    producers = graph.producers()
    outputs = {id(v) for v in graph.outputs}
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    group_of: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if not _fusible(node):
            continue
        shape = node.outputs[0].spec.shape
        group: list[Node] = []
        for v in node.input_values():
            p = producers.get(v)
            if (p is not None and id(p) in group_of and len(users.get(v, [])) == 1
                    and id(v) not in outputs and v.spec.shape == shape):
                for member in group_of[id(p)]:
                    if all(member is not m for m in group):
                        group.append(member)
        group.append(node)
        group.sort(key=lambda n: position[id(n)])
        for member in group:
            group_of[id(member)] = group
    fused: dict[int, Node] = {}  # id(last member) -> the fused node replacing the group
    members: set[int] = set()
    for group in {id(g): g for g in group_of.values()}.values():
        if len(group) < 2:
            continue
        fused[id(group[-1])] = _fused_node(graph, group)
        members.update(id(n) for n in group)
    graph.nodes = [fused.get(id(n), n) for n in graph.nodes
                   if id(n) not in members or id(n) in fused]
    return graph


def _fused_node(graph: Graph, group: list[Node]) -> Node:
    inside = {id(o): j for j, n in enumerate(group) for o in n.outputs}
    externals: list = []

    def ref(x):
        if isinstance(x, Value):
            if id(x) in inside:
                return f"#{inside[id(x)]}"
            for i, e in enumerate(externals):
                if e is x:
                    return f"${i}"
            externals.append(x)
            return f"${len(externals) - 1}"
        return x

    steps = [(n.op.value, [ref(x) for x in n.inputs], {k: encode_attr(v) for k, v in n.attrs.items()})
             for n in group]
    last = group[-1]
    return Node(Op.FUSED_POINTWISE, externals, {"program": dump_program(steps)}, last.outputs,
                source=last.source)
