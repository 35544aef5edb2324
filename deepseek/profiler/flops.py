"""Floating-point operations of one node, for concrete shapes.

Counts follow the usual convention: a multiply-add is 2 FLOPs (an integer one in the
int8 and weight-only kernels quantization lowers to counts the same); an
element-wise op is 1 FLOP per output element (a fused chain, one per
step); a reduction 1 per input
element; normalizations and softmax a small constant per element. Data
movement (views, copies, gathers, concatenation, padding) is 0. These are
estimates for placing an op on the roofline, not exact instruction counts.
"""

from __future__ import annotations

import json
import math
from typing import Mapping

from deepseek.ir.graph import Node, Value
from deepseek.ir.ops import Op, Prop

# FLOPs per element of the (first) input, for ops that are neither GEMMs nor plain element-wise
_PER_INPUT_ELEMENT = {
    Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING: 4,  # (x - mean) * rstd * gamma + beta
    Op.NATIVE_BATCH_NORM_LEGIT: 8, Op.NATIVE_BATCH_NORM: 8,
    Op.NATIVE_LAYER_NORM: 8, Op.NATIVE_GROUP_NORM: 8, Op.RMS_NORM: 5,
    Op.SOFTMAX: 5, Op.LOG_SOFTMAX: 5,  # max, subtract, exp, sum, divide (or log)
    Op.ADAPTIVE_AVG_POOL2D: 1, Op.ADAPTIVE_AVG_POOL3D: 1, Op.ADAPTIVE_MAX_POOL2D: 1,
    Op.CUMSUM: 1, Op.CUMPROD: 1,
}
_POOL_WINDOW = {Op.MAX_POOL2D_WITH_INDICES, Op.MAX_POOL3D_WITH_INDICES, Op.AVG_POOL1D,
                Op.AVG_POOL2D, Op.AVG_POOL3D}


def _numel(shape) -> int:
    return math.prod(shape)


def node_flops(node: Node, env: Mapping[str, int]) -> int:
    """Estimated FLOPs of ``node`` under the symbol bindings ``env`` (0 for data movement).

    Example: ``mm`` of (M, K) by (K, N) is ``2 * M * N * K``.
    """
    if not node.outputs:
        return 0
    shape = [v.spec.concrete(env) if isinstance(v, Value) else () for v in node.inputs]
    out = node.outputs[0].spec.concrete(env)
    op = node.op
    if node.fallback is not None:
        return _numel(out)  # unknown kernel: count it as element-wise
    if op is Op.CONVOLUTION:
        w = shape[1]
        # normal: each output element is a dot over (Cin/groups) * kernel taps;
        # transposed: each input element scatters over (Cout/groups) * kernel taps
        taps = _numel(w[2:]) * w[1]
        return 2 * taps * (_numel(shape[0]) if node.attrs.get("transposed") else _numel(out)) \
            + (_numel(out) if len(shape) > 2 and node.inputs[2] is not None else 0)
    if op is Op.CONV2D_INT8:  # x, weight (O, C/groups, kh, kw), scales, zero points, bias
        taps = _numel(shape[1][2:]) * shape[1][1]
        return 2 * taps * _numel(out) + (_numel(out) if node.inputs[4] is not None else 0)
    if op in (Op.LINEAR_INT8, Op.LINEAR_INT8_DYNAMIC, Op.LINEAR_WEIGHT_ONLY):
        # x (..., K), weight (N, K) (4-bit weights packed: K read from x), ..., bias
        return 2 * _numel(out) * shape[0][-1] + (_numel(out) if node.inputs[4] is not None
                                                 else 0)
    if op is Op.CONVOLUTION_BACKWARD:
        grad, x, w = shape[0], shape[1], shape[2]
        # the input and weight gradients each cost what the forward convolution did
        conv = 2 * _numel(w[2:]) * w[1] * _numel(x if node.attrs.get("transposed") else grad)
        mask = node.attrs.get("output_mask", [True, True, True])
        return conv * (bool(mask[0]) + bool(mask[1])) + (_numel(grad) if mask[2] else 0)
    if op in (Op.MM, Op.BMM, Op.MATMUL, Op.DOT, Op.MV):
        return 2 * _numel(out) * shape[0][-1]
    if op in (Op.ADDMM, Op.BADDBMM):
        return 2 * _numel(out) * shape[1][-1] + _numel(out)
    if op is Op.LINEAR:
        return 2 * _numel(out) * shape[0][-1] + (_numel(out) if len(shape) > 2 and
                                                  node.inputs[2] is not None else 0)
    if op is Op.FP8_LINEAR:  # x (..., K), weight (N, K), bias
        return 2 * _numel(out) * shape[0][-1] + (_numel(out) if node.inputs[3] is not None else 0)
    if op in (Op.SCALED_DOT_PRODUCT_ATTENTION, Op.SCALED_DOT_PRODUCT_FLASH_ATTENTION_FOR_CPU):
        q, k, v = shape[0], shape[1], shape[2]
        batch, length, e = _numel(q[:-2]), q[-2], q[-1]
        s, ev = k[-2], v[-1]
        # Q @ K^T and P @ V are GEMMs; the softmax over (L, S) is ~5 FLOPs per score
        return 2 * batch * length * s * (e + ev) + 5 * batch * length * s
    if op in _PER_INPUT_ELEMENT:
        return _PER_INPUT_ELEMENT[op] * (_numel(shape[0]) if shape and shape[0] else _numel(out))
    if op in _POOL_WINDOW:
        return _numel(out) * _numel(node.attrs.get("kernel_size", [1]))
    props = node.opdef.props
    if props & Prop.ELEMENTWISE and "program" in node.attrs:  # a fused chain: one FLOP per step
        try:
            return _numel(out) * len(json.loads(node.attrs["program"]))
        except (TypeError, ValueError):
            return _numel(out)
    if props & Prop.ELEMENTWISE:
        return _numel(out) if op not in (Op.CLONE, Op.LIFT_FRESH_COPY, Op.TO_COPY) else 0
    if props & Prop.REDUCTION:
        return _numel(shape[0]) if shape and shape[0] else _numel(out)
    return 0


def matmul_class(node: Node) -> bool:
    """Whether ``node`` is a GEMM/convolution/attention (compute-bound class)."""
    return node.fallback is None and node.opdef.has(Prop.MATMUL)
