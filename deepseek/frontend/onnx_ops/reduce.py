"""Reductions: Reduce*, ArgMax/ArgMin."""

from __future__ import annotations

import torch

from deepseek.frontend.onnx_import import onnx_op
from deepseek.frontend.onnx_ops.common import FLOATS, cast, dtype_max, dtype_min, prod
from deepseek.ir.ops import Op

# the opset from which each reduction takes its axes as an input instead of an attribute
_AXES_INPUT_SINCE = {"ReduceSum": 13}


def _axes(n, rank: int) -> list[int] | None:
    """The reduced axes, or None for 'no reduction' (noop_with_empty_axes)."""
    since = _AXES_INPUT_SINCE.get(n.op_type, 18)
    if n.opset >= since:
        axes = n.ints(1, "axes") if n.has(1) else []
    else:
        axes = n.attr("axes") or []
    if not axes:
        if n.attr("noop_with_empty_axes", 0) and n.opset >= since:
            return None
        return list(range(rank))
    return sorted({n.axis(int(a), rank) for a in axes})


def _empty_result(n, x, axes, keep, fill):
    shape = n.shape(x)
    out = [1 if i in axes else d for i, d in enumerate(shape)] if keep else \
        [d for i, d in enumerate(shape) if i not in axes]
    return n.emit(Op.FULL, [], {"size": out, "fill_value": fill, "dtype": x.spec.dtype})


def _reduces_empty(n, x, axes) -> bool:
    shape = n.shape(x)
    return any(isinstance(shape[a], int) and shape[a] == 0 for a in axes)


def _sum(n, x, axes, keep):
    if not axes:
        return x
    return n.emit(Op.SUM_DIM_INTLIST, [x], {"dim": axes, "keepdim": keep, "dtype": x.spec.dtype})


@onnx_op("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
         "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
def reduce(n):
    x = n.x(0)
    rank = n.rank(x)
    axes = _axes(n, rank)
    keep = bool(n.attr("keepdims", 1))
    op, dt = n.op_type, x.spec.dtype
    if axes is None:
        if op in ("ReduceL1",):
            return [n.emit(Op.ABS, [x])]
        if op in ("ReduceSumSquare",):
            return [n.emit(Op.MUL_TENSOR, [x, x])]
        return [x]
    if rank == 0:
        axes = []
    if op in ("ReduceMax", "ReduceMin"):
        if _reduces_empty(n, x, axes):
            if dt == torch.bool:
                fill = op == "ReduceMin"
            else:
                fill = dtype_min(dt) if op == "ReduceMax" else dtype_max(dt)
            return [_empty_result(n, x, axes, keep, fill)]
        if not axes:
            return [x]
        if dt == torch.bool:
            y = n.emit(Op.AMAX if op == "ReduceMax" else Op.AMIN, [cast(n, x, torch.uint8)],
                       {"dim": axes, "keepdim": keep})
            return [cast(n, y, torch.bool)]
        return [n.emit(Op.AMAX if op == "ReduceMax" else Op.AMIN, [x], {"dim": axes, "keepdim": keep})]
    if op == "ReduceSum":
        return [_sum(n, x, axes, keep)]
    if op == "ReduceSumSquare":
        return [_sum(n, n.emit(Op.MUL_TENSOR, [x, x]), axes, keep)]
    if op == "ReduceL1":
        return [_sum(n, n.emit(Op.ABS, [x]), axes, keep)]
    if op == "ReduceL2":
        s = _sum(n, n.emit(Op.MUL_TENSOR, [x, x]), axes, keep)
        if dt in FLOATS:
            return [n.emit(Op.SQRT, [s])]
        return [cast(n, n.emit(Op.SQRT, [cast(n, s, torch.float64)]), dt)]
    if op == "ReduceLogSum":
        return [n.emit(Op.LOG, [_sum(n, x, axes, keep)])]
    if op == "ReduceLogSumExp":
        if _reduces_empty(n, x, axes):
            return [_empty_result(n, x, axes, keep, float("-inf"))]
        if not axes:
            return [x]
        if dt in FLOATS and dt != torch.float64:
            y = n.emit(Op.LOGSUMEXP, [cast(n, x, torch.float64)], {"dim": axes, "keepdim": keep})
            return [cast(n, y, dt)]
        return [n.emit(Op.LOGSUMEXP, [x], {"dim": axes, "keepdim": keep})]
    if op == "ReduceMean":
        if not axes:
            return [x]
        if dt not in FLOATS:
            s = _sum(n, x, axes, keep)
            cnt = prod(n.shape(x)[a] for a in axes)
            return [n.emit(Op.DIV_TENSOR_MODE, [s, n.const(torch.tensor(cnt, dtype=dt))],
                           {"rounding_mode": "trunc"})]
        return [n.emit(Op.MEAN_DIM, [x], {"dim": axes, "keepdim": keep})]
    if op == "ReduceProd":
        y = x
        for a in sorted(axes, reverse=True):
            y = n.emit(Op.PROD_DIM_INT, [y], {"dim": a, "keepdim": keep, "dtype": dt})
        return [y]
    raise n.fail("no Deepseek mapping")


@onnx_op("ArgMax", "ArgMin")
def argmax(n):
    x = n.x(0)
    rank = n.rank(x)
    axis = n.axis(n.attr("axis", 0), rank)
    keep = bool(n.attr("keepdims", 1))
    op = Op.ARGMAX if n.op_type == "ArgMax" else Op.ARGMIN
    if x.spec.dtype == torch.bool:
        x = cast(n, x, torch.uint8)
    if n.attr("select_last_index", 0):
        dim = n.shape(x)[axis]
        y = n.emit(op, [n.emit(Op.FLIP, [x], {"dims": [axis]})], {"dim": axis, "keepdim": keep})
        last = dim - 1
        last_v = n.const(torch.tensor(last, dtype=torch.int64)) if isinstance(last, int) else \
            n.emit(Op.FULL, [], {"size": [], "fill_value": last, "dtype": torch.int64})
        return [n.emit(Op.SUB_TENSOR, [last_v, y])]
    return [n.emit(op, [x], {"dim": axis, "keepdim": keep})]
