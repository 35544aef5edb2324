"""Lowering: QDQ patterns of the IR become integer kernel ops (``deepseek_quant::*``).

Rewrites, for a 2-D convolution or a linear (``addmm`` / ``mm`` of a transposed
weight, the core-ATen form of ``F.linear``, with a ``view`` of a 3-D input):

    conv(dequant(xq), dequant(W_int), b) [-> relu] [-> quantize]
        => conv2d_int8(xq, W_int, b, post_op="relu", output quantized)
    addmm(b, [view](dequant(xq)), permute(dequant(W_int)))  [-> relu | gelu] [-> quantize]
        => linear_int8([view](xq), W_int, b, ...)
    addmm(b, dequant_per_token(quant_per_token(x, choose_qparams_per_token(x))), W...)
        => linear_int8_dynamic(x, W_int, b)         (rows quantized at run time)
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
from deepseek.passes.simplify import eliminate_dead_code
from deepseek.quantization.kernels import int8_native_for, pack_int4

_DQ_ACT = {Op.DEQUANTIZE_PER_TENSOR, Op.DEQUANTIZE_PER_TENSOR_TENSOR}
_Q_ACT = {Op.QUANTIZE_PER_TENSOR, Op.QUANTIZE_PER_TENSOR_TENSOR}
_RESHAPES = {Op.VIEW, Op.UNSAFE_VIEW, Op.RESHAPE}
_CHOOSE_PER_TOKEN = {Op.CHOOSE_QPARAMS_PER_TOKEN: True,  # symmetric
                     Op.CHOOSE_QPARAMS_PER_TOKEN_ASYMMETRIC: False}
_FULL_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}
_GELU_POST_OPS = {"none": "gelu", "tanh": "gelu_tanh"}  # GELU's approximate -> a post-op


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


class QDQMatcher:
    """Reads QDQ patterns of one graph (its producers and users computed once)."""

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
        if (p is not None and p.op is not None and p.opdef.has(Prop.CREATION)
                and not p.input_values()):
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

    def output_quantize(self, node: Node | None) -> tuple | None:
        """(scale, zero_point, dtype) of a full-range per-tensor quantize node to uint8 or
        int8 with constant parameters, which a kernel's epilogue can do; else None."""
        if node is None or node.op not in _Q_ACT:
            return None
        dtype = node.attrs.get("dtype")
        params = self.qparams(node)
        if params is None or _FULL_RANGE.get(dtype) != (node.attrs["quant_min"],
                                                          node.attrs["quant_max"]):
            return None
        return (*params, dtype)

    def act(self, v) -> _Act | None:
        """A per-tensor de-quantized uint8/int8 activation feeding a kernel."""
        p = self.producers.get(v) if isinstance(v, Value) else None
        if (p is None or p.op not in _DQ_ACT
                or p.attrs.get("out_dtype") not in (None, torch.float32)):
            return None
        x = p.inputs[0]
        if not isinstance(x, Value) or x.spec.dtype not in (torch.uint8, torch.int8):
            return None
        params = self.qparams(p)
        return _Act(x, *params) if params is not None else None

    def dynamic_act(self, v) -> tuple[Value, bool] | None:
        """(x, symmetric) where ``v`` is float32 ``x`` quantized per row to int8 and back
        with parameters chosen from ``x`` itself (``DynamicQuantizedActivation``)."""
        dq = self.producers.get(v) if isinstance(v, Value) else None
        if dq is None or dq.op is not Op.DEQUANTIZE_PER_TOKEN or \
                dq.attrs.get("output_dtype") not in (None, torch.float32):
            return None
        q = self.producers.get(dq.inputs[0])
        choose = self.producers.get(dq.inputs[1])
        if q is None or q.op is not Op.QUANTIZE_PER_TOKEN or choose is None or \
                choose.op not in _CHOOSE_PER_TOKEN or \
                self.producers.get(dq.inputs[2]) is not choose:
            return None
        x = choose.inputs[0]
        full = all(n.attrs.get("quant_min") == -128 and n.attrs.get("quant_max") == 127
                   and n.attrs.get("dtype") == torch.int8 for n in (q, dq))
        if not (full and list(q.inputs) == [x, *choose.outputs] and list(dq.inputs[1:]) ==
                list(choose.outputs) and x.spec.dtype == torch.float32):
            return None
        return x, _CHOOSE_PER_TOKEN[choose.op]

    def weight(self, v, rank: int, axis: int = 0) -> _Weight | None:
        """A constant integer weight de-quantized per tensor, per channel along ``axis``
        (the output channels) or per group; uint8 weights become int8 (q - 128, zp - 128)."""
        p = self.producers.get(v) if isinstance(v, Value) else None
        if p is not None and p.op in _RESHAPES and p.inputs[0].spec.shape == v.spec.shape:
            p = self.producers.get(p.inputs[0])  # a reshape to the same shape: no-op
        if p is None or p.op is None:
            return None
        q = self.const(p.inputs[0])
        if q is None and self.producers.get(p.inputs[0]) is not None:  # a reshaped constant
            r = self.producers[p.inputs[0]]
            base = self.const(r.inputs[0]) if r.op in _RESHAPES else None
            q = base.reshape(p.inputs[0].spec.shape) if base is not None else None
        if q is None or q.dtype not in (torch.int8, torch.uint8) or q.dim() != rank:
            return None
        qmin, qmax = int(p.attrs["quant_min"]), int(p.attrs["quant_max"])
        bits = max(1, math.ceil(math.log2(qmax - qmin + 1)))
        if p.op in _DQ_ACT:
            params = self.qparams(p)
            if params is None:
                return None
            w = _Weight(q, torch.tensor([params[0]]), torch.tensor([params[1]], dtype=torch.int32),
                        bits, 0)
        elif p.op is Op.DEQUANTIZE_PER_CHANNEL and p.attrs.get("axis") == axis:
            s, z = self.const(p.inputs[1]), p.inputs[2]
            zt = self.const(z) if z is not None else None
            if s is None or (z is not None and zt is None) or s.numel() != q.shape[axis]:
                return None
            w = _Weight(q, s, zt, bits, 0)
        elif p.op is Op.DEQUANTIZE_PER_CHANNEL_GROUP and rank == 2 and axis == 0:
            s, z = self.const(p.inputs[1]), p.inputs[2]
            zt = self.const(z) if z is not None else None
            if s is None or (z is not None and zt is None):
                return None
            return _Weight(q, s, zt, bits, int(p.attrs["group_size"]))
        else:
            return None
        if q.dtype == torch.uint8:  # the same values in int8, exactly
            zp = w.zero_point if w.zero_point is not None else torch.zeros(1, dtype=torch.int32)
            w.q = (q.to(torch.int16) - 128).to(torch.int8)
            w.zero_point = zp.to(torch.int32) - 128
        if w.zero_point is not None and not bool(w.zero_point.ne(0).any()):
            w.zero_point = None
        return w

    def transposed_weight(self, v) -> _Weight | None:
        """The (N, K) integer weight behind a GEMM's right operand: ``permute`` of an
        (N, K) weight (``F.linear``), or an (K, N) weight itself (ONNX MatMul / Gemm)."""
        p = self.producers.get(v) if isinstance(v, Value) else None
        transpose = p is not None and (
            p.op is Op.T or (p.op is Op.PERMUTE and list(p.attrs["dims"]) == [1, 0]))
        if transpose:
            return self.weight(p.inputs[0], 2)
        w = self.weight(v, 2, axis=1)  # (K, N), as ONNX MatMul / Gemm weights are
        if w is None or w.group_size:
            return None
        w.q = w.q.t().contiguous()
        return w

    def sole_user(self, v: Value) -> Node | None:
        us = self.users.get(v, [])
        return us[0] if len(us) == 1 and id(v) not in self.outputs else None


def _int8_inputs(m: QDQMatcher, w: _Weight, bias) -> list:
    g = m.graph
    return [g.add_constant("qweight", w.q.contiguous()),
            g.add_constant("qweight_scale", w.scale.float().contiguous()),
            g.add_constant("qweight_zero_point", w.zero_point.contiguous())
            if w.zero_point is not None else None,
            bias]


def _lower_conv(m: QDQMatcher, node: Node) -> list[Node] | None:
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


def _lower_linear(m: QDQMatcher, node: Node, removed: set[int]) -> list[Node] | None:
    if node.op is Op.ADDMM:
        if node.attrs.get("beta", 1) != 1 or node.attrs.get("alpha", 1) != 1:
            return None
        bias, x, wt = node.inputs
    else:  # mm, or matmul of a (..., K) input by a 2-D weight
        bias, (x, wt) = None, node.inputs
        if node.op is Op.MATMUL and (not isinstance(x, Value) or x.spec.rank < 2
                                     or wt.spec.rank != 2):
            return None
    w = m.transposed_weight(wt)
    if w is None:
        return None
    view = m.producers.get(x) if isinstance(x, Value) else None
    viewed = view is not None and view.op in _RESHAPES
    act = m.act(view.inputs[0] if viewed else x)
    dynamic = m.dynamic_act(view.inputs[0] if viewed else x) if act is None else None
    if (act is None and dynamic is None) or w.group_size or w.q.dtype != torch.int8:
        return _lower_weight_only(m, node, x, w, bias)
    pre: list[Node] = []
    xq, outputs = act.q if act is not None else dynamic[0], list(node.outputs)
    back = m.sole_user(node.outputs[0])
    if viewed and back is not None and back.op in _RESHAPES and \
            back.outputs[0].spec.shape == (*xq.spec.shape[:-1], w.q.shape[0]):
        outputs = list(back.outputs)  # (B, T, K) -> (B*T, K) -> mm -> (B, T, N): one N-D kernel
        removed.add(id(back))
    elif viewed:
        out = Value(m.graph.fresh_name(f"{xq.name}_view"), TensorSpec(x.spec.shape, xq.spec.dtype))
        pre.append(Node(view.op, [xq], dict(view.attrs), [out], view.source))
        xq = out
    inputs = [xq] + _int8_inputs(m, w, bias)
    if dynamic is not None:  # rows are quantized per call: by the kernel, from x itself
        attrs = {"symmetric": dynamic[1], "post_op": "none"}
        return pre + [Node(Op.LINEAR_INT8_DYNAMIC, inputs, attrs, outputs, node.source)]
    attrs = {"x_scale": act.scale, "x_zero_point": act.zero_point, "post_op": "none",
             "output_scale": 1.0, "output_zero_point": 0, "output_dtype": None}
    return pre + [Node(Op.LINEAR_INT8, inputs, attrs, outputs, node.source)]


def _lower_weight_only(m: QDQMatcher, node: Node, x, w: _Weight, bias) -> list[Node] | None:
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


def _fuse_epilogue(m: QDQMatcher, kernel: Node, removed: set[int]) -> None:
    """Fold a following ReLU (or, into an int8 linear, GELU), then a following
    full-range per-tensor quantize, into ``kernel`` (oneDNN post-ops and output
    requantization)."""
    user = m.sole_user(kernel.outputs[0])
    post_op = None if user is None else "relu" if user.op is Op.RELU else \
        _GELU_POST_OPS.get(user.attrs.get("approximate", "none")) \
        if user.op is Op.GELU and kernel.op is not Op.CONV2D_INT8 else None
    if post_op is not None:
        kernel.attrs["post_op"] = post_op
        kernel.outputs = list(user.outputs)
        removed.add(id(user))
        user = m.sole_user(kernel.outputs[0])
    if kernel.op is Op.LINEAR_INT8_DYNAMIC:  # its result is float
        return
    params = m.output_quantize(user)
    if params is None:
        return
    kernel.attrs.update(output_scale=params[0], output_zero_point=params[1],
                        output_dtype=params[2])
    kernel.outputs = list(user.outputs)
    removed.add(id(user))


def int8_kernels_off_native(graph: Graph) -> tuple[int, int]:
    """(how many, of how many) int8 convolution / linear kernels of a lowered graph have a
    weight that this CPU's int8 kernels cannot compute exactly (``int8_native_for``)."""
    kernels = [n for n in graph.nodes
               if n.op in (Op.CONV2D_INT8, Op.LINEAR_INT8, Op.LINEAR_INT8_DYNAMIC)]
    off = sum(not int8_native_for(graph.constants[n.inputs[1].name]) for n in kernels
              if graph.is_constant(n.inputs[1]))  # inputs: x, weight, scale, zero point, bias
    return off, len(kernels)


def lower_quantized_ops(graph: Graph) -> Graph:
    """Replace QDQ convolution / linear patterns by integer kernel ops (module docstring);
    ReLU and an output quantize that follow are fused into the kernel."""
    if not has_qdq(graph):
        return graph
    m = QDQMatcher(graph)
    replaced: dict[int, list[Node]] = {}
    removed: set[int] = set()
    for node in graph.nodes:
        if id(node) in removed:
            continue
        if node.op is Op.CONVOLUTION:
            new = _lower_conv(m, node)
        elif node.op in (Op.ADDMM, Op.MM, Op.MATMUL):
            new = _lower_linear(m, node, removed)
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
    eliminate_dead_code(graph)
    return graph
