"""Lowering: QDQ patterns of the IR become integer kernel ops (``deepseek_quant::*``).

Rewrites, for a 2-D convolution or a linear (``addmm`` / ``mm`` of a transposed
weight, the core-ATen form of ``F.linear``, with a ``view`` of a 3-D input):

    conv(dequant(xq), dequant(W_int), b) [-> relu] [-> quantize]
        => conv2d_int8(xq, W_int, b, post_op="relu", output quantized)
    addmm(b, [view](dequant(xq)), permute(dequant(W_int)))  [-> relu] [-> quantize]
        => linear_int8([view](xq), W_int, b, ...)
    addmm(b, x, permute(dequant(W_int)))          (x not quantized: weight-only)
        => linear_weight_only(x, W_int, b)          (4-bit weights packed two a byte)

where the activation is de-quantized per tensor (uint8 or int8) and the weight
is a constant de-quantized per tensor or per output channel (per group for
weight-only). The int8 weight stays a plain int8 constant in the graph (so the
.dsk holds int8); the CPU kernel pre-packs it on first use. Anything else is
left as it is and runs through the QDQ ops' reference kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Op, Prop
from deepseek.ir.types import TensorSpec
from deepseek.quantization.kernels import pack_int4

_DQ_ACT = {Op.DEQUANTIZE_PER_TENSOR, Op.DEQUANTIZE_PER_TENSOR_TENSOR}
_Q_ACT = {Op.QUANTIZE_PER_TENSOR, Op.QUANTIZE_PER_TENSOR_TENSOR}
_FULL_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def has_qdq(graph: Graph) -> bool:
    """Whether ``graph`` has quantize/dequantize nodes."""
    return any(n.op is not None and n.opdef.has(Prop.QUANT) for n in graph.nodes)


@dataclass
class _Act:
    q: Value
    scale: float
    zero_point: int


@dataclass
class _Weight:
    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int  # 0: per tensor / per channel


class _Matcher:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.producers = graph.producers()
        self.users = graph.users()
        self.outputs = {id(v) for v in graph.outputs}

    def const(self, v) -> torch.Tensor | None:
        """The tensor of a constant value (or of a creation node such as ``full``)."""
        if not isinstance(v, Value):
            return None
        if self.graph.is_constant(v):
            return self.graph.constants[v.name]
        p = self.producers.get(v)
        if p is not None and p.op is not None and p.opdef.has(Prop.CREATION) and not p.input_values():
            try:
                return p.opdef.reference(list(p.inputs), p.attrs, device="cpu")
            except Exception:
                return None
        return None

    def qparams(self, node: Node) -> tuple | None:
        """(scale, zero_point) of a per-tensor Q or DQ node, as Python numbers."""
        if node.op in (Op.DEQUANTIZE_PER_TENSOR, Op.QUANTIZE_PER_TENSOR):
            return float(node.attrs["scale"]), int(node.attrs["zero_point"])
        s, z = self.const(node.inputs[1]), self.const(node.inputs[2])
        if s is None or z is None or s.numel() != 1 or z.numel() != 1:
            return None
        return float(s.reshape(())), int(z.reshape(()))

    def act(self, v) -> _Act | None:
        """A per-tensor de-quantized uint8/int8 activation feeding a kernel."""
        p = self.producers.get(v) if isinstance(v, Value) else None
        if p is None or p.op not in _DQ_ACT or p.attrs.get("out_dtype") not in (None, torch.float32):
            return None
        x = p.inputs[0]
        if not isinstance(x, Value) or x.spec.dtype not in (torch.uint8, torch.int8):
            return None
        params = self.qparams(p)
        return _Act(x, *params) if params is not None else None

    def weight(self, v, rank: int) -> _Weight | None:
        """A constant integer weight de-quantized per tensor, channel (axis 0) or group."""
        p = self.producers.get(v) if isinstance(v, Value) else None
        if p is None or p.op is None:
            return None
        q = self.const(p.inputs[0])
        if q is None or q.dtype not in (torch.int8, torch.uint8) or q.dim() != rank:
            return None
        qmin, qmax = int(p.attrs["quant_min"]), int(p.attrs["quant_max"])
        bits = max(1, math.ceil(math.log2(qmax - qmin + 1)))
        if p.op in _DQ_ACT:
            params = self.qparams(p)
            if params is None:
                return None
            return _Weight(q, torch.tensor([params[0]]), torch.tensor([params[1]], dtype=torch.int32)
                           if params[1] else None, bits, 0)
        if p.op is Op.DEQUANTIZE_PER_CHANNEL and p.attrs.get("axis") == 0:
            s, z = self.const(p.inputs[1]), p.inputs[2]
            zt = self.const(z) if z is not None else None
            if s is None or (z is not None and zt is None) or s.numel() != q.shape[0]:
                return None
            return _Weight(q, s, zt if zt is not None and bool(zt.ne(0).any()) else None, bits, 0)
        if p.op is Op.DEQUANTIZE_PER_CHANNEL_GROUP and rank == 2:
            s, z = self.const(p.inputs[1]), p.inputs[2]
            zt = self.const(z) if z is not None else None
            if s is None or (z is not None and zt is None):
                return None
            return _Weight(q, s, zt, bits, int(p.attrs["group_size"]))
        return None

    def transposed_weight(self, v) -> _Weight | None:
        p = self.producers.get(v) if isinstance(v, Value) else None
        if p is None or not (p.op is Op.T or (p.op is Op.PERMUTE and list(p.attrs["dims"]) == [1, 0])):
            return None
        return self.weight(p.inputs[0], 2)

    def sole_user(self, v: Value) -> Node | None:
        us = self.users.get(v, [])
        return us[0] if len(us) == 1 and id(v) not in self.outputs else None


def _int8_inputs(m: _Matcher, w: _Weight, bias) -> list:
    g = m.graph
    return [g.add_constant("qweight", w.q.contiguous()),
            g.add_constant("qweight_scale", w.scale.float().contiguous()),
            g.add_constant("qweight_zero_point", w.zero_point.contiguous())
            if w.zero_point is not None else None,
            bias]


def _lower_conv(m: _Matcher, node: Node) -> list[Node] | None:
    x, wv, b = node.inputs
    a = node.attrs
    if a.get("transposed") or len(a["stride"]) != 2 or x is None:
        return None
    act, w = m.act(x), m.weight(wv, 4)
    if act is None or w is None or w.group_size or w.q.dtype != torch.int8:
        return None
    inputs = [act.q] + _int8_inputs(m, w, b)
    attrs = {"x_scale": act.scale, "x_zero_point": act.zero_point, "stride": list(a["stride"]),
             "padding": list(a["padding"]), "dilation": list(a["dilation"]),
             "groups": a["groups"], "post_op": "none", "output_scale": 1.0,
             "output_zero_point": 0, "output_dtype": None}
    return [Node(Op.CONV2D_INT8, inputs, attrs, list(node.outputs), node.source)]


def _lower_linear(m: _Matcher, node: Node) -> list[Node] | None:
    if node.op is Op.ADDMM:
        if node.attrs.get("beta", 1) != 1 or node.attrs.get("alpha", 1) != 1:
            return None
        bias, x, wt = node.inputs
    else:
        bias, (x, wt) = None, node.inputs
    w = m.transposed_weight(wt)
    if w is None:
        return None
    view = m.producers.get(x) if isinstance(x, Value) else None
    viewed = view is not None and view.op in (Op.VIEW, Op.UNSAFE_VIEW, Op.RESHAPE)
    act = m.act(view.inputs[0] if viewed else x)
    if act is None or w.group_size or w.q.dtype != torch.int8:
        return _lower_weight_only(m, node, x, w, bias)
    pre: list[Node] = []
    xq = act.q
    if viewed:
        out = Value(m.graph.fresh_name(f"{xq.name}_view"), TensorSpec(x.spec.shape, xq.spec.dtype))
        pre.append(Node(view.op, [xq], dict(view.attrs), [out], view.source))
        xq = out
    inputs = [xq] + _int8_inputs(m, w, bias)
    attrs = {"x_scale": act.scale, "x_zero_point": act.zero_point, "post_op": "none",
             "output_scale": 1.0, "output_zero_point": 0, "output_dtype": None}
    return pre + [Node(Op.LINEAR_INT8, inputs, attrs, list(node.outputs), node.source)]


def _lower_weight_only(m: _Matcher, node: Node, x, w: _Weight, bias) -> list[Node] | None:
    if x is None or not x.spec.dtype.is_floating_point:
        return None
    g = m.graph
    q, bits = w.q, 8
    if w.bits <= 4 and q.dtype == torch.int8 and q.shape[1] % 2 == 0 and \
            int(q.min()) >= -8 and int(q.max()) <= 7:
        q, bits = pack_int4(q), 4
    elif q.dtype != torch.int8:
        return None
    inputs = [x, g.add_constant("qweight", q.contiguous()),
              g.add_constant("qweight_scale", w.scale.float().contiguous()),
              g.add_constant("qweight_zero_point", w.zero_point.contiguous())
              if w.zero_point is not None else None, bias]
    attrs = {"bits": bits, "group_size": w.group_size}
    return [Node(Op.LINEAR_WEIGHT_ONLY, inputs, attrs, list(node.outputs), node.source)]


def _fuse_epilogue(m: _Matcher, kernel: Node, removed: set[int]) -> None:
    """Fold a following ReLU, then a following full-range per-tensor quantize, into
    ``kernel`` (oneDNN post-ops and output requantization)."""
    user = m.sole_user(kernel.outputs[0])
    if user is not None and user.op is Op.RELU:
        kernel.attrs["post_op"] = "relu"
        kernel.outputs = list(user.outputs)
        removed.add(id(user))
        user = m.sole_user(kernel.outputs[0])
    if user is None or user.op not in _Q_ACT:
        return
    dtype = user.attrs.get("dtype")
    params = m.qparams(user)
    if params is None or _FULL_RANGE.get(dtype) != (user.attrs["quant_min"], user.attrs["quant_max"]):
        return
    kernel.attrs.update(output_scale=params[0], output_zero_point=params[1], output_dtype=dtype)
    kernel.outputs = list(user.outputs)
    removed.add(id(user))


def _eliminate_dead(graph: Graph) -> None:
    live = {id(v) for v in graph.outputs}
    kept = []
    for node in reversed(graph.nodes):
        if any(id(o) in live for o in node.outputs):
            kept.append(node)
            live.update(id(v) for v in node.input_values())
    graph.nodes = kept[::-1]
    graph.remove_unused_constants()


def lower_quantized_ops(graph: Graph) -> Graph:
    """Replace QDQ convolution / linear patterns by integer kernel ops (module docstring);
    ReLU and an output quantize that follow are fused into the kernel."""
    if not has_qdq(graph):
        return graph
    m = _Matcher(graph)
    replaced: dict[int, list[Node]] = {}
    removed: set[int] = set()
    for node in graph.nodes:
        if id(node) in removed:
            continue
        if node.op is Op.CONVOLUTION:
            new = _lower_conv(m, node)
        elif node.op in (Op.ADDMM, Op.MM):
            new = _lower_linear(m, node)
        else:
            continue
        if new is None:
            continue
        replaced[id(node)] = new
        if new[-1].op is not Op.LINEAR_WEIGHT_ONLY:
            _fuse_epilogue(m, new[-1], removed)
    nodes: list[Node] = []
    for node in graph.nodes:
        if id(node) in removed:
            continue
        nodes.extend(replaced.get(id(node), [node]))
    graph.nodes = nodes
    _eliminate_dead(graph)
    return graph
