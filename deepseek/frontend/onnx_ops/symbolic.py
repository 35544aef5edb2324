"""Shape computations evaluated at import time, symbolic dims included.

``Shape`` of a tensor gives a :class:`SymArray` (ints, or ``torch.SymInt`` for
symbolic dims). While a node's inputs are all known at import (constants and
SymArrays) and the op is one of the integer shape-arithmetic ops below, it
is evaluated here with numpy object arrays instead of becoming IR nodes: the
``Shape -> Gather -> Concat -> Reshape`` chains of exported models turn into
the Reshape's (symbolic) ``shape`` attribute. A result made only of ints
becomes an ordinary constant.
"""

from __future__ import annotations

import numpy as np
import torch

from deepseek.frontend.onnx_import import SymArray
from deepseek.frontend.onnx_ops.common import prod

_INT_TYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _obj(k):
    if isinstance(k, SymArray):
        return k.values
    return np.array(k.tolist(), dtype=object)


def _trunc_div(a, b):
    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    return a // b  # symbolic sizes are never negative


def _mod(a, b):
    return a % b


_EW = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "Div": _trunc_div, "Mod": _mod, "Max": lambda a, b: torch.sym_max(a, b),
    "Min": lambda a, b: torch.sym_min(a, b),
    "Equal": lambda a, b: bool(a == b), "Less": lambda a, b: bool(a < b),
    "Greater": lambda a, b: bool(a > b), "LessOrEqual": lambda a, b: bool(a <= b),
    "GreaterOrEqual": lambda a, b: bool(a >= b),
}
_COMPARE = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}


def _ints(k) -> list[int]:
    return [int(v) for v in _obj(k).reshape(-1)]


def _axes(n, i_input: int, attr: str, rank_for_neg: int) -> list[int] | None:
    if n.opset >= 13 and n.has(i_input):
        axes = _ints(n.known(i_input))
    else:
        axes = n.attr(attr)
    if axes is None:
        return None
    return [a % rank_for_neg if rank_for_neg else a for a in axes]


def try_symbolic(n):
    """The node's outputs if it is evaluated at import time, else None."""
    op = n.op_type
    imp = n.imp
    if op in ("Shape", "Size"):
        src = imp.env.get(n.node.input[0]) if n.has(0) else None
        dims = list(src.values.shape) if isinstance(src, SymArray) else imp.shape(n.x(0))
        if op == "Size":
            return [SymArray(np.array(prod(dims), dtype=object))]
        r = len(dims)
        start, end = n.attr("start", 0), n.attr("end", r)
        start = min(max(start + r if start < 0 else start, 0), r)
        end = min(max(end + r if end < 0 else end, 0), r)
        return [SymArray(np.array(dims[start:end], dtype=object).reshape(-1))]
    present = [i for i in range(n.n_inputs) if n.has(i)]
    known = {i: n.known(i) for i in present}
    if not any(isinstance(k, SymArray) for k in known.values()):
        return None
    if any(k is None for k in known.values()):
        return None
    if any(isinstance(k, torch.Tensor) and k.dtype not in _INT_TYPES + (torch.bool,)
           for k in known.values()):
        return None
    if any(isinstance(k, torch.Tensor) and k.numel() > 4096 for k in known.values()):
        return None
    fn = _OPS.get(op)
    if fn is None:
        return None
    out = fn(n, known)
    if out is None:
        return None
    return out


def _identity(n, k):
    return [k[0]]


def _cast(n, k):
    from deepseek.frontend.onnx_types import torch_dtype

    dtype = torch_dtype(n.attr("to"))
    if dtype not in _INT_TYPES:
        return None
    return [SymArray(_obj(k[0]), dtype)]


def _gather(n, k):
    data, idx = _obj(k[0]), np.array(_ints(k[1]), dtype=np.int64).reshape(np.shape(_obj(k[1])))
    axis = n.attr("axis", 0) % max(data.ndim, 1)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return [SymArray(np.take(data, idx, axis=axis), _dtype(k[0]))]


def _dtype(k):
    return k.dtype if isinstance(k, (SymArray, torch.Tensor)) else torch.int64


def _slice(n, k):
    data = _obj(k[0])
    if n.opset < 10:
        starts, ends, axes, steps = n.attr("starts"), n.attr("ends"), n.attr("axes"), None
    else:
        starts, ends = _ints(k[1]), _ints(k[2])
        axes = _ints(k[3]) if 3 in k else None
        steps = _ints(k[4]) if 4 in k else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a % data.ndim] = slice(s, e, st)
    return [SymArray(data[tuple(index)], _dtype(k[0]))]


def _concat(n, k):
    arrays = [_obj(k[i]).reshape(np.shape(_obj(k[i])) or (1,)) for i in sorted(k)]
    axis = n.attr("axis", 0)
    return [SymArray(np.concatenate(arrays, axis=axis), _dtype(k[min(k)]))]


def _unsqueeze(n, k):
    data = _obj(k[0])
    axes = _ints(k[1]) if n.opset >= 13 else n.attr("axes")
    out_rank = data.ndim + len(axes)
    for a in sorted(a % out_rank for a in axes):
        data = np.expand_dims(data, a)
    return [SymArray(data, _dtype(k[0]))]


def _squeeze(n, k):
    data = _obj(k[0])
    axes = (_ints(k[1]) if 1 in k else None) if n.opset >= 13 else n.attr("axes")
    if axes is None:
        axes = [i for i, d in enumerate(data.shape) if d == 1]
    return [SymArray(np.squeeze(data, axis=tuple(a % data.ndim for a in axes)), _dtype(k[0]))]


def _reshape(n, k):
    data = _obj(k[0])
    shape = _ints(k[1])
    shape = [data.shape[i] if s == 0 and not n.attr("allowzero", 0) else s for i, s in enumerate(shape)]
    return [SymArray(data.reshape(shape), _dtype(k[0]))]


def _flatten(n, k):
    data = _obj(k[0])
    axis = n.attr("axis", 1) % (data.ndim + 1) if data.ndim else 0
    return [SymArray(data.reshape(int(np.prod(data.shape[:axis])), -1), _dtype(k[0]))]


def _elementwise(n, k):
    f = np.frompyfunc(_EW[n.op_type], 2, 1)
    out = f(_obj(k[0]), _obj(k[1]))
    out = np.asarray(out, dtype=object)
    dtype = torch.bool if n.op_type in _COMPARE else _dtype(k[0])
    return [SymArray(out, dtype)]


def _neg(n, k):
    return [SymArray(np.asarray(-_obj(k[0]), dtype=object), _dtype(k[0]))]


def _where(n, k):
    cond = _obj(k[0]).astype(bool)
    return [SymArray(np.asarray(np.where(cond, _obj(k[1]), _obj(k[2])), dtype=object), _dtype(k[1]))]


def _reduce_prod(n, k):
    data = _obj(k[0])
    keep = n.attr("keepdims", 1)
    if n.opset >= 18 and 1 in k:
        axes = tuple(_ints(k[1]))
    else:
        axes = tuple(n.attr("axes") or range(data.ndim))
    if n.op_type == "ReduceSum" and n.opset >= 13:
        axes = tuple(_ints(k[1])) if 1 in k else tuple(range(data.ndim))
    if not axes:
        axes = tuple(range(data.ndim))
    f = {"ReduceProd": np.multiply, "ReduceSum": np.add}[n.op_type]
    out = f.reduce(data, axis=axes, keepdims=bool(keep))
    return [SymArray(np.asarray(out, dtype=object), _dtype(k[0]))]


_OPS = {
    "Identity": _identity, "Cast": _cast, "Gather": _gather, "Slice": _slice, "Concat": _concat,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Reshape": _reshape, "Flatten": _flatten,
    "Neg": _neg, "Where": _where, "ReduceProd": _reduce_prod, "ReduceSum": _reduce_prod,
    **{op: _elementwise for op in _EW},
}
